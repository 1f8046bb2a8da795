"""Shared test helpers, one module: run the CLI in-process the way a shell would (``run_cli``,
``assert_one_line_error``), tiny datasets in the published layouts, tiny untrained checkpoints
(``tiny_checkpoint``), the tiny training options of the chains, a predictor that stops a run, lock
files of processes that run or no longer run, synthetic slides and QuPath annotations."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from PIL import Image

from wsss.cli import main
from wsss.data.specs import LUAD
from wsss.wsi.slide import _import_openslide


def run_cli(capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch, *args: str):
    monkeypatch.setattr(sys, "argv", ["wsss", *map(str, args)])
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch, *args: str) -> str:
    """Run ``wsss ARGS`` and check that it failed as a user error should: exit status 1, one
    ``error:`` line, the last thing on stderr (warnings may come before it), no traceback; returns stderr."""
    code, _, err = run_cli(capsys, monkeypatch, *args)
    assert code == 1 and err.count("error:") == 1 and "Traceback" not in err, err
    assert err.rstrip().rsplit("error:", 1)[1].count("\n") == 0, err
    return err


class Interrupting:
    """A predictor that counts its forward passes and stops the run (as Ctrl-C or a kill would) at
    pass ``stop_at``; ``on_call`` looks at the run from inside (e.g. its lock) before each pass."""

    def __init__(self, inner, stop_at: int | None = None, on_call: Callable[[], None] | None = None) -> None:
        self.inner, self.stop_at, self.on_call, self.calls = inner, stop_at, on_call, 0

    def __call__(self, tiles):
        if self.on_call is not None:
            self.on_call()
        self.calls += 1
        if self.calls == self.stop_at:
            raise KeyboardInterrupt
        return self.inner(tiles)


def spy_on_models(monkeypatch: pytest.MonkeyPatch, module) -> tuple[list[Interrupting], Callable[[int | None], None]]:
    """Wrap ``module.load_models`` so that every run's predictor is an :class:`Interrupting`.

    Returns ``(spies, arm)``: ``arm(stop_at, on_call)`` sets where the next run stops (None: never)
    and what its predictor calls before each pass; each run appends its predictor to ``spies``."""
    load = module.load_models
    spies: list[Interrupting] = []

    def arm(stop_at: int | None, on_call: Callable[[], None] | None = None) -> None:
        def patched(cfg, *args):
            predictor, spec = load(cfg, *args)
            spies.append(Interrupting(predictor, stop_at, on_call))
            return spies[-1], spec

        monkeypatch.setattr(module, "load_models", patched)

    return spies, arm


def dead_pid() -> int:
    """The pid of a process that has finished (what a lock left by a killed run names)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def live_lock(folder: Path, command: str, scope: str | None = None) -> subprocess.Popen:
    """A lock on ``folder`` (or on its part ``scope``: a slide) in the documented format, held by a
    process that is running (``sleep``); kill it to leave a stale lock."""
    proc = subprocess.Popen(["sleep", "60"])
    write_lock(folder, command, proc.pid, scope)
    return proc


def write_lock(folder: Path, command: str, pid: int, scope: str | None = None) -> Path:
    """``folder/.wsss-lock`` (``.wsss-lock.<scope>``) naming process ``pid`` of this host."""
    folder.mkdir(parents=True, exist_ok=True)
    boot = Path("/proc/sys/kernel/random/boot_id")
    stat = Path(f"/proc/{pid}/stat")
    start = int(stat.read_text().rsplit(")", 1)[1].split()[19]) if stat.exists() else None
    path = folder / (".wsss-lock" if scope is None else f".wsss-lock.{scope}")
    path.write_text(json.dumps({
        "pid": pid, "host": socket.gethostname(), "boot": boot.read_text().strip() if boot.exists() else None,
        "proc_start": start, "command": command, "since": "2026-01-01 00:00:00"}))
    return path


def record_calls(monkeypatch: pytest.MonkeyPatch, module, name: str, result=None) -> list[tuple[tuple, dict]]:
    """Replace ``module.name`` by a stand-in that records each call's ``(args, kwargs)`` and returns
    ``result`` (called with the same arguments when it is callable); returns the list of calls.

    For checking what a command would run with (its resolved configuration) without running it."""
    calls: list[tuple[tuple, dict]] = []

    def stand_in(*args, **kwargs):
        calls.append((args, kwargs))
        return result(*args, **kwargs) if callable(result) else result

    monkeypatch.setattr(module, name, stand_in)
    return calls


# --------------------------------------------------------------------------- slides and QuPath annotations

TILE = 64  # side of the synthetic tissue tiles slides are built from (level-0 pixels)


