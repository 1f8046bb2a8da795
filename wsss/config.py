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
from wsss.gate import DEFAULT_GATE_THRESHOLD


@dataclass(frozen=True, kw_only=True)
class ColourSettings:
    """Stain normalisation and colour augmentation, the same fields and checks in both training stages
    (keyword-only, so that each stage keeps its own field order for the rest)."""

    stain_jitter: float = 0.0  # HED stain augmentation strength (0: off, the reference)
    stain_norm: str = "none"  # none (the reference), macenko, reinhard, reinhard-mean, reinhard-set: target in the checkpoint
    stain_target: Path | None = None  # fit the target on this image instead of the training set
    # stronger stain/scanner augmentation (wsss.data.augment.ColourAugment); 0: off
    hed_scale: float = 0.0
    hed_shift: float = 0.0
    lab_jitter: float = 0.0
    light_jitter: float = 0.0
    blur_jitter: float = 0.0
    jpeg_jitter: int = 0

    def check_colour(self) -> None:
        _check_stain_jitter(self.stain_jitter)
        check_stain_options(self)


@dataclass(frozen=True)
class Stage1Config(ColourSettings):
    """Stage 1: ResNet38 multi-label classifier with progressive dropout attention."""

    dataset: str  # luad, bcss or the path of a TOML spec file (wsss.data.specs)
    data: Path
    out: Path = Path("checkpoints")
    labels_csv: Path | None = None  # None: the spec's label source (file names, or its labels_csv)
    epochs: int = 20
    # When the classifier ends below the fit (label accuracy on its training patches < 0.95): this many
    # more epochs on a restarted poly schedule, then the fit is checked again (0: none, as the reference).
    # A run that fits never enters them, so it computes exactly what it did without.
    refit_epochs: int = 0
    batch_size: int = 20
    lr: float = 0.01
    head_lr_mult: float = 10.0  # fc8 learns 10× faster (20× for a bias), as the reference
    # The reference's PolyOptimizer passes its weight decay as SGD's positional *momentum*, so the
    # published models were trained with momentum 5e-4; weight decay comes from the groups (5e-4 on
    # weights, 0 on biases). README, "Fidelity to the reference".
    momentum: float = 0.0005
    weight_decay: float = 5e-4
    width: float = 1.0
    dropout: float = 1.0  # multiple of the reference's dropout rates (b6 0.3, b7 0.5, head 0.5)
    image_size: int | None = None  # None: the patches' own size (224 for the real datasets)
    input_norm: str = "none"  # the reference feeds [0, 1] RGB
    init_weights: Path | None = None
    pda: bool = True
    pda_start: float = 1.0
    pda_decay: float = 0.98
    pda_floor: float = 0.65
    pda_first_epoch: int = 3
    pda_norm: str = "none"  # reference; "max" keeps the attention in [0, 1] (see wsss.cam.pda)
    augment: str = "flip"  # reference: random h+v flips; "d4" adds 90° rotations (wsss.data.augment)
    cam_threshold: float = 0.25
    # "reference": where every kept class scores 0 the lowest index wins, as WSSS-Tissue's evaluation;
    # "ours": a zeroed class never wins (see wsss.cam.cam.cam_to_segmentation)
    cam_tie_rule: str = "reference"
    eval_splits: tuple[str, ...] = ("val", "test")
    device: str = "auto"
    precision: str = "fp32"  # fp32, bf16, fp16 or auto (wsss.runtime.resolve_precision); a run records what it used
    workers: int = 2
    seed: int = 0
    preset: str | None = None

    def __post_init__(self) -> None:
        from wsss.cam.cam import check_tie_rule
        from wsss.runtime import check_precision
        from wsss.cam.pda import PDA_NORMS, PdaSchedule
        from wsss.data.datasets import get_input_norm

        check_sgd(self.momentum, self.weight_decay)
        check_precision(self.precision)
        check_tie_rule(self.cam_tie_rule)
        _check_choice("--augment", self.augment, ("flip", "d4"))
        self.check_colour()
        if self.pda_norm not in PDA_NORMS:
            raise WsssError(f"--pda-norm must be one of {', '.join(PDA_NORMS)}, not {self.pda_norm!r}")
        get_input_norm(self.input_norm)
        PdaSchedule(self.pda_start, self.pda_decay, self.pda_floor, self.pda_first_epoch)
        if self.refit_epochs < 0:
            raise WsssError(f"--refit-epochs must be 0 or more, not {self.refit_epochs}")
        if not 0.0 <= self.dropout <= 2.0:
            raise WsssError(f"--dropout must be in [0, 2] (a multiple of the reference's rates), not {self.dropout:g}")
        bad = [s for s in self.eval_splits if s not in ("val", "test")]
        if bad:
            raise WsssError(f"evaluation splits must be val or test, not {bad}")


