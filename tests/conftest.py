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
    from wsss.config import Stage1Config, Stage2Config
    from wsss.models.deeplab import DeepLabArch, DeepLabV3Plus
    from wsss.models.resnet38 import ResNet38Classifier
    from wsss.runtime import save_checkpoint
    from wsss.stages import stage1, stage2

    root = tmp_path_factory.mktemp("thin_ckpts")
    paths = {}
    for name, seed in (("s1a", 0), ("s1b", 1)):
        torch.manual_seed(seed)
        cfg = Stage1Config(dataset="luad", data=Path("."), width=0.125, image_size=32)
        paths[name] = root / f"{name}.pth"
        save_checkpoint(paths[name], stage1.checkpoint_state(ResNet38Classifier(4, width=0.125), cfg, LUAD, 0))
    torch.manual_seed(0)
    model = DeepLabV3Plus(DeepLabArch("resnet18", 16, 4, 8))
    cfg = Stage2Config(dataset="luad", data=Path("."), backbone="resnet18", head_channels=8, image_size=32)
    paths["s2"] = root / "s2.pth"
    save_checkpoint(paths["s2"], stage2.checkpoint_state(model, cfg, LUAD, 0, {}))
    return paths


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