def tiled_slide(layout, tiles: dict, seed: int = 0, tile: int = TILE):
    """A level-0 picture ``(rows·tile, cols·tile, 3)`` uint8: ``layout[r][c]`` is the class whose tile
    (one of ``tiles[class]``, turned by a multiple of 90°) fills that square, -1 is glass (near-white
    grey, saturation under 8 of 255)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    rows, cols = len(layout), len(layout[0])
    image = (240 + rng.integers(-3, 4, (rows * tile, cols * tile, 3))).astype(np.uint8)
    for r, row in enumerate(layout):
        for c, k in enumerate(row):
            if k >= 0:
                pick = tiles[k][rng.integers(len(tiles[k]))]
                image[r * tile:(r + 1) * tile, c * tile:(c + 1) * tile] = np.rot90(pick, int(rng.integers(4)))
    return image


def write_pyramid(path: Path, image, mpp: float | None, levels: int = 3, tile: int = 64) -> Path:
    """A tiled pyramidal TIFF: level ``i`` is level 0 sampled every ``2**i``-th pixel (so its pixels are
    level 0's, exactly), with TIFF resolution tags of ``mpp·2**i`` µm/px (none when ``mpp`` is None)."""
    import tifffile

    with tifffile.TiffWriter(path) as tif:
        for i in range(levels):
            res = {} if mpp is None else {"resolution": (1e4 / (mpp * 2**i),) * 2, "resolutionunit": "CENTIMETER"}
            tif.write(image[:: 2**i, :: 2**i], tile=(tile, tile), photometric="rgb", compression="zlib",
                      subfiletype=1 if i else 0, **res)
    return path


def rectangle(x0: float, y0: float, x1: float, y1: float) -> list:
    """A GeoJSON ring, counter-clockwise in the numbers, closed."""
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]


def qupath_object(name: str | None, *polygons: list, object_type: str = "annotation") -> dict:
    """A QuPath GeoJSON Feature as QuPath 0.4 exports it: one Polygon (rings) or a MultiPolygon."""
    geometry = ({"type": "Polygon", "coordinates": polygons[0]} if len(polygons) == 1
                else {"type": "MultiPolygon", "coordinates": list(polygons)})
    props = {"objectType": object_type}
    if name is not None:
        props["classification"] = {"name": name, "color": [200, 0, 0]}
    return {"type": "Feature", "id": "00000000-0000-0000-0000-000000000000", "geometry": geometry,
            "properties": props}


def write_qupath(path: Path, features: list, collection: bool = True) -> Path:
    """QuPath's GeoJSON export: a FeatureCollection, or (``collection=False``) a bare list of Features."""
    data = {"type": "FeatureCollection", "features": features} if collection else features
    path.write_text(json.dumps(data))
    return path


# --------------------------------------------------------------------------- datasets in the published layouts

LUAD_TRAIN_NAMES = [
    "1031280-2300-27920-[1 0 0 1].png",
    "1031280-2524-28144-[0 1 1 0].png",
    "22-0000-1111-[0 0 1 0].png",
]
BCSS_TRAIN_NAMES = [
    "TCGA-A1-A0SK-DX1_xmin45749_ymin25055_MPP-0.2500+0[1101].png",
    "TCGA-A2-A0CM-DX1_xmin18562_ymin56852_MPP-0.2500+1[0100].png",
]


def write_rgb(path: Path, size: int = 16, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)


def write_palette_mask(path: Path, mask: np.ndarray, spec=LUAD) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(mask.astype(np.uint8), mode="P")
    img.putpalette(spec.flat_palette())
    img.save(path)


def build_layout(root: Path, train_names: list[str], spec, val_dir: str = "val", size: int = 16) -> Path:
    """A dataset in the published layout: labelled train/, and img/ + mask/ for val and test."""
    for i, name in enumerate(train_names):
        write_rgb(root / "train" / name, size, seed=i)
    for split in (val_dir, "test"):
        for i in range(2):
            write_rgb(root / split / "img" / f"{split}-{i}.png", size, seed=100 + i)
            mask = (np.arange(size * size).reshape(size, size) % (spec.background_index + 1))
            write_palette_mask(root / split / "mask" / f"{split}-{i}.png", mask, spec)
    return root


# --------------------------------------------------------------------------- tiny models and runs

# train-stage1 / train-stage2 options of one tiny epoch on 32-px inputs
S1 = ("--width", "0.125", "--image-size", "32", "--epochs", "1", "--batch-size", "8", "--workers", "0",
      "--device", "cpu")
S2 = ("--backbone", "resnet18", "--head-channels", "8", "--image-size", "32", "--epochs", "1", "--batch-size", "8",
      "--workers", "0", "--device", "cpu", "--no-gate")


