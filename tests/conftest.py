"""Shared fixtures: tiny copies of the LUAD-HistoSeg and BCSS-WSSS layouts, built on the fly."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import BCSS_TRAIN_NAMES, LUAD_TRAIN_NAMES, build_layout, tiny_checkpoint
from wsss.data.specs import BCSS, LUAD

def pytest_runtest_logreport(report) -> None:
    """A failure's traceback as soon as the test fails, not only in the summary at the end: a run
    that a stuck test ends early (pytest-timeout, CI's time limit) still shows what failed before."""
    if report.failed:
        sys.stderr.write(f"\n{report.nodeid} {report.when} failed:\n{report.longreprtext}\n")
        sys.stderr.flush()


@pytest.fixture(autouse=True)
def one_thread():
    """The tests run thin models on tiny inputs: ops too small for intra-op threads, and on a busy
    2-core machine two OpenMP threads mostly wait on each other (ten times slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def luad_root(tmp_path: Path) -> Path:
    return build_layout(tmp_path / "LUAD-HistoSeg", LUAD_TRAIN_NAMES, LUAD)


@pytest.fixture
def bcss_root(tmp_path: Path) -> Path:
    # BCSS copies are often distributed with valid/ instead of val/.
    return build_layout(tmp_path / "BCSS-WSSS", BCSS_TRAIN_NAMES, BCSS, val_dir="valid")


@pytest.fixture(scope="session")
def synth16(tmp_path_factory) -> Path:
    """16/4/4 synthetic 32-px patches in the LUAD-HistoSeg layout; read-only (copy it to change it)."""
    from wsss.data.synth import generate

    root = tmp_path_factory.mktemp("synth16") / "data"
    generate(root, n_train=16, n_val=4, n_test=4, size=32, seed=0, workers=1, progress=False)
    return root


@pytest.fixture(scope="session")
def thin_ckpts(tmp_path_factory) -> dict[str, Path]:
    """Untrained thin checkpoints in our format: two stage-1 classifiers (seeds 0, 1: s1a, s1b) at 32 px
    and a ResNet-18 stage 2 (s2) at 32 px."""
    root = tmp_path_factory.mktemp("thin_ckpts")
    return {"s1a": tiny_checkpoint(root / "s1a.pth", 1, seed=0), "s1b": tiny_checkpoint(root / "s1b.pth", 1, seed=1),
            "s2": tiny_checkpoint(root / "s2.pth", 2)}


TRI_SPEC = """name = "tri"
classes = ["TUM", "NEC", "LYM"]
colors = [[205, 51, 51], [0, 255, 0], [65, 105, 225]]
white_is_background = true
mpp = 1.0
"""
"""Three classes whose synthetic textures are tumour, necrosis and lymphocytes; patches at 1 µm/px."""


@pytest.fixture(scope="session")
def tri_spec(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tri_spec") / "tri.toml"
    path.write_text(TRI_SPEC)
    return path


@pytest.fixture(scope="session")
def class_tiles(tmp_path_factory, tri_spec) -> dict[int, list[np.ndarray]]:
    """Single-class 64-px tissue tiles of the ``tri`` spec drawn at 0.5 µm/px by ``wsss synth``: the
    training patches whose true mask is one class everywhere and whose HSV saturation exceeds 40 on
    90% of their pixels (plainly tissue, not glass)."""
    from wsss.data.png import read_mask
    from wsss.data.specs import get_spec
    from wsss.data.synth import generate

    root = tmp_path_factory.mktemp("class_tiles") / "synth"
    generate(root, n_train=600, n_val=1, n_test=1, size=64, seed=0, workers=1, progress=False,
             spec=get_spec(tri_spec), mpp=0.5)
    tiles: dict[int, list[np.ndarray]] = {0: [], 1: [], 2: []}
    for path in sorted((root / "train").glob("*.png")):
        truth = read_mask(root / "train_gt" / path.name)
        with Image.open(path) as img:
            pixels, hsv = np.asarray(img.convert("RGB")), np.asarray(img.convert("HSV"))
        if len(np.unique(truth)) == 1 and truth[0, 0] < 3 and (hsv[..., 1] > 40).mean() >= 0.9:
            tiles[int(truth[0, 0])].append(pixels)
    assert all(len(t) >= 8 for t in tiles.values()), {k: len(t) for k, t in tiles.items()}
    return tiles


# A "tiny" preset for whole-chain tests: a 1/8-width ResNet38 and a ResNet-18 DeepLab on 32-px inputs, one epoch.
TINY1 = {"width": 0.125, "image_size": 32, "epochs": 1, "batch_size": 8, "workers": 0, "pda_norm": "max"}
TINY2 = {"backbone": "resnet18", "head_channels": 16, "image_size": 32, "epochs": 1, "batch_size": 8, "workers": 0}


@pytest.fixture
def tiny_presets(monkeypatch):
    """``--preset tiny`` for this test (both training stages; the pseudo-masks as the paper's)."""
    from wsss.config import PM_PRESETS, STAGE1_PRESETS, STAGE2_PRESETS

    monkeypatch.setitem(STAGE1_PRESETS, "tiny", TINY1)
    monkeypatch.setitem(PM_PRESETS, "tiny", {})
    monkeypatch.setitem(STAGE2_PRESETS, "tiny", TINY2)
