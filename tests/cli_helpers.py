"""Shared test helpers: run the CLI in-process the way a shell would (exit code, stdout, stderr), a
predictor that stops a run, lock files of processes that run or no longer run."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest

from wsss.cli import main


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
