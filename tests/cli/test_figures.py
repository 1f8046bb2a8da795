"""``wsss figures``: patch choice, the PM columns equal generate-pm's masks, prediction columns, CAM rows, CLI."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import run_cli
from gradcam_oracle import make_classifier
from wsss.models import loading
from wsss.config import Stage1Config
from wsss.data.datasets import resize_rgb, to_tensor
from wsss.data.labels import format_label
from wsss.data.layout import list_masked, list_train, pseudo_mask_path
from wsss.data.png import read_mask, read_rgb, write_mask
from wsss.data.specs import LUAD
from wsss.figures import (
    MISSING_GREY,
    OUTLINE,
    cam_figure,
    evaluation_cams,
    examples_figure,
    mask_label,
    normalised_gradcams,
    pick_covering,
    pick_per_class,
    wrap_name,
)
from wsss.runtime import save_checkpoint
from wsss.stages import stage1
from wsss.stages.pseudo_masks import PseudoMaskConfig, generate
from wsss.viz import heatmap_overlay

LAYERS = ("b4_5", "b5_2", "bn7")
SIZE = 48  # patch side; also the cell side below, so every cell holds the picture pixel for pixel
GAP = 4  # wsss.viz.grid's default gap
TITLE_H = 18  # wsss.viz.grid's title row


# --------------------------------------------------------------------------- pure helpers


def test_pick_covering_takes_new_classes_then_fills_in_order():
    labels = [(1, 0, 0), (1, 0, 0), (0, 1, 0), (1, 1, 0), (0, 0, 1), (0, 1, 0)]
    assert pick_covering(labels, 6, 4) == [0, 1, 2, 4]  # 0, 2, 4 show all classes; 1 fills up
    assert pick_covering(labels, 6, 2) == [0, 2]
    assert pick_covering(labels, 6, 9) == [0, 1, 2, 3, 4, 5]
    assert pick_covering([(0, 0), (0, 0), (0, 1)], 3, 2) == [0, 2]  # an empty label shows nothing


def test_pick_covering_stops_reading_once_every_class_is_shown():
    def labels():
        yield from [(1, 0), (1, 0), (0, 1)]
        raise AssertionError("read past the patch that completed the classes")

    assert pick_covering(labels(), 5, 3) == [0, 1, 2]


def test_pick_per_class_prefers_two_class_patches():
    labels = [(1, 1, 1, 0), (1, 0, 0, 0), (1, 1, 0, 0), (0, 1, 1, 0), (0, 0, 1, 0), (0, 0, 0, 1), (1, 0, 0, 1, )]
    # class 0: patch 2 (two classes) beats 1 (one) and 0 (three); class 1: 2 is taken, 3 carries
    # two; class 2: 3 is taken, 4 (one class) beats 0 (three); class 3: patch 6 (two) beats 5 (one)
    assert pick_per_class(labels, 4) == {0: 2, 1: 3, 2: 4, 3: 6}
    # a patch is shown twice only when nothing else carries the class
    assert pick_per_class([(1, 1, 0, 0)], 4) == {0: 0, 1: 0}
    # without two-class patches: the fewest classes; a class nobody carries is left out
    assert pick_per_class([(1, 1, 1, 0), (1, 0, 0, 0)], 4) == {0: 1, 1: 0, 2: 0}


def test_mask_label_lists_present_tissue_classes_only():
    assert mask_label(np.array([[0, 4], [2, 2]]), 4) == (1, 0, 1, 0)
    assert mask_label(np.full((2, 2), 4), 4) == (0, 0, 0, 0)


def test_wrap_name_breaks_after_separators():
    assert wrap_name("synth-test-000001") == "synth-test-000001"
    assert wrap_name("TCGA-A1-A0SK-DX1_xmin45749_ymin25055_MPP-0.2500") == \
        "TCGA-A1-A0SK-DX1_\nxmin45749_\nymin25055_MPP-\n0.2500"
    assert wrap_name("a" * 20, width=8) == "aaaaaaaa\naaaaaaaa\naaaa"


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory) -> Path:
    """Seed 0: the 8 training labels cover all four classes; test patch 1 holds white background."""
    from wsss.data.synth import generate as synth

    root = tmp_path_factory.mktemp("fig") / "data"
    synth(root, n_train=8, n_val=1, n_test=5, size=SIZE, seed=0, workers=1, progress=False)
    return root


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A thin random classifier whose checkpoint says 32-px input with ImageNet normalisation."""
    folder = tmp_path_factory.mktemp("fig_ckpt")
    cfg = Stage1Config(dataset="luad", data=folder, width=0.125, image_size=32, input_norm="imagenet")
    save_checkpoint(folder / "s1.pth", stage1.checkpoint_state(make_classifier(seed=3), cfg, LUAD, 0))
    return folder / "s1.pth"