def _check_choice(option: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise WsssError(f"{option} must be one of {', '.join(choices)}, not {value!r}")


def _check_stain_jitter(stain_jitter: float) -> None:
    if not 0.0 <= stain_jitter <= 1.0:
        raise WsssError(f"--stain-jitter must be in [0, 1], not {stain_jitter:g}")


def check_stain_options(cfg: Any) -> None:
    """The stain normalisation and colour augmentation fields both stages share."""
    from wsss.data.stain import METHODS

    _check_choice("--stain-norm", cfg.stain_norm, METHODS)
    if cfg.stain_target is not None:
        if not isinstance(cfg.stain_target, Path):
            object.__setattr__(cfg, "stain_target", Path(cfg.stain_target))
        if cfg.stain_norm == "none":
            raise WsssError("--stain-target needs --stain-norm macenko, reinhard, reinhard-mean or reinhard-set")
    for option, value, high in (("--hed-scale", cfg.hed_scale, 1.0), ("--hed-shift", cfg.hed_shift, 1.0),
                                ("--lab-jitter", cfg.lab_jitter, 3.0), ("--light-jitter", cfg.light_jitter, 0.5),
                                ("--blur-jitter", cfg.blur_jitter, 5.0)):
        if not 0.0 <= value <= high:
            raise WsssError(f"{option} must be in [0, {high:g}], not {value:g}")
    if cfg.jpeg_jitter != 0 and not 5 <= cfg.jpeg_jitter <= 95:
        raise WsssError(f"--jpeg-jitter is the lowest JPEG quality, 5 to 95 (0: off), not {cfg.jpeg_jitter}")


def check_sgd(momentum: float, weight_decay: float) -> None:
    if not 0.0 <= momentum < 1.0:
        raise WsssError(f"--momentum must be in [0, 1), not {momentum:g}")
    if not weight_decay >= 0.0:
        raise WsssError(f"--weight-decay must be 0 or more, not {weight_decay:g}")


# Settings that only change how a run executes, not what it computes; a resumed run may change them.
RUNTIME_FIELDS = frozenset({"device", "workers", "precision", "out", "data", "labels_csv"})
# Stage 1 may also change how its CAMs are evaluated at the end.
STAGE1_RUNTIME_FIELDS = RUNTIME_FIELDS | {"cam_tie_rule"}

def resolve(cls: type, presets: dict[str, dict[str, Any]], preset: str | None, keep_none: tuple[str, ...] = (),
            **options: Any):
    """Build ``cls`` from its defaults, then ``presets[preset]``, then non-None ``options`` (and the
    ``keep_none`` ones even when None)."""
    values: dict[str, Any] = {}
    if preset is not None:
        if preset not in presets:
            raise WsssError(f"unknown preset {preset!r}; choose one of {', '.join(presets)}")
        values.update(presets[preset])
    values.update({k: v for k, v in options.items() if v is not None or k in keep_none})
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
        out[f.name] = (str(v) if isinstance(v, Path) else [str(x) if isinstance(x, Path) else x for x in v]
                       if isinstance(v, tuple) else v)
    return out


def upgrade(data: dict[str, Any]) -> dict[str, Any]:
    """A configuration saved by an older wsss in today's terms: ``amp`` (a bool) became
    ``precision`` (``amp``: fp16 on CUDA, bf16 on the CPU, as ``--amp`` was; off: fp32)."""
    if "amp" not in data:
        return data
    upgraded = {k: v for k, v in data.items() if k != "amp"}
    upgraded.setdefault("precision", "amp" if data["amp"] else "fp32")
    return upgraded


def from_dict(cls: type, data: dict[str, Any]):
    """Inverse of :func:`to_dict`; unknown keys (from a newer version) are ignored, old ones upgraded
    (:func:`upgrade`), and a field added since the dict was saved takes the value that version computed
    with (``ADDED_FIELDS``)."""
    data = upgrade({**ADDED_FIELDS.get(cls.__name__, {}), **data})
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        v = data[f.name]
        if f.name in ("data", "out", "init_weights", "labels_csv", "stain_target") and v is not None:
            v = Path(v)
        elif isinstance(v, list):
            v = tuple(v)
        kwargs[f.name] = v
    return cls(**kwargs)


def save_json(config: Any, path: Path) -> None:
    from wsss.runtime import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(to_dict(config), indent=2) + "\n")


