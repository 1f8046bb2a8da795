"""Typed, frozen configurations of the stages, with presets and JSON round trips.

Precedence: the dataclass defaults are the paper's settings; a named preset overrides some of
them; options given on the command line override both.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wsss.errors import WsssError


@dataclass(frozen=True)
class Stage1Config:
    """Stage 1: ResNet38 multi-label classifier with progressive dropout attention."""

    dataset: str
    data: Path
    out: Path = Path("checkpoints")
    epochs: int = 20
    batch_size: int = 20
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    width: float = 1.0
    image_size: int | None = None  # None: the patches' own size (224 for the real datasets)
    input_norm: str = "none"  # the reference feeds [0, 1] RGB
    init_weights: Path | None = None
    pda: bool = True
    pda_start: float = 1.0
    pda_decay: float = 0.98
    pda_floor: float = 0.65
    pda_first_epoch: int = 3
    pda_norm: str = "none"  # reference; "max" keeps the attention in [0, 1] (see wsss.cam.pda)
    cam_threshold: float = 0.25
    eval_splits: tuple[str, ...] = ("val", "test")
    device: str = "auto"
    amp: bool = False
    workers: int = 2
    seed: int = 0
    preset: str | None = None

    def __post_init__(self) -> None:
        from wsss.cam.pda import PDA_NORMS, PdaSchedule
        from wsss.data.datasets import get_input_norm

        if self.pda_norm not in PDA_NORMS:
            raise WsssError(f"--pda-norm must be one of {', '.join(PDA_NORMS)}, not {self.pda_norm!r}")
        get_input_norm(self.input_norm)
        PdaSchedule(self.pda_start, self.pda_decay, self.pda_floor, self.pda_first_epoch)
        bad = [s for s in self.eval_splits if s not in ("val", "test")]
        if bad:
            raise WsssError(f"evaluation splits must be val or test, not {bad}")


# Settings that only change how a run executes, not what it computes; a resumed run may change them.
RUNTIME_FIELDS = frozenset({"device", "workers", "amp", "out", "data"})

STAGE1_PRESETS: dict[str, dict[str, Any]] = {
    "paper": {},
    # A thin copy of the same architecture on half-size inputs: the synthetic dataset trains in a
    # few minutes on 2 CPU cores. Measured in bench/stage1_speed.py and the README.
    "cpu": {"width": 0.125, "image_size": 112, "epochs": 10, "batch_size": 16, "lr": 0.01, "workers": 0},
}


def resolve(cls: type, presets: dict[str, dict[str, Any]], preset: str | None, **options: Any):
    """Build ``cls`` from its defaults, then ``presets[preset]``, then non-None ``options``."""
    values: dict[str, Any] = {}
    if preset is not None:
        if preset not in presets:
            raise WsssError(f"unknown preset {preset!r}; choose one of {', '.join(presets)}")
        values.update(presets[preset])
    values.update({k: v for k, v in options.items() if v is not None})
    values["preset"] = preset
    try:
        return cls(**values)
    except TypeError as exc:
        raise WsssError(f"bad configuration: {exc}") from None


def to_dict(config: Any) -> dict[str, Any]:
    """JSON-ready dict (paths as strings, tuples as lists)."""
    out = {}
    for f in dataclasses.fields(config):
        v = getattr(config, f.name)
        out[f.name] = str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v
    return out


def from_dict(cls: type, data: dict[str, Any]):
    """Inverse of :func:`to_dict`; unknown keys (from a newer version) are ignored."""
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        v = data[f.name]
        if f.name in ("data", "out", "init_weights") and v is not None:
            v = Path(v)
        elif isinstance(v, list):
            v = tuple(v)
        kwargs[f.name] = v
    return cls(**kwargs)


def save_json(config: Any, path: Path) -> None:
    from wsss.runtime import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(to_dict(config), indent=2) + "\n")
