"""Magnification belongs to the model: a dataset's µm/px (spec, dataset.json, synth.json) and patch
size go into every checkpoint; `predict` takes the checkpoint's patch size as its window and resamples
images given `--mpp` to the model's µm/px; `predict-wsi` reads slides at it unless told otherwise."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import record_calls, run_cli, tiny_checkpoint, write_pyramid
from wsss.config import Stage1Config
from wsss.data.scale import dataset_mpp, recorded_scale
from wsss.data.specs import LUAD
from wsss import inference
from wsss.errors import WsssError
from wsss.models.resnet38 import ResNet38Classifier
from wsss.runtime import load_checkpoint
from wsss.stages import stage1


def _dataset(folder: Path, patch: int, mpp: float | None) -> Path:
    """A dataset folder as extract-patches leaves it: one training patch of ``patch`` px, dataset.json."""
    (folder / "train").mkdir(parents=True)
    Image.new("RGB", (patch, patch), (200, 100, 180)).save(folder / "train" / "p-[1 0 0 0].png")
    (folder / "dataset.json").write_text(json.dumps({"mpp": mpp}))
    return folder


def _segmenter(path: Path, data: Path) -> Path:
    return tiny_checkpoint(path, 2, image_size=None, data=data)


def test_checkpoints_record_the_datasets_mpp_and_patch_size(synth16, tmp_path):
    # wsss synth without --mpp draws a 224-px field on every patch: 224 / 32 = 7 µm/px on its 32-px patches
    cfg = Stage1Config(dataset="luad", data=synth16, width=0.125)
    state = stage1.checkpoint_state(ResNet38Classifier(4, width=0.125), cfg, LUAD, 0)
    assert (state["mpp"], state["patch_size"]) == (7.0, 32) and recorded_scale(state) == (7.0, 32)
    data = _dataset(tmp_path / "d", 96, 0.5)
    seg = load_checkpoint(_segmenter(tmp_path / "s2.pth", data))
    assert (seg["mpp"], seg["patch_size"]) == (0.5, 96)
    # older checkpoints record neither
    assert recorded_scale({"stage": 2}) == (None, None)


def test_a_datasets_mpp_comes_from_its_spec_dataset_json_or_synth_json_and_they_must_agree(synth16, tmp_path):
    data = tmp_path / "d"
    shutil.copytree(synth16, data)
    assert dataset_mpp(LUAD, data) == 7.0
    assert dataset_mpp(LUAD.with_mpp(7.2), data) == 7.2  # within 5%: the spec's
    with pytest.raises(WsssError, match="the spec luad says the patches are at 1 µm/px, .*synth.json says 7"):
        dataset_mpp(LUAD.with_mpp(1.0), data)
    (data / "dataset.json").write_text(json.dumps({"mpp": 2.0}))
    with pytest.raises(WsssError, match="dataset.json says the patches are at 2 µm/px, .*synth.json says 7"):
        dataset_mpp(LUAD, data)
    (data / "synth.json").unlink()
    assert dataset_mpp(LUAD, data) == 2.0
    (data / "dataset.json").unlink()
    assert dataset_mpp(LUAD, data) is None


@pytest.fixture
def model96(tmp_path) -> Path:
    """A stage-2 checkpoint trained (untrained, recorded as) on 96-px patches at 1 µm/px."""
    return _segmenter(tmp_path / "model.pth", _dataset(tmp_path / "data96", 96, 1.0))


def test_predict_takes_the_checkpoints_patch_size_as_its_window(model96, tmp_path, capsys, monkeypatch, caplog):
    """The 96-px-patch model segments a 96-px image with --checkpoint alone (a 224-px window refused it)."""
    Image.new("RGB", (96, 96), (200, 100, 180)).save(tmp_path / "image.png")
    calls = record_calls(monkeypatch, inference, "predict_mask", inference.predict_mask)
    code, out, err = run_cli(capsys, monkeypatch, "predict", tmp_path / "image.png", "--checkpoint", model96,
                             "--out", tmp_path / "o", "--device", "cpu")
    assert code == 0, err
    (image, _, tile, overlap, *_), _ = calls[0]
    assert image.shape == (96, 96, 3) and (tile, overlap) == (96, 32)
    assert np.asarray(Image.open(tmp_path / "o" / "image_mask.png")).shape == (96, 96)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings == ["warning: the images' µm/px is not known (--mpp, or recorded in the file): they are taken to "
                        "be at the model's 1 µm/px (pass --mpp to have them resampled to it)"]


def test_predict_resamples_images_to_the_models_mpp(model96, thin_ckpts, tmp_path, capsys, monkeypatch, caplog):
    Image.new("RGB", (200, 160), (200, 100, 180)).save(tmp_path / "half.png")  # at 0.5 µm/px: 100 × 80 at 1
    calls = record_calls(monkeypatch, inference, "predict_mask", inference.predict_mask)
    for mpp, seen in ((0.5, (80, 100)), (1.04, (160, 200)), (2.0, (320, 400))):  # 1.04: within 5%, as it is
        code, _, err = run_cli(capsys, monkeypatch, "predict", tmp_path / "half.png", "--checkpoint", model96,
                               "--out", tmp_path / f"o{mpp}", "--device", "cpu", "--mpp", mpp)
        assert code == 0, err
        assert calls[-1][0][0].shape[:2] == seen
        assert np.asarray(Image.open(tmp_path / f"o{mpp}" / "half_mask.png")).shape == (160, 200)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    # neither known (a checkpoint without mpp, no --mpp): one warning for all the images
    Image.new("RGB", (64, 64), (200, 100, 180)).save(tmp_path / "other.png")
    code, _, err = run_cli(capsys, monkeypatch, "predict", tmp_path / "half.png", tmp_path / "other.png",
                           "--checkpoint", thin_ckpts["s2"], "--out", tmp_path / "p", "--device", "cpu", "--tile", 64)
    assert code == 0, err
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith("warning: neither the images' µm/px (--mpp) nor that of")
    code, _, err = run_cli(capsys, monkeypatch, "predict", tmp_path / "half.png", "--checkpoint", model96, "--out",
                           tmp_path / "q", "--device", "cpu", "--mpp", 0)
    assert code == 1 and "--mpp is µm per pixel, a number from 0.05 to 100, not 0.0" in err


def _tiff(path: Path, **kwargs) -> Path:
    """A 200 × 160 px RGB TIFF written by tifffile with ``kwargs`` (its µm/px records)."""
    import tifffile

    tifffile.imwrite(path, np.full((160, 200, 3), (200, 100, 180), np.uint8), photometric="rgb", **kwargs)
    return path


def test_predict_reads_the_mpp_a_tiff_records(model96, tmp_path, capsys, monkeypatch, caplog):
    """OME-XML, ImageJ's calibration and resolution tags in centimetres give an image's µm/px (the
    model is at 1 µm/px: 200 × 160 px at 0.5 µm/px is 100 × 80 there); a 300-dpi tag is a print
    resolution, not taken; --mpp fills in for images that record none and does not override one that
    does (one warning)."""
    ome = _tiff(tmp_path / "ome.ome.tif", metadata={"axes": "YXS", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5})
    imagej = _tiff(tmp_path / "ij.tif", imagej=True, resolution=(2.0, 2.0), metadata={"unit": "micron"})
    cm = _tiff(tmp_path / "cm.tif", resolution=(5000.0, 5000.0), resolutionunit="CENTIMETER")  # 2 µm/px
    dpi = _tiff(tmp_path / "dpi.tif", resolution=(300.0, 300.0), resolutionunit="INCH")  # 84.7 µm/px: not a scan
    calls = record_calls(monkeypatch, inference, "predict_mask", inference.predict_mask)
    code, _, err = run_cli(capsys, monkeypatch, "predict", ome, imagej, cm, dpi, "--checkpoint", model96, "--out",
                           tmp_path / "o", "--device", "cpu", "--mpp", 0.5)
    assert code == 0, err
    seen = [c[0][0].shape[:2] for c in calls]
    assert seen == [(80, 100), (80, 100), (320, 400), (80, 100)]  # dpi.tif: --mpp 0.5
    assert np.asarray(Image.open(tmp_path / "o" / "cm_mask.png")).shape == (160, 200)
    assert (tmp_path / "o" / "ome.ome_mask.png").is_file()  # <name>.<ext> → <name>_mask.png, as documented
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "cm.tif records 2 µm/px; --mpp 0.5 is for images that record none, so the recorded value is used" \
        in warnings[0]
    # without --mpp only dpi.tif is unknown: taken at the model's µm/px, one warning naming how many
    caplog.clear()
    calls.clear()
    code, _, err = run_cli(capsys, monkeypatch, "predict", cm, dpi, "--checkpoint", model96, "--out", tmp_path / "p",
                           "--device", "cpu")
    assert code == 0, err
    assert [c[0][0].shape[:2] for c in calls] == [(320, 400), (160, 200)]
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith("warning: 1 of the 2 images' µm/px is not known")
    # the Python API reads it too
    from wsss.api import load_model

    # a record that cannot be used (pixels that are not square) is named, and --mpp used instead
    aniso = _tiff(tmp_path / "aniso.tif", resolution=(5000.0, 2500.0), resolutionunit="CENTIMETER")  # 2 × 4 µm/px
    caplog.clear()
    calls.clear()
    code, _, err = run_cli(capsys, monkeypatch, "predict", aniso, "--checkpoint", model96, "--out", tmp_path / "a",
                           "--device", "cpu", "--mpp", 0.5)
    assert code == 0, err
    assert [c[0][0].shape[:2] for c in calls] == [(80, 100)]
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings == [f"warning: {aniso} records 2×4 µm/px (pixels that are not square): taken as not recorded "
                        "(--mpp, if given, is used instead)"]
    probs_calls = record_calls(monkeypatch, inference, "_labels_and_probs", inference._labels_and_probs)
    assert load_model(model96, device="cpu").predict(cm).labels.shape == (160, 200)
    assert probs_calls[-1][0][0].shape[:2] == (320, 400)


def test_predict_refuses_a_whole_slide_image(model96, tmp_path, capsys, monkeypatch):
    svs = tmp_path / "slide.svs"
    svs.write_bytes(b"II*\x00")
    code, _, err = run_cli(capsys, monkeypatch, "predict", svs, "--checkpoint", model96, "--out", tmp_path / "o")
    assert code == 1 and err.count("error:") == 1 and "slide.svs is a whole-slide image: segment it with wsss " \
        "predict-wsi" in err
    assert not (tmp_path / "o").exists()
    code, _, err = run_cli(capsys, monkeypatch, "predict", tmp_path, "--checkpoint", model96, "--out", tmp_path / "o")
    assert code == 1 and "holds no PNG, JPEG or TIFF images (it holds whole-slide images: segment them with wsss " \
        "predict-wsi)" in err


def _slide(path: Path, mpp: float | None) -> Path:
    """512 × 384 px, tissue (saturated pink) in the top-left quarter, glass elsewhere; levels 2× and 4×."""
    rng = np.random.default_rng(0)
    image = (240 + rng.integers(-3, 4, (384, 512, 3))).astype(np.uint8)
    image[:192, :256] = (rng.integers(0, 40, (192, 256, 3)) + np.array([170, 40, 150])).astype(np.uint8)
    return write_pyramid(path, image, mpp=mpp)


def test_predict_wsi_reads_slides_at_the_models_mpp(tmp_path, capsys, monkeypatch, caplog):
    model = _segmenter(tmp_path / "model.pth", _dataset(tmp_path / "data", 32, 1.0))
    slide = _slide(tmp_path / "slide.tif", 0.5)

    def summary(out: str, *args) -> dict:
        code, _, err = run_cli(capsys, monkeypatch, "predict-wsi", *args, "--checkpoint", model, "--out",
                               tmp_path / out, "--device", "cpu")
        assert code == 0, err
        return json.loads(next((tmp_path / out).glob("*_summary.json")).read_text())

    s = summary("default", slide)
    assert (s["level"], s["mpp"], s["tile"], s["overlap"]) == (1, [1.0, 1.0], 32, 16)
    assert summary("level0", slide, "--level", 0)["mpp"] == [0.5, 0.5]
    bare = _slide(tmp_path / "bare.tif", None)
    code, _, err = run_cli(capsys, monkeypatch, "predict-wsi", bare, "--checkpoint", model, "--out", tmp_path / "b",
                           "--device", "cpu")
    assert code == 1 and err.count("error:") == 1
    assert "bare.tif does not record its µm/px, which reading it at the model's µm/px (1) needs: pass --slide-mpp" in err
    s = summary("given", bare, "--slide-mpp", 0.25)
    assert (s["level"], s["mpp"]) == (2, [1.0, 1.0])  # level 2 of a 0.25 µm/px scan
    # a slide that records its µm/px keeps it: --slide-mpp is for those that do not (a warning says so)
    caplog.clear()
    code, _, err = run_cli(capsys, monkeypatch, "predict-wsi", slide, "--slide-mpp", 0.25, "--checkpoint", model,
                           "--out", tmp_path / "recorded", "--device", "cpu")
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert code == 0 and sum("slide.tif records 0.5 µm/px; --slide-mpp 0.25 is for slides that record none" in w
                             for w in warnings) == 1, (err, warnings)
    s = json.loads(next((tmp_path / "recorded").glob("*_summary.json")).read_text())
    assert (s["level"], s["mpp"]) == (1, [1.0, 1.0])
    fine = _segmenter(tmp_path / "fine.pth", _dataset(tmp_path / "data-fine", 32, 0.25))
    code, _, err = run_cli(capsys, monkeypatch, "predict-wsi", slide, "--checkpoint", fine, "--out", tmp_path / "f",
                           "--device", "cpu")
    assert code == 1 and "the model's µm/px 0.25 is finer than the slide's level 0 (0.5 µm/px)" in err