@dataclass(frozen=True)
class Stage2Config(ColourSettings):
    """Stage 2: DeepLab v3+ trained on multi-layer pseudo-masks, tested with the classification gate."""

    dataset: str  # luad, bcss or the path of a TOML spec file (wsss.data.specs)
    data: Path
    stage1_checkpoint: Path | None = None  # needed for the gate only
    out: Path = Path("checkpoints")
    labels_csv: Path | None = None  # None: the spec's label source (file names, or its labels_csv)
    report: Path | None = None  # None: results/<dataset>
    pm_dir: Path | None = None  # None: DATA/train_PM
    pm_layers: tuple[str, ...] = ("bn7", "b5_2", "b4_5")
    pm_weights: tuple[float, ...] = (0.6, 0.2, 0.2)
    loss: str = "ce"
    # "reference": WSSS-Tissue's scaling (an appended background logit, mean over all pixels, then
    # divided by the batch size again); "mean": a mean over each mask's tissue pixels (ours).
    loss_reduction: str = "reference"
    backbone: str = "resnet101"
    out_stride: int = 16
    head_channels: int = 256  # ASPP and decoder width
    epochs: int = 30
    batch_size: int = 20
    lr: float = 0.01
    head_lr_mult: float = 10.0
    momentum: float = 0.9
    weight_decay: float = 5e-4
    image_size: int | None = None  # None: the patches' own size (224 for the real datasets)
    input_norm: str = "none"  # the reference feeds [0, 1] RGB
    augment: str = "hflip"  # reference: left-right flips (+ blur); "d4": all 8 square symmetries (+ blur)
    mosaic: float = 0.0  # probability of a 2×2 mosaic of single-class patches instead (0: off, the reference)
    ema: float = 0.0  # decay of an exponential moving average of the weights, validated and kept (0: off)
    init_weights: Path | None = None
    gate: bool = True  # the reference always gates at test time (its --Is_GM is always true)
    gate_threshold: float = DEFAULT_GATE_THRESHOLD
    gate_mode: str = "reference"  # logits × (p > threshold), as WSSS-Tissue; "mask": −∞ (wsss.gate)
    # The reference's DataLoader keeps each epoch's last short batch (its loss is divided by its own
    # size) and its poly schedule counts ⌈N/batch⌉ steps an epoch; True drops it and counts ⌊N/batch⌋.
    # Under DDP the DistributedSampler first gives every process ⌊N/world⌋ patches (the tail of each
    # epoch's shuffle is left out, as before), so every process has a short batch of the same size.
    drop_last: bool = False
    device: str = "auto"
    precision: str = "fp32"  # fp32, bf16, fp16 or auto (wsss.runtime.resolve_precision); a run records what it used
    workers: int = 2
    seed: int = 0
    preset: str | None = None

    def __post_init__(self) -> None:
        from wsss.data.datasets import get_input_norm
        from wsss.gate import check_gate_options
        from wsss.runtime import check_precision
        from wsss.losses import LOSSES, check_loss_options
        from wsss.models.deeplab import DeepLabArch

        # from_dict gives back strings and lists; keep the declared types.
        for name in ("data", "out", "report", "pm_dir", "stage1_checkpoint", "init_weights", "labels_csv"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Path):
                object.__setattr__(self, name, Path(value))
        object.__setattr__(self, "pm_layers", tuple(self.pm_layers))
        object.__setattr__(self, "pm_weights", tuple(float(w) for w in self.pm_weights))
        if not self.pm_layers or len(self.pm_layers) != len(self.pm_weights):
            raise WsssError(
                f"--pm-layers names {len(self.pm_layers)} layers but --pm-weights gives {len(self.pm_weights)} weights"
            )
        if any(w < 0 for w in self.pm_weights) or not any(w > 0 for w in self.pm_weights):
            raise WsssError("--pm-weights must be non-negative with at least one above 0")
        if self.loss not in LOSSES:
            raise WsssError(f"--loss must be one of {', '.join(LOSSES)}, not {self.loss!r}")
        check_loss_options(self.loss, self.loss_reduction)
        check_gate_options(self.gate_mode, self.gate_threshold)
        check_sgd(self.momentum, self.weight_decay)
        check_precision(self.precision)
        _check_choice("--augment", self.augment, ("hflip", "d4"))
        self.check_colour()
        if not 0.0 <= self.ema < 1.0:
            raise WsssError(f"--ema is a decay per step in [0, 1) (0: off), not {self.ema:g}")
        if not 0.0 <= self.mosaic <= 1.0:
            raise WsssError(f"--mosaic is a probability in [0, 1], not {self.mosaic:g}")
        get_input_norm(self.input_norm)
        DeepLabArch(self.backbone, self.out_stride, 1, self.head_channels)