def model_weights(path: Path) -> dict:
    """The ``model`` state dict of a saved checkpoint (read as every command reads one)."""
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def tiny_checkpoint(path: Path, stage: int, *, seed: int = 0, image_size: int | None = 32, data: Path = Path("."),
                    num_classes: int = 4, **config) -> Path:
    """An untrained tiny model in our checkpoint format: a 1/8-width ResNet38 classifier (stage 1) or a
    ResNet-18 DeepLab v3+ with an 8-channel head (stage 2), built after ``torch.manual_seed(seed)``."""
    from wsss.runtime import save_checkpoint

    save_checkpoint(path, tiny_state(stage, seed=seed, image_size=image_size, data=data, num_classes=num_classes,
                                     **config))
    return path


def tiny_state(stage: int, *, seed: int = 0, image_size: int | None = 32, data: Path = Path("."), num_classes: int = 4,
               **config) -> dict:
    """The checkpoint dict :func:`tiny_checkpoint` saves."""
    import torch

    from wsss.config import Stage1Config, Stage2Config
    from wsss.models.deeplab import DeepLabArch, DeepLabV3Plus
    from wsss.models.resnet38 import ResNet38Classifier
    from wsss.stages import stage1, stage2

    torch.manual_seed(seed)
    if stage == 1:
        cfg = Stage1Config(dataset="luad", data=data, width=0.125, image_size=image_size, **config)
        return stage1.checkpoint_state(ResNet38Classifier(num_classes, width=0.125), cfg, LUAD, 0)
    model = DeepLabV3Plus(DeepLabArch("resnet18", 16, num_classes, 8))
    cfg = Stage2Config(dataset="luad", data=data, backbone="resnet18", head_channels=8, image_size=image_size, **config)
    return stage2.checkpoint_state(model, cfg, LUAD, 0, {})


def tiny_reproduce(tmp: Path, **kw):
    """A reproduce configuration of the tiny presets (the ``tiny_presets`` fixture) on 16 synthetic patches."""
    from wsss.stages.reproduce import ReproduceConfig

    base = dict(dataset="luad", data=tmp / "data", run="t", preset="tiny", out=tmp / "ckpt", report=tmp / "report",
                synth=True, synth_counts=(16, 4, 4), device="cpu", workers=0, figures=False)
    base.update(kw)
    return ReproduceConfig(**base)


# --------------------------------------------------------------------------- slides

SLIDE_MPP = 0.5  # µm/px of level 0 of the synthetic slides


HAVE_OPENSLIDE = _import_openslide() is not None  # the test extra installs it; without it, tifffile only


def slide_pixels(seed: int = 0) -> np.ndarray:
    """Level 0 ``(384, 512, 3)``: tissue in ``[0, 192) × [0, 256)`` (rows × columns), glass elsewhere."""
    rng = np.random.default_rng(seed)
    image = (240 + rng.integers(-3, 4, (384, 512, 3))).astype(np.uint8)  # saturation <= 7 of 255
    image[:192, :256] = rng.integers(0, 40, (192, 256, 3)) + np.array([170, 40, 150])  # saturation >= 111
    return image.astype(np.uint8)


def write_pyramid_levels(path: Path, image: np.ndarray, levels: int = 3, mpp: float | None = SLIDE_MPP, tile: int = 64) -> list:
    """A tiled, deflate-compressed pyramidal TIFF, levels as successive reduced pages (OpenSlide's
    generic TIFF and tifffile both read it); returns the level arrays."""
    import tifffile

    arrays = [image[:: 2**i, :: 2**i] for i in range(levels)]
    with tifffile.TiffWriter(path) as tif:
        for i, level in enumerate(arrays):
            res = {} if mpp is None else {"resolution": (1e4 / (mpp * 2**i),) * 2, "resolutionunit": "CENTIMETER"}
            tif.write(level, tile=(tile, tile), photometric="rgb", compression="zlib", subfiletype=1 if i else 0, **res)
    return arrays


def tensorboard_threads() -> list:
    """The live threads of tensorboardX event writers (each writer runs one until it is closed)."""
    import threading

    return [t for t in threading.enumerate() if type(t).__module__.startswith("tensorboardX") and t.is_alive()]


def interrupt_at_epoch(monkeypatch: pytest.MonkeyPatch, module, epoch: int = 1) -> Callable:
    """Make ``module.train_one_epoch`` stop the run (as Ctrl-C would) when epoch index ``epoch`` starts
    (0-based: 1 saves the first epoch); returns the real function, to put back for the resume."""
    real = module.train_one_epoch

    def stopping(*args, **kwargs):  # the epoch index is the last positional (stage 2 passes ema= by keyword)
        if args[-1] == epoch:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "train_one_epoch", stopping)
    return real
