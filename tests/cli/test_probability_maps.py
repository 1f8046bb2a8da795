"""Probability maps and tissue masks (`--save-probs`, `--save-tissue-mask`) of `wsss predict` and
`wsss predict-wsi`, and where a slide's output images lie on it (placement: OME metadata, summary).

The slide is test_wsi's: 512 × 384 px at level 0, 0.5 µm/px, tissue in the top-left quarter.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from helpers import HAVE_OPENSLIDE, run_cli, slide_pixels, spy_on_models, write_pyramid_levels
from wsss.data.specs import LUAD
from wsss.models.deeplab import DeepLabArch, DeepLabV3Plus
from wsss.probabilities import quantise
from wsss.runtime import load_checkpoint
from wsss.wsi import predict_wsi as W
from wsss.wsi.placement import Placement

TILE, OVERLAP = 64, 16


def ome(path: Path) -> tuple[dict, tifffile.TiffPageSeries, list[np.ndarray]]:
    """The OME-XML (as a dict), the first series and every pyramid level's pixels of an OME-TIFF."""
    with tifffile.TiffFile(path) as tif:
        assert tif.is_ome
        series = tif.series[0]
        return tifffile.xml2dict(tif.ome_metadata)["OME"], series, [level.asarray() for level in series.levels]


def saturation_mask(image: np.ndarray, threshold: int) -> np.ndarray:
    """Tissue by the definition: HSV saturation 255·(max − min)/max above ``threshold``."""
    rgb = image.astype(np.int64)
    hi, lo = rgb.max(axis=-1), rgb.min(axis=-1)
    return (hi - lo) * 255 // np.maximum(hi, 1) > threshold


def otsu_by_search(values: np.ndarray) -> int:
    """Otsu's threshold by trying every t: the smallest maximising w0·w1·(µ0 − µ1)²."""
    v = values.ravel().astype(np.float64)
    best, best_t = -1.0, 0
    for t in range(256):
        low, high = v[v <= t], v[v > t]
        if low.size == 0 or high.size == 0:
            continue
        score = low.size * high.size * (low.mean() - high.mean()) ** 2
        if score > best + 1e-9 * max(best, 1):
            best, best_t = score, t
    return best_t


# --------------------------------------------------------------------------- the 8-bit values


def test_quantise_rounds_to_255ths_and_keeps_the_argmax():
    # float16 of 0.4009 is 0.40087890625 (x255 = 102.22 -> 102), of 0.4012 is 0.401123046875 (102.29 -> 102):
    # rounding ties them, so the winner (class 1) is lifted to 103. 0.1 -> 0.0999755859375 (25.49 -> 25),
    # 0.9 -> 0.89990234375 (229.47 -> 229): no tie, nothing lifted.
    probs = np.array([[[0.4009, 0.1]], [[0.4012, 0.9]], [[0.1979, 0.0]]], dtype=np.float16)  # (C=3, 1, 2)
    winner = np.array([[1, 1]], dtype=np.uint8)
    q = quantise(probs, winner)
    assert q.dtype == np.uint8 and q[:, 0, 0].tolist() == [102, 103, 50] and q[:, 0, 1].tolist() == [25, 229, 0]
    assert quantise(probs, winner, np.array([[True, False]]))[:, 0, 1].tolist() == [0, 0, 0]


# --------------------------------------------------------------------------- predict


def test_predict_writes_probabilities_whose_argmax_is_the_mask_and_a_tissue_mask(thin_ckpts, tmp_path, capsys,
                                                                                   monkeypatch):
    # one window covers the whole 64 x 64 image: the probabilities are that window's softmax
    rng = np.random.default_rng(3)
    image = (rng.integers(0, 60, (64, 64, 3)) + np.array([170, 40, 150])).astype(np.uint8)
    image[:, 40:] = 235  # glass: white background in the mask, not tissue
    Image.fromarray(image).save(tmp_path / "a.png")
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, monkeypatch, "predict", tmp_path / "a.png", "--checkpoint", thin_ckpts["s2"],
                           "--out", out, "--tile", TILE, "--overlap", OVERLAP, "--device", "cpu", "--save-probs",
                           "--save-tissue-mask", "--mpp", 0.5)
    assert code == 0, err
    meta, series, levels = ome(out / "a_probs.ome.tif")
    assert series.axes == "CYX" and levels[0].shape == (4, 64, 64) and levels[0].dtype == np.uint8
    pixels = meta["Image"]["Pixels"]  # the image's µm/px (--mpp here), for QuPath
    assert (pixels["PhysicalSizeX"], pixels["PhysicalSizeY"]) == (0.5, 0.5)
    channels = meta["Image"]["Pixels"]["Channel"]
    assert [c["Name"] for c in channels] == list(LUAD.classes)
    with Image.open(out / "a_mask.png") as img:
        mask = np.asarray(img)
    tissue = mask < 4
    assert tissue.any() and (~tissue).any()
    assert np.array_equal(levels[0].argmax(axis=0)[tissue], mask[tissue])

    # the window's softmax, from the model itself: PIL's bilinear resize to the trained 32 px, [0, 1]
    ckpt = load_checkpoint(thin_ckpts["s2"])
    model = DeepLabV3Plus(DeepLabArch.from_dict(ckpt["arch"]))
    model.load_state_dict(ckpt["model"])
    x = torch.from_numpy(np.asarray(Image.fromarray(image).resize((32, 32), Image.BILINEAR)).copy())
    with torch.no_grad():
        p = model.eval()(x.permute(2, 0, 1)[None].float() / 255, size=(64, 64))["out"].softmax(dim=1)[0]
    expected = np.rint(p.half().float().numpy() * 255).astype(np.int64)
    diff = np.abs(levels[0].astype(np.int64) - expected)
    assert diff.max() <= 1 and (diff == 0).mean() > 0.99  # 1: a winner lifted above a rounding tie

    with Image.open(out / "a_tissue.png") as img:
        assert img.mode == "L"
        saved = np.asarray(img)
    assert set(np.unique(saved)) <= {0, 255}
    assert np.array_equal(saved == 255, saturation_mask(image, max(otsu_by_search(saturation_mask_values(image)), 20)))