# Fields added after configurations were first saved, with the value a saved one without them
# computed with (a resumed run must go on computing it).
ADDED_FIELDS: dict[str, dict[str, Any]] = {"Stage2Config": {"drop_last": True}}

# A resumed stage-2 run may also change where its inputs and reports live and how it is tested.
STAGE2_RUNTIME_FIELDS = RUNTIME_FIELDS | {"report", "pm_dir", "stage1_checkpoint", "gate", "gate_threshold",
                                          "gate_mode"}

@dataclass(frozen=True)
class PseudoMaskConfig:
    """``wsss generate-pm``: which classifier, which layers, where to write, how to run."""

    dataset: str | None  # None: the spec recorded in the checkpoint
    data: Path
    checkpoint: Path
    layers: tuple[str, ...] = ("b4_5", "b5_2", "bn7")  # wsss.cam.gradcam.GRADCAM_LAYERS
    out: Path | None = None  # None: DATA/train_PM
    batch_size: int = 8
    device: str = "auto"
    precision: str = "fp32"  # of the classifier's passes (wsss.runtime.resolve_precision)
    workers: int = 2
    force: bool = False
    tie_rule: str = "reference"  # the reference's argmax; "ours": see wsss.cam.gradcam.fuse_pseudo_mask
    scales: tuple[float, ...] = (1.0,)  # Grad-CAMs averaged over these input scales ...
    flip: bool = False  # ... and their left-right flips (the reference: one view)
    white_rule: str = "grey"  # the reference's white-background rule; "glass" spares pale tissue
    labels_csv: Path | None = None  # None: the spec's label source
    preset: str | None = None  # the preset its tie and white rules came from (wsss.config.PM_PRESETS)

    def __post_init__(self) -> None:
        from wsss.runtime import check_precision

        object.__setattr__(self, "scales", tuple(float(s) for s in self.scales))
        check_precision(self.precision)
        self.method  # validates

    @property
    def out_dir(self) -> Path:
        from wsss.data.layout import default_pm_dir

        return Path(self.out) if self.out is not None else default_pm_dir(self.data)

    @property
    def method(self):
        """The pseudo-mask method these settings name (:class:`wsss.cam.pseudo_mask.PmMethod`)."""
        from wsss.cam.pseudo_mask import PmMethod

        return PmMethod(self.tie_rule, self.scales, self.flip, self.white_rule)


# --------------------------------------------------------------------------- configuration files

CONFIG_TABLES: tuple[str, ...] = ("stage1", "pseudo_masks", "stage2", "predict", "predict_wsi")
"""The tables of a ``--config`` file: one per command that takes one (train-stage1, generate-pm,
train-stage2, whose presets are such files, and predict, predict-wsi); each command reads its own,
so one file can hold a whole pipeline."""


def _field_types(cls: type) -> dict[str, Any]:
    import typing

    return typing.get_type_hints(cls)


def _fits(value: Any, hint: Any) -> bool:
    """Whether a TOML value can be the value of a field annotated ``hint`` (an int is a float, a
    string a path, an array a tuple of its element type)."""
    import types
    import typing

    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, h) for h in typing.get_args(hint) if h is not type(None))
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint in (str, Path):
        return isinstance(value, str)
    if origin is tuple:
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        return isinstance(value, list) and all(_fits(v, args[0]) for v in value) if args else isinstance(value, list)
    return True


