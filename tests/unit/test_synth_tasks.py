"""Random synthetic tasks (``wsss synth --task-seed``) and drawing at a given µm/px (``--mpp``):
reproducible from their seed, classes that differ measurably, the tissue at the asked pixel size."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from scipy import ndimage

from helpers import run_cli
from wsss.data import synth
from wsss.data.tasks import Task, appearance_distance, min_distance, render, sample_task


def _files(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.png"))}


def test_a_task_is_reproducible_from_its_seed(tmp_path):
    kw = dict(n_train=6, n_val=2, n_test=2, size=48, seed=1, workers=1, progress=False)
    a = synth.generate(tmp_path / "a", task=sample_task(3, 4), **kw)
    synth.generate(tmp_path / "b", task=sample_task(3, 4), **kw)
    synth.generate(tmp_path / "c", task=sample_task(4, 4), **kw)
    synth.generate(tmp_path / "d", **kw)
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    others = [_files(tmp_path / name) for name in ("c", "d")]
    for other in others:  # same patch seeds: only the class appearances differ
        assert all(other[k] != v for k, v in _files(tmp_path / "a").items() if "/train/" in f"/{k}")
    assert Task.from_dict(a["task"]) == sample_task(3, 4)


def test_tasks_keep_their_classes_apart_by_the_difficulty():
    for seed in range(8):
        for difficulty in (0.0, 0.5, 1.0):
            task = sample_task(seed, 4, difficulty)
            gaps = [appearance_distance(a, b) for a, b in itertools.combinations(task.classes, 2)]
            assert min(gaps) >= min_distance(difficulty) - 1e-9
    # harder tasks let classes come closer and regions be smaller
    assert min_distance(1.0) < min_distance(0.5) < min_distance(0.0)
    assert sample_task(0, 4, 1.0).min_region < sample_task(0, 4, 0.0).min_region


# ----------------------------------------------------------------------------- texture statistics
# Computed here from the definitions (Beer-Lambert optical density, Otsu's threshold, connected
# components, the gradient structure tensor), independently of the generator.


def _otsu(x: np.ndarray) -> float:
    hist, edges = np.histogram(x, 128)
    p, centres = hist / hist.sum(), (edges[:-1] + edges[1:]) / 2
    w, m = np.cumsum(p), np.cumsum(p * centres)
    between = (m[-1] * w - m) ** 2 / (w * (1 - w) + 1e-12)
    return float(centres[np.argmax(between)])


def _texture_statistics(rgb: np.ndarray) -> np.ndarray:
    """Nuclear area fraction, median nucleus area, nucleus count, orientation coherence, eosin to
    haematoxylin density ratio and relative contrast of one RGB patch."""
    od = -np.log((rgb.astype(np.float64) + 1) / 256)
    red, green = od[..., 0], od[..., 1]  # haematoxylin absorbs red most, eosin green
    nuclei = ndimage.binary_opening(red > _otsu(red))
    labels, n = ndimage.label(nuclei)
    areas = np.bincount(labels.ravel())[1:]
    gy, gx = np.gradient(ndimage.gaussian_filter(green, 1.0))
    jxx, jyy, jxy = (ndimage.gaussian_filter(a, 6) for a in (gx * gx, gy * gy, gx * gy))
    coherence = np.sqrt((jxx - jyy) ** 2 + 4 * jxy ** 2) / (jxx + jyy + 1e-9)
    return np.array([nuclei.mean(), np.log1p(np.median(areas) if n else 0.0), n / nuclei.size,
                     coherence.mean(), green.mean() / red.mean(), red.std() / red.mean()])


def _auc(a: np.ndarray, b: np.ndarray) -> float:
    """How well one number separates two sets (1: completely, 0.5: not at all), either direction."""
    greater = np.mean(a[:, None] > b[None, :]) + 0.5 * np.mean(a[:, None] == b[None, :])
    return max(greater, 1 - greater)


@pytest.mark.parametrize("task_seed", [1, 2, 3, 4, 5])
def test_classes_of_a_task_differ_measurably(task_seed):
    """Six regions of each class: for every pair of classes, one of the statistics tells them apart
    (AUC >= 0.9). These are the task seeds of the README's quality table."""
    task = sample_task(task_seed, 4)
    stats = []
    for c, app in enumerate(task.classes):
        rows = []
        for k in range(6):
            rng = np.random.default_rng(1000 * task_seed + 10 * c + k)
            h, e = render(app, rng, 224)
            rows.append(_texture_statistics(synth._stain(rng, h, e, synth.Look(), task.hue, task.stain)))
        stats.append(np.array(rows))
    for a, b in itertools.combinations(range(4), 2):
        best = max(_auc(stats[a][:, j], stats[b][:, j]) for j in range(stats[a].shape[1]))
        assert best >= 0.9, (task_seed, a, b, best)


def _median_nucleus_area(rgb: np.ndarray) -> float:
    red = -np.log((rgb[..., 0].astype(np.float64) + 1) / 256)
    labels, n = ndimage.label(ndimage.binary_opening(red > _otsu(red)))
    return float(np.median(np.bincount(labels.ravel())[1:]))


def test_mpp_draws_the_tissue_at_that_pixel_size(tmp_path):
    """Lymphocyte nuclei (the luad LYM texture) are as many pixels across on a 112-px patch drawn at
    the default's µm/px as on a 224-px patch, and a quarter of the area on a plain 112-px patch."""
    areas = {}
    for name, size, mpp in (("224", 224, None), ("112_mpp1", 112, 1.0), ("112", 112, None)):
        values = []
        for k in range(4):
            h, e = synth._lymphocytes(np.random.default_rng(k), size,
                                      1.0 if mpp is None else 224 / size * synth.REFERENCE_MPP / mpp)
            values.append(_median_nucleus_area(synth._stain(np.random.default_rng(k), h, e)))
        areas[name] = np.median(values)
    assert areas["112_mpp1"] == pytest.approx(areas["224"], rel=0.2)
    assert areas["112"] == pytest.approx(areas["224"] / 4, rel=0.3)
    summary = synth.generate(tmp_path / "d", n_train=2, n_val=1, n_test=1, size=112, mpp=1.0, workers=1,
                             progress=False)
    assert summary["mpp"] == pytest.approx(1.0)
    assert synth.generate(tmp_path / "e", n_train=2, n_val=1, n_test=1, size=112, workers=1,
                          progress=False)["mpp"] == pytest.approx(2.0)


def test_synth_cli_writes_a_task(tmp_path, capsys, monkeypatch):
    out = tmp_path / "task"
    code, _, err = run_cli(capsys, monkeypatch, "synth", out, "--train", "4", "--val", "1", "--test", "1",
                           "--size", "48", "--task-seed", "7", "--difficulty", "0.3", "--workers", "1")
    assert code == 0, err
    recorded = json.loads((out / "synth.json").read_text())
    assert Task.from_dict(recorded["task"]) == sample_task(7, 4, 0.3)


@pytest.mark.parametrize("args, message", [
    (["--task-seed", "1", "--difficulty", "1.5"], "--difficulty must be in [0, 1]"),
    (["--mpp", "0"], "--mpp must be between"),
])
def test_synth_cli_refuses_bad_task_options(tmp_path, capsys, monkeypatch, args, message):
    code, _, err = run_cli(capsys, monkeypatch, "synth", tmp_path / "x", "--train", "2", "--val", "1", "--test", "1",
                           *args)
    assert code == 1
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    assert not (tmp_path / "x").exists()