def saturation_mask_values(image: np.ndarray) -> np.ndarray:
    rgb = image.astype(np.int64)
    hi, lo = rgb.max(axis=-1), rgb.min(axis=-1)
    return (hi - lo) * 255 // np.maximum(hi, 1)


# --------------------------------------------------------------------------- predict-wsi


@pytest.fixture(scope="module")
def slide(tmp_path_factory) -> tuple[Path, list[np.ndarray]]:
    path = tmp_path_factory.mktemp("probs_wsi") / "slide.tif"
    return path, write_pyramid_levels(path, slide_pixels())


def _wsi(slide_path, ckpt, out, *extra):
    return ("predict-wsi", slide_path, "--checkpoint", ckpt, "--out", out, "--tile", TILE, "--overlap", OVERLAP,
            "--device", "cpu", *extra)


@pytest.mark.skipif(not HAVE_OPENSLIDE, reason="needs OpenSlide (the bounds of a cropped slide)")
def test_predict_wsi_probability_and_tissue_images_lie_where_the_region_is(slide, thin_ckpts, tmp_path, capsys,
                                                                           monkeypatch):
    import openslide

    path, levels = slide
    properties = openslide.OpenSlide.properties

    def with_bounds(self):  # a slide QuPath shows cropped, its (0, 0) at OpenSlide's (10, 4)
        return {**properties.fget(self), "openslide.bounds-x": "10", "openslide.bounds-y": "4",
                "openslide.bounds-width": "500", "openslide.bounds-height": "380"}

    monkeypatch.setattr(openslide.OpenSlide, "properties", property(with_bounds))
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, monkeypatch, *_wsi(path, thin_ckpts["s2"], out, "--level", 0, "--roi",
                                                      "40,20,400,300", "--reader", "openslide", "--mask-format",
                                                      "ome-tiff", "--save-probs", "--save-tissue-mask"))
    assert code == 0, err
    summary = json.loads((out / "slide_summary.json").read_text())
    assert (summary["probs"], summary["tissue_mask"]) == ("slide_probs.ome.tif", "slide_tissue.ome.tif")
    # level 0 at 0.5 µm/px: the region's corner (40, 20) is 20 × 10 µm from the slide's; QuPath's (0, 0)
    # is (10, 4), so there the corner is (30, 16), and QuPath's pixels map to the image's by -30, -16
    assert summary["placement"] == {"origin": [40.0, 20.0], "origin_qupath": [30.0, 16.0], "origin_um": [20.0, 10.0],
                                    "downsample": [1.0, 1.0], "mpp": [0.5, 0.5],
                                    "qupath_affine": [[1.0, 0.0, -30.0], [0.0, 1.0, -16.0]]}

    labels_meta, _, label_levels = ome(out / "slide_mask.ome.tif")
    meta, series, prob_levels = ome(out / "slide_probs.ome.tif")
    labels, probs = label_levels[0], prob_levels[0]
    assert series.axes == "CYX" and probs.shape == (4, 300, 400) and len(prob_levels) == 2
    assert [c["Name"] for c in meta["Image"]["Pixels"]["Channel"]] == list(LUAD.classes)
    segmented = labels < 4
    assert segmented.any() and np.array_equal(probs.argmax(axis=0)[segmented], labels[segmented])
    assert np.array_equal(prob_levels[1].argmax(axis=0)[labels[::2, ::2] < 4], labels[::2, ::2][labels[::2, ::2] < 4])
    # pixels no window reached are 0 in every channel; segmented pixels sum to about 255
    skipped = np.zeros_like(segmented)
    # tissue ends at region column 216: windows at columns 0, 48, ..., 192 are segmented, those from 240
    # on are not, so no segmented window reaches columns 256 (192 + 64) and on
    skipped[:, 256:] = True
    assert np.all(probs[:, skipped] == 0) and np.all(labels[skipped] == 4) and (probs[:, :, 255] > 0).any()
    assert np.abs(probs.sum(axis=0, dtype=np.int64)[segmented] - 255).max() <= 4

    for m in (meta, labels_meta):
        pixels = m["Image"]["Pixels"]
        assert (pixels["PhysicalSizeX"], pixels["PhysicalSizeY"]) == (0.5, 0.5)
        planes = pixels["Plane"] if isinstance(pixels["Plane"], list) else [pixels["Plane"]]
        assert {(p["PositionX"], p["PositionY"]) for p in planes} == {(20.0, 10.0)}
        annotations = m["StructuredAnnotations"]["MapAnnotation"]
        annotations = annotations if isinstance(annotations, list) else [annotations]
        placement = next(a for a in annotations if a["Namespace"] == "wsss/placement")
        values = {e["K"]: e["value"] for e in placement["Value"]["M"]}
        assert (values["origin_x"], values["origin_y"], values["qupath_origin_x"], values["qupath_origin_y"]) == \
            (40.0, 20.0, 30.0, 16.0)  # tifffile reads the numbers back as numbers

    _, _, tissue_levels = ome(out / "slide_tissue.ome.tif")
    region = levels[0][20:320, 40:440]
    assert np.array_equal(tissue_levels[0] == 255, saturation_mask(region, summary["tissue_threshold"]))