def read_config_table(path: Path, table: str, cls: type) -> dict[str, Any]:
    """The ``[table]`` of the ``--config`` file ``path`` as configuration values of ``cls`` (paths as
    :class:`~pathlib.Path`, arrays as tuples); nothing when the file has no such table. A file that
    is not TOML, an unknown table or key, or a value of the wrong type: one :class:`WsssError` line
    naming the file and the key."""
    try:
        data = _read_toml(path)
    except FileNotFoundError:
        raise WsssError(f"--config {path} not found") from None
    except (OSError, ValueError) as exc:  # tomllib.TOMLDecodeError is a ValueError
        raise WsssError(f"--config {path} is not a TOML file: {exc}") from None
    unknown = [k for k in data if k not in CONFIG_TABLES]
    if unknown:
        raise WsssError(f"{path}: unknown table or key {unknown[0]!r} (a configuration file has the tables "
                        f"{', '.join(f'[{t}]' for t in CONFIG_TABLES)})")
    return table_values(path, table, data.get(table, {}), cls)


def table_values(path: Path | str, table: str, values: Any, cls: type) -> dict[str, Any]:
    """The ``[table]`` of the TOML file ``path`` (read into ``values``) as configuration values of
    ``cls``: each key a field, each value of the field's type (paths as :class:`~pathlib.Path`,
    arrays as tuples); otherwise one :class:`WsssError` line naming the file and the key."""
    if not isinstance(values, dict):
        raise WsssError(f"{path}: {table} must be a table ([{table}])")
    types = _field_types(cls)
    out: dict[str, Any] = {}
    for key, value in values.items():
        if key not in types:
            raise WsssError(f"{path}: [{table}] has no key {key!r} (its keys: {', '.join(types)})")
        if not _fits(value, types[key]):
            raise WsssError(f"{path}: [{table}] {key} = {value!r} has the wrong type (expected {types[key]})")
        if isinstance(value, list):
            value = tuple(value)
        elif isinstance(value, str) and Path in getattr(types[key], "__args__", (types[key],)):
            value = Path(value)
        out[key] = value
    return out


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python < 3.11
        import tomli as tomllib

    with open(path, "rb") as f:
        return tomllib.load(f)


# --------------------------------------------------------------------------- presets

PRESET_DIR = Path(__file__).parent / "presets"
"""The presets, one TOML file each with the ``[stage1] [pseudo_masks] [stage2]`` tables of a
``--config`` file: ``paper`` is the reference's computation (the configurations' defaults),
``cpu-paper`` the same at CPU scale, ``cpu`` and ``best`` add what we measured to help at CPU scale
and at the paper's scale, with our rules. Each file says why it holds what it holds."""

RULES: dict[str, frozenset[str]] = {"stage1": frozenset({"cam_tie_rule"}), "pm": frozenset({"tie_rule"}),
                                    "stage2": frozenset({"gate_mode", "drop_last"})}
"""Settings in which ``cpu`` and ``best`` follow our rule where the reference's arithmetic is arbitrary
(ties at 0, a rejected class winning, a short last batch): not results we measured, so no ablation row."""


def _load_presets() -> dict[str, dict[str, dict[str, Any]]]:
    """``{step: {preset: values}}`` for the steps ``stage1``, ``pm`` and ``stage2``."""
    classes = {"stage1": Stage1Config, "pseudo_masks": PseudoMaskConfig, "stage2": Stage2Config}
    steps = {"stage1": "stage1", "pseudo_masks": "pm", "stage2": "stage2"}
    out: dict[str, dict[str, dict[str, Any]]] = {step: {} for step in steps.values()}
    for name in ("paper", "cpu-paper", "cpu", "best"):
        path = PRESET_DIR / f"{name}.toml"
        data = _read_toml(path)
        unknown = [k for k in data if k not in classes]
        if unknown:
            raise WsssError(f"{path}: unknown table {unknown[0]!r}")
        for table, cls in classes.items():
            out[steps[table]][name] = table_values(path, table, data.get(table, {}), cls)
    return out


