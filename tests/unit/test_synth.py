"""Synthetic data set generator: layout, names, determinism, masks, label rule, colour overlap."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from wsss.data import synth
from wsss.data.labels import parse_label
from wsss.data.png import read_mask, read_rgb
from wsss.data.specs import LUAD, DatasetSpec
from wsss.errors import WsssError

SIZE = 64
COUNTS = {"n_train": 10, "n_val": 3, "n_test": 3}
REPO = Path(__file__).resolve().parents[2]


def _generate(out: Path, seed: int = 3, workers: int = 1) -> dict:
    return synth.generate(out, size=SIZE, seed=seed, workers=workers, progress=False, **COUNTS)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.png"))}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("synth") / "ds"
    return out, _generate(out)


def test_train_names_carry_the_two_percent_label(dataset):
    root, _ = dataset
    names = sorted(p.name for p in (root / "train").glob("*.png"))
    assert len(names) == COUNTS["n_train"]
    assert names == sorted(p.name for p in (root / "train_gt").glob("*.png"))
    for name in names:
        assert re.fullmatch(r"synth-\d{6}-\[[01]( [01]){3}\]\.png", name)
        label = parse_label(name, 4)
        assert label == synth.patch_label(read_mask(root / "train_gt" / name))
        assert any(label)


@pytest.mark.parametrize("split", ["val", "test"])
def test_eval_splits_pair_images_and_masks(dataset, split):
    root, _ = dataset
    imgs = sorted(p.name for p in (root / split / "img").glob("*.png"))
    assert imgs == [f"synth-{split}-{i:06d}.png" for i in range(COUNTS[f"n_{split}"])]
    assert imgs == sorted(p.name for p in (root / split / "mask").glob("*.png"))


def test_masks_are_luad_palette_pngs_of_the_right_size(dataset):
    root, _ = dataset
    masks = list((root / "train_gt").glob("*.png")) + list(root.glob("*/mask/*.png"))
    for path in masks:
        with Image.open(path) as img:
            assert img.mode == "P"
            assert img.size == (SIZE, SIZE)
            assert img.getpalette()[:15] == LUAD.flat_palette()[:15]
        assert read_mask(path).max() <= 4
    for path in list((root / "train").glob("*.png")) + list(root.glob("*/img/*.png")):
        assert read_rgb(path).shape == (SIZE, SIZE, 3)


def test_summary_counts_labels(dataset):
    root, summary = dataset
    assert summary["counts"] == {"train": 10, "val": 3, "test": 3}
    per_class = np.zeros(4, int)
    for p in (root / "train").glob("*.png"):
        per_class += parse_label(p.name, 4)
    assert list(summary["train_label_counts"].values()) == per_class.tolist()
    assert list(summary["train_label_freq"]) == list(LUAD.classes)


def test_same_seed_is_byte_identical_whatever_the_workers(dataset, tmp_path):
    root, _ = dataset
    _generate(tmp_path / "again", workers=2)
    assert _files(tmp_path / "again") == _files(root)


def test_other_seed_differs(dataset, tmp_path):
    root, _ = dataset
    _generate(tmp_path / "other", seed=4)
    assert _files(tmp_path / "other") != _files(root)


def test_rerun_replaces_stale_patches_and_refuses_foreign_images(tmp_path):
    out = tmp_path / "ds"
    (out / "train").mkdir(parents=True)
    (out / "train" / "synth-999999-[1 1 1 1].png").write_bytes(b"stale")
    synth.generate(out, 2, 0, 0, size=32, workers=1, progress=False)
    assert len(list((out / "train").glob("*.png"))) == 2
    (out / "train" / "real-[1 0 0 0].png").write_bytes(b"x")
    with pytest.raises(WsssError, match="non-synthetic"):
        synth.generate(out, 2, 0, 0, size=32, workers=1, progress=False)


@pytest.mark.parametrize("size", [48, 224])
def test_make_patch_shapes_and_ranges(size):
    image, mask = synth.make_patch(np.random.default_rng(7), size)
    assert image.shape == (size, size, 3) and image.dtype == np.uint8
    assert mask.shape == (size, size) and mask.dtype == np.uint8
    assert mask.max() <= 4
    # background must read as white glass (the pseudo-mask step thresholds grey > 200)
    if (mask == 4).any():
        assert image[mask == 4].mean() > 220


def test_make_patch_is_pure_given_the_rng():
    a = synth.make_patch(np.random.default_rng(11), 64)
    b = synth.make_patch(np.random.default_rng(11), 64)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


def test_label_rule_on_a_hand_built_mask():
    mask = np.full((10, 10), 4, np.uint8)  # 100 pixels
    mask[:5] = 0  # 50 % -> present
    mask[9, 0] = 1  # 1 % -> below 2 %, absent
    mask[9, 1:3] = 2  # exactly 2 % -> present
    assert synth.patch_label(mask) == (1, 0, 1, 0)
    assert synth.patch_label(mask, min_fraction=0.01) == (1, 1, 1, 0)
    assert synth.patch_label(np.full((4, 4), 4, np.uint8)) == (0, 0, 0, 0)


def test_labelled_patch_never_returns_an_empty_label():
    for i in range(5):
        _, mask, label = synth.labelled_patch(synth.patch_rng(0, "train", i), 48)
        assert any(label) and label == synth.patch_label(mask)


def test_class_mean_colours_overlap():
    """A nearest-class-mean colour classifier must do badly: texture has to be learned."""
    path = REPO / "bench" / "colour_baseline.py"
    spec = importlib.util.spec_from_file_location("colour_baseline", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    train = [synth.labelled_patch(synth.patch_rng(1, "train", i), 112)[:2] for i in range(60)]
    test = [synth.labelled_patch(synth.patch_rng(1, "test", i), 112)[:2] for i in range(20)]
    result = bench.colour_baseline(train, test, sigma=1.0)
    assert result["miou"] < 0.5  # typically 0.22-0.32 here


# --------------------------------------------------------------------------- any dataset spec


def _spec(n: int, **kw) -> DatasetSpec:
    return DatasetSpec(f"s{n}", tuple(f"c{i}" for i in range(n)), tuple((i, 2 * i, 3 * i) for i in range(n)), True,
                       **kw)


@pytest.mark.parametrize("n, background", [(1, None), (2, 9), (6, None), (16, None)])
def test_a_spec_of_n_classes_gets_n_textures_and_its_own_values(tmp_path, n, background):
    spec = _spec(n, background_index=background)
    bg = spec.background_index
    summary = synth.generate(tmp_path / "ds", 60 if n == 16 else 12, 2, 2, size=32, seed=1, workers=1,
                             progress=False, spec=spec)
    assert list(summary["train_label_counts"]) == list(spec.classes) and summary["spec"]["name"] == f"s{n}"
    seen = np.zeros(n, int)
    for p in sorted((tmp_path / "ds" / "train").glob("*.png")):
        label = parse_label(p.name, n)
        mask = read_mask(tmp_path / "ds" / "train_gt" / p.name)
        assert set(np.unique(mask).tolist()) <= {*range(n), bg}
        assert label == synth.patch_label(mask, n)
        seen += label
    assert (seen > 0).all()  # every class is drawn
    with Image.open(next((tmp_path / "ds" / "val" / "mask").glob("*.png"))) as img:
        assert img.getpalette()[3 * bg : 3 * bg + 3] == [255, 255, 255]


def test_more_classes_than_textures_is_a_user_error(tmp_path):
    with pytest.raises(WsssError, match=f"has {synth.MAX_CLASSES} distinct textures; the s17 spec has 17 classes"):
        synth.generate(tmp_path / "ds", 2, 1, 1, size=32, workers=1, progress=False, spec=_spec(17))


def _texture_features(image: np.ndarray) -> np.ndarray:
    """Colour-free texture statistics of a patch: the total optical density, standardised per patch
    (so stain strength and hue drop out), then its gradient and blob responses at four scales, its
    orientation coherence and its quantiles."""
    od = -np.log(np.maximum(image.astype(np.float64), 1.0) / 255.0).sum(-1)
    od = (od - od.mean()) / (od.std() + 1e-6)
    feats = []
    for sigma in (0.7, 1.5, 3.0, 6.0):
        grad = ndimage.gaussian_gradient_magnitude(od, sigma)
        blob = ndimage.gaussian_laplace(od, sigma)
        feats += [grad.mean(), grad.std(), np.abs(blob).mean(), (blob > 0.5).mean()]
    smooth = ndimage.gaussian_filter(od, 1.5)
    gy, gx = ndimage.sobel(smooth, 0), ndimage.sobel(smooth, 1)
    jxx, jyy, jxy = (gx * gx).mean(), (gy * gy).mean(), (gx * gy).mean()
    feats.append(np.sqrt((jxx - jyy) ** 2 + 4 * jxy**2) / (jxx + jyy + 1e-9))
    return np.array(feats + list(np.quantile(od, [0.05, 0.25, 0.5, 0.75, 0.95])))


def test_all_textures_are_told_apart_by_texture_alone():
    """Nearest centroid on colour-free texture statistics separates the 16 textures (chance: 1/16)."""
    def render(c: int, seed: int) -> np.ndarray:
        rng = np.random.default_rng(seed)
        h, e = synth._TEXTURES[c](rng, 96, 1.0)
        gain_h, gain_e = synth._CLASS_GAIN[c]
        return synth._stain(rng, (h * gain_h).astype(np.float32), (e * gain_e).astype(np.float32))

    n = synth.MAX_CLASSES
    train = np.array([[_texture_features(render(c, 100 * c + i)) for i in range(6)] for c in range(n)])
    mu, sd = train.reshape(-1, train.shape[-1]).mean(0), train.reshape(-1, train.shape[-1]).std(0) + 1e-9
    centroids = ((train - mu) / sd).mean(1)
    right = 0
    for c in range(n):
        for i in range(4):
            x = (_texture_features(render(c, 100 * c + 50 + i)) - mu) / sd
            right += int(((centroids - x) ** 2).sum(1).argmin() == c)
    assert right / (4 * n) > 0.7


def _signal_dispositions(job) -> tuple[bool, bool]:
    """Stands in for a synth job inside a pool worker: how the worker handles SIGTERM and SIGINT."""
    import signal

    return signal.getsignal(signal.SIGTERM) is signal.SIG_DFL, signal.getsignal(signal.SIGINT) is signal.SIG_IGN


def test_pool_workers_end_silently_whatever_handlers_the_command_line_installed(monkeypatch):
    # the command line's handlers raise in whatever process they run in; a forked worker that kept them
    # printed a KeyboardInterrupt traceback when the pool shut it down with SIGTERM
    import signal

    def raising(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, raising)
    monkeypatch.setattr(synth, "_write_one", _signal_dispositions)
    try:
        results = list(synth._run_jobs(list(range(4)), workers=2))
        assert signal.getsignal(signal.SIGTERM) is raising  # the parent's handler is back
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert results == [(True, True)] * 4


def test_synth_with_workers_writes_no_traceback(tmp_path):
    import subprocess
    import sys

    for run in range(2):  # the pool's shutdown raced its workers: a traceback in about half of the runs
        out = tmp_path / f"ds{run}"
        done = subprocess.run([sys.executable, "-m", "wsss", "synth", str(out), "--train", "40", "--val", "8",
                               "--test", "8", "--size", "32", "--workers", "2"], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        assert "Traceback" not in done.stderr and "KeyboardInterrupt" not in done.stderr, done.stderr
        assert len(list((out / "train").glob("*.png"))) == 40