def test_probability_maps_resume_bit_for_bit(slide, thin_ckpts, tmp_path, capsys, monkeypatch):
    path, _ = slide
    spies, arm = spy_on_models(monkeypatch, W)
    args = ("--level", 1, "--min-tissue", 0, "--batch-size", 5, "--save-probs", "--save-tissue-mask")
    arm(None)
    assert run_cli(capsys, monkeypatch, *_wsi(path, thin_ckpts["s2"], tmp_path / "once", *args))[0] == 0
    arm(3)  # stopped in the third window row
    code, _, _ = run_cli(capsys, monkeypatch, *_wsi(path, thin_ckpts["s2"], tmp_path / "twice", *args))
    assert code != 0 and (tmp_path / "twice" / "slide_partial" / "probs.npy").is_file()
    arm(None)
    assert run_cli(capsys, monkeypatch, *_wsi(path, thin_ckpts["s2"], tmp_path / "twice", *args))[0] == 0
    assert spies[-1].calls < spies[0].calls  # continued, not started over
    for name in ("slide_probs.ome.tif", "slide_tissue.png", "slide_mask.png"):
        assert (tmp_path / "once" / name).read_bytes() == (tmp_path / "twice" / name).read_bytes(), name


def test_a_run_without_the_new_outputs_keeps_its_old_fingerprint(slide, thin_ckpts, tmp_path):
    """Slides a cohort finished before --save-probs existed are not run again."""
    path, _ = slide
    cfg = W.WsiConfig(inputs=(path,), checkpoint=thin_ckpts["s2"], out=tmp_path)
    job = W.SlideJob(path, tmp_path, "slide")
    assert set(W.job_fingerprint(cfg, job, LUAD)["outputs"]) == {"mask_format", "geojson"}
    asked = W.WsiConfig(inputs=(path,), checkpoint=thin_ckpts["s2"], out=tmp_path, save_probs=True)
    assert W.job_fingerprint(asked, job, LUAD)["outputs"]["save_probs"] is True


def test_placement_of_a_resized_region():
    # label pixels of 3 level-0 px (x) and 2 (y) from (90, 60); QuPath's picture starts at (30, 0)
    p = Placement((90.0, 60.0), (3.0, 2.0), (1.5, 1.0), (30.0, 0.0))
    assert p.origin_um == (45.0, 30.0)  # 0.5 µm per level-0 px
    assert p.qupath_affine() == [[1 / 3, 0.0, -20.0], [0.0, 0.5, -30.0]]  # (90 - 30) / 3, 60 / 2


def test_a_cohort_writes_each_slides_probabilities_in_its_folder(slide, thin_ckpts, tmp_path, capsys, monkeypatch):
    path, _ = slide
    folder = tmp_path / "slides"
    folder.mkdir()
    (folder / "a.tif").write_bytes(path.read_bytes())
    code, _, err = run_cli(capsys, monkeypatch, *_wsi(folder, thin_ckpts["s2"], tmp_path / "out", "--level", 2,
                                                      "--save-probs"))
    assert code == 0, err
    _, series, levels = ome(tmp_path / "out" / "a" / "a_probs.ome.tif")
    assert levels[0].shape == (4, 96, 128)
    assert json.loads((tmp_path / "out" / "a" / "a_summary.json").read_text())["probs"] == "a_probs.ome.tif"