_PRESETS = _load_presets()
STAGE1_PRESETS: dict[str, dict[str, Any]] = _PRESETS["stage1"]
PM_PRESETS: dict[str, dict[str, Any]] = _PRESETS["pm"]
STAGE2_PRESETS: dict[str, dict[str, Any]] = _PRESETS["stage2"]

NOT_ABLATED = frozenset({"stain_norm"})
"""Preset settings with no ablation row: ``reinhard-set`` trains exactly as ``none`` (a row would train
the same chain again); what it does to each look is the stain bench's (docs/stain.md)."""
IMPROVEMENTS: dict[str, dict[str, Any]] = {
    step: {k: v for k, v in presets["cpu"].items()
           if presets["cpu-paper"].get(k) != v and k not in RULES[step] and k not in RUNTIME_FIELDS | NOT_ABLATED}
    for step, presets in _PRESETS.items()
}
"""What the ``cpu`` preset changes from ``cpu-paper`` (the reference at the same scale), per step,
rules, how it runs (precision, workers) and :data:`NOT_ABLATED` aside: one ablation row each
(``wsss reproduce --ablations``)."""


def folder_spec(data: str | Path) -> str:
    """The spec of the dataset in ``data`` when ``--dataset`` is not given: ``DATA/spec.toml``
    (``wsss extract-patches`` writes it); a folder without one is a user error."""
    from wsss.data.specs import FOLDER_SPEC

    path = Path(data) / FOLDER_SPEC
    if not Path(data).is_dir():
        raise WsssError(f"--dataset is needed (luad, bcss or a TOML spec file) when the data folder holds no "
                        f"{FOLDER_SPEC}, and {data} does not exist")
    if not path.is_file():
        raise WsssError(f"--dataset is needed (luad, bcss or a TOML spec file): {data} holds no {FOLDER_SPEC}")
    return str(path)


def reproduce_dataset(dataset: str | None, data: str | Path, config_file: Path | None) -> str:
    """``wsss reproduce``'s one dataset: ``--dataset``, else the one the ``--config`` file's tables
    name (they must agree), else the data folder's (:func:`folder_spec`)."""
    if dataset is not None:
        return dataset
    if config_file is not None:
        tables = (("stage1", Stage1Config), ("pseudo_masks", PseudoMaskConfig), ("stage2", Stage2Config))
        values = (read_config_table(config_file, t, cls).get("dataset") for t, cls in tables)
        named = {str(v) for v in values if v is not None}
        if len(named) > 1:
            raise WsssError(f"{config_file} names several datasets ({', '.join(sorted(named))}): reproduce runs one, "
                            "pass --dataset")
        if named:
            return named.pop()
    return folder_spec(data)


def resolve_command(cls: type, presets: dict[str, dict[str, Any]], preset: str | None, options: dict[str, Any],
                    config_file: Path | None, table: str, keep_none: tuple[str, ...] = ()) -> tuple[Any, frozenset[str]]:
    """A command's configuration: ``cls``'s defaults, then the preset (``--preset``, else the file's
    ``preset`` key), then the ``--config`` file's ``[table]``, then the options given on the command
    line (not None, except the fields in ``keep_none``, whose None means something: generate-pm's
    dataset None is the checkpoint's). A dataset given nowhere is the data folder's
    (:func:`folder_spec`). Returns it with the names of the fields the user set."""
    from_file = read_config_table(config_file, table, cls) if config_file is not None else {}
    if preset is None:
        preset = from_file.get("preset")
    from_file.pop("preset", None)
    chosen = {**from_file, **{k: v for k, v in options.items() if v is not None}}
    if chosen.get("dataset") is None and "dataset" not in keep_none and options.get("data") is not None:
        chosen["dataset"] = folder_spec(options["data"])
    config = resolve(cls, presets, preset, keep_none, **chosen, **{k: options[k] for k in keep_none if k not in chosen})
    given = set(chosen)
    if preset is not None:
        given.add("preset")
    return config, frozenset(given)


def config_toml(config: Any, table: str) -> str:
    """``config`` as the ``[table]`` of a ``--config`` file (fields that are None are left out: TOML
    has no null, and leaving them out gives them their default, None)."""
    import tomli_w

    values = {k: v for k, v in to_dict(config).items() if v is not None}
    return tomli_w.dumps({table: values})