@pytest.fixture(scope="module")
def pred_dir(synth_root, tmp_path_factory) -> Path:
    """Stand-in stage-2 predictions: every test mask shifted by one class, so they differ from the truth."""
    folder = tmp_path_factory.mktemp("fig_pred") / "pred"
    for sample in list_masked(synth_root, "test"):
        mask = read_mask(sample.mask)
        write_mask(folder / f"{sample.image.stem}.png", np.where(mask < 4, (mask + 1) % 4, 4), LUAD.flat_palette())
    return folder


def cells(path: Path, rows: int, cols: int) -> list[list[np.ndarray]]:
    """Cut a figure drawn at ``cell=SIZE`` into its ``rows × cols`` pictures.

    The first picture starts right of the row titles: found from the grey frame drawn around each
    picture, whose top line runs 1 px above the first row.
    """
    img = np.asarray(Image.open(path).convert("RGB"))
    frame_line = (img[TITLE_H + GAP - 1] == OUTLINE).all(axis=1)
    left = int(np.argmax(frame_line)) + 1
    assert frame_line.any() and left > GAP + 1  # frames drawn, row titles present
    assert img.shape[0] > TITLE_H + rows * (SIZE + GAP)
    out = []
    for r in range(rows):
        y = TITLE_H + GAP + r * (SIZE + GAP)
        out.append([img[y:y + SIZE, left + c * (SIZE + GAP):][:, :SIZE] for c in range(cols)])
        right = left + cols * SIZE + (cols - 1) * GAP + 1  # past the last picture and its frame
        assert img[y:y + SIZE, right:].size and img[y:y + SIZE, right:].min() == 255  # no further column
    return out


def picked_samples(root: Path, n: int):
    samples = list_masked(root, "test")
    labels = [mask_label(read_mask(s.mask), 4) for s in samples]
    return [samples[i] for i in pick_covering(labels, len(samples), n)]


def colours(mask: np.ndarray) -> np.ndarray:
    return np.asarray(LUAD.palette, dtype=np.uint8)[mask]


# --------------------------------------------------------------------------- examples.png


def test_examples_columns_hold_image_truth_generate_pm_masks_and_predictions(synth_root, checkpoint, pred_dir,
                                                                           tmp_path):
    out = examples_figure(LUAD, synth_root, checkpoint, {"stage 2": pred_dir}, tmp_path / "r" / "examples.png",
                          n=4, cell=SIZE)
    picked = picked_samples(synth_root, 4)
    # test patches 0-2 show LYM, NEC and TAS, patch 3 nothing new, patch 4 adds TE
    assert [s.image.stem for s in picked] == [f"synth-test-00000{i}" for i in (0, 1, 2, 4)]
    grid_cells = cells(out, 4, 2 + len(LAYERS) + 1)

    # generate-pm on a copy of the chosen test patches named with their ground-truth classes
    pm_root = tmp_path / "pm_data"
    for sample in picked:
        label = mask_label(read_mask(sample.mask), 4)
        (pm_root / "train").mkdir(parents=True, exist_ok=True)
        shutil.copy(sample.image, pm_root / "train" / f"{sample.image.stem}-{format_label(label)}.png")
    generate(PseudoMaskConfig(dataset="luad", data=pm_root, checkpoint=checkpoint, layers=LAYERS,
                              out=tmp_path / "pm", batch_size=1, device="cpu", workers=0), progress=False)
    train = {s.path.name.split("-[")[0]: s.path for s in list_train(pm_root, 4)}

    saw_background = False
    for row, sample in zip(grid_cells, picked):
        truth = read_mask(sample.mask)
        np.testing.assert_array_equal(row[0], read_rgb(sample.image))
        np.testing.assert_array_equal(row[1], colours(truth))
        for col, layer in enumerate(LAYERS, start=2):
            pm = read_mask(pseudo_mask_path(tmp_path / "pm", layer, train[sample.image.stem]))
            np.testing.assert_array_equal(row[col], colours(pm), err_msg=f"{layer} {sample.image.name}")
            saw_background |= bool((pm == 4).any())
        np.testing.assert_array_equal(row[5], colours(read_mask(pred_dir / f"{sample.image.stem}.png")))
        assert not np.array_equal(row[5], row[1])
    assert saw_background  # the white-background rule of generate-pm was exercised


def test_missing_prediction_folder_drops_its_column(synth_root, checkpoint, pred_dir, tmp_path):
    both = examples_figure(LUAD, synth_root, checkpoint, {"a": pred_dir, "b": pred_dir}, tmp_path / "both.png",
                           n=2, cell=SIZE)
    gone = examples_figure(LUAD, synth_root, checkpoint, {"a": pred_dir, "b": tmp_path / "no_such"},
                           tmp_path / "gone.png", n=2, cell=SIZE)
    only = examples_figure(LUAD, synth_root, checkpoint, {"a": pred_dir}, tmp_path / "only.png", n=2, cell=SIZE)
    with Image.open(both) as b, Image.open(gone) as g:
        assert b.width - g.width == SIZE + GAP and b.height == g.height
    assert np.array_equal(np.asarray(Image.open(gone)), np.asarray(Image.open(only)))


