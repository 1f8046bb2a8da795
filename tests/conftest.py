"""Shared fixtures: tiny copies of the LUAD-HistoSeg and BCSS-WSSS layouts, built on the fly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from wsss.data.specs import BCSS, LUAD

@pytest.fixture(autouse=True)
def one_thread():
    """The tests run thin models on tiny inputs: ops too small for intra-op threads, and on a busy
    2-core machine two OpenMP threads mostly wait on each other (ten times slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


@pytest.fixture
def luad_root(tmp_path: Path) -> Path:
    return build_layout(tmp_path / "LUAD-HistoSeg", LUAD_TRAIN_NAMES, LUAD)


@pytest.fixture
def bcss_root(tmp_path: Path) -> Path:
    # BCSS copies are often distributed with valid/ instead of val/.
    return build_layout(tmp_path / "BCSS-WSSS", BCSS_TRAIN_NAMES, BCSS, val_dir="valid")