def test_missing_prediction_file_leaves_a_grey_cell(synth_root, checkpoint, pred_dir, tmp_path):
    partial = tmp_path / "partial"
    partial.mkdir()
    first, _ = picked_samples(synth_root, 2)
    shutil.copy(pred_dir / f"{first.image.stem}.png", partial)
    out = examples_figure(LUAD, synth_root, checkpoint, {"p": partial}, tmp_path / "ex.png", layers=("bn7",),
                          n=2, cell=SIZE)
    grid_cells = cells(out, 2, 4)
    np.testing.assert_array_equal(grid_cells[0][3], colours(read_mask(partial / f"{first.image.stem}.png")))
    assert (grid_cells[1][3] == MISSING_GREY).all()


# --------------------------------------------------------------------------- cams.png


def test_cam_rows_one_patch_per_class(synth_root, checkpoint, tmp_path):
    out = cam_figure(LUAD, synth_root, checkpoint, tmp_path / "cams.png", cell=SIZE)
    samples = list_train(synth_root, 4)
    chosen = pick_per_class([s.label for s in samples], 4)
    assert chosen == {0: 5, 1: 4, 2: 0, 3: 6}  # seed 0's labels (two-class patches first, each once)
    grid_cells = cells(out, 4, 2 + len(LAYERS))
    clf = loading.load_classifier(checkpoint, 4)
    for row, (cls, index) in zip(grid_cells, chosen.items()):
        image = read_rgb(samples[index].path)
        cams, _ = evaluation_cams(clf, image, torch.device("cpu"))
        gradcams = normalised_gradcams(clf, image, LAYERS, torch.device("cpu"))
        np.testing.assert_array_equal(row[0], image)
        np.testing.assert_array_equal(row[1], heatmap_overlay(image, cams[cls]))
        for col, layer in enumerate(LAYERS, start=2):
            np.testing.assert_array_equal(row[col], heatmap_overlay(image, gradcams[layer][cls]))


def test_evaluation_cams_agree_with_the_cam_evaluation(synth_root, checkpoint):
    clf = loading.load_classifier(checkpoint, 4)
    for sample in list_masked(synth_root, "test"):
        image = read_rgb(sample.image)
        cams, probs = evaluation_cams(clf, image, torch.device("cpu"))
        assert cams.shape == (4, SIZE, SIZE) and 0.0 <= cams.min() and cams.max() <= 1.0
        x = to_tensor(resize_rgb(image, clf.image_size), clf.norm)[None]
        want = stage1.predict_cams(clf.model, x, (SIZE, SIZE), 0.25)[0].numpy()
        kept = probs > 0.25
        assert kept.any()
        scores = np.where(kept[:, None, None], cams, -np.inf)
        np.testing.assert_array_equal(scores.argmax(axis=0), want)
        assert (cams[~kept] == 0).all()


# --------------------------------------------------------------------------- CLI


def test_cli_writes_both_figures(synth_root, checkpoint, pred_dir, tmp_path, capsys, monkeypatch):
    report = tmp_path / "results" / "luad"
    shutil.copytree(pred_dir, report / "pred")  # no pred_gate/: as after a --no-gate run
    code, out, err = run_cli(capsys, monkeypatch, "figures", "--dataset", "luad", "--data", synth_root,
                             "--stage1-checkpoint", checkpoint, "--report", report, "--device", "cpu")
    assert code == 0, err
    assert "examples.png" in out and "cams.png" in out
    with Image.open(report / "examples.png") as ex, Image.open(report / "cams.png") as cams:
        assert ex.format == cams.format == "PNG"
        # 8 rows asked, 5 test patches; 2 + 3 PM + 1 prediction columns at the 160-px default cell
        assert ex.height > 5 * 160 and ex.width > 6 * 160 and ex.width < 7 * 160 + 300
        assert cams.height > 4 * 160 and cams.width > 5 * 160
    assert not list(report.glob(".*tmp"))


def test_cli_bad_checkpoint_is_one_line(synth_root, tmp_path, capsys, monkeypatch):
    code, _, err = run_cli(capsys, monkeypatch, "figures", "--dataset", "luad", "--data", synth_root,
                           "--stage1-checkpoint", tmp_path / "nope.pth", "--report", tmp_path / "r")
    assert code == 1 and err.startswith("error: checkpoint not found") and "Traceback" not in err
    assert not (tmp_path / "r" / "examples.png").exists()
