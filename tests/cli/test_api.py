"""The Python API (`wsss.load_model`, `Segmenter`, `load_classifier`, `train`, `reproduce`): the same
engine as the command line, to the bit; the command line's error messages; the example of docs/api.md
runs as written."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

import wsss
from helpers import run_cli, slide_pixels, write_pyramid_levels
from wsss.config import PM_PRESETS, STAGE1_PRESETS, STAGE2_PRESETS
from wsss.data.specs import LUAD
from wsss.runtime import load_checkpoint, save_checkpoint

TILE, OVERLAP = 64, 16
DOCS = Path(__file__).resolve().parents[2] / "docs" / "api.md"


def tissue_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Pink, saturated "tissue" with a white strip of glass on the right."""
    rng = np.random.default_rng(seed)
    image = (rng.integers(0, 60, (height, width, 3)) + np.array([170, 40, 150])).astype(np.uint8)
    image[:, width * 3 // 4 :] = 236
    return image


def error_line(err: str) -> str:
    """The message of the CLI's one ``error:`` line."""
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0].removeprefix("error: ")


# --------------------------------------------------------------------------- one engine, two front doors


def test_predict_equals_the_command_line_bit_for_bit(thin_ckpts, tmp_path, capsys, monkeypatch):
    path = tmp_path / "img.png"
    Image.fromarray(tissue_image(150, 130)).save(path)
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, monkeypatch, "predict", path, "--checkpoint", thin_ckpts["s2"], "--out", out,
                           "--gate", "--stage1-checkpoint", thin_ckpts["s1a"], "--gate-threshold", 0.4,
                           "--tile", TILE, "--overlap", OVERLAP, "--batch-size", 3, "--device", "cpu",
                           "--save-probs")
    assert code == 0, err
    with Image.open(out / "img_mask.png") as img:
        cli_labels = np.asarray(img)
    code, _, err = run_cli(capsys, monkeypatch, "predict", path, "--checkpoint", thin_ckpts["s2"], "--out",
                           tmp_path / "plain", "--gate", "--stage1-checkpoint", thin_ckpts["s1a"], "--gate-threshold",
                           0.4, "--tile", TILE, "--overlap", OVERLAP, "--batch-size", 3, "--device", "cpu")
    assert code == 0, err
    assert (out / "img_mask.png").read_bytes() == (tmp_path / "plain" / "img_mask.png").read_bytes()
    with tifffile.TiffFile(out / "img_probs.ome.tif") as tif:
        cli_probs = tif.series[0].asarray()

    model = wsss.load_model(thin_ckpts["s2"], stage1_ckpt=thin_ckpts["s1a"], device="cpu", tile=TILE,
                            overlap=OVERLAP, batch_size=3, gate_threshold=0.4)
    assert model.classes == LUAD.classes and model.palette[-1] == (255, 255, 255)
    for image in (path, Image.open(path), np.asarray(Image.open(path))):
        result = model.predict(image)
        assert result.labels.dtype == np.uint8 and result.probabilities.dtype == np.float16
        assert result.probabilities.shape == (4, 150, 130)
        assert np.array_equal(result.labels, cli_labels)
        assert np.array_equal(result.probabilities_uint8(), cli_probs)
    assert (cli_labels == 4).any() and (cli_labels < 4).any()  # glass and tissue both there
    assert np.array_equal(np.asarray(result.mask_image()), cli_labels)
    assert result.mask_image().getpalette()[:15] == Image.open(out / "img_mask.png").getpalette()[:15]
    row = next(r for r in (out / "summary.csv").read_text().splitlines()[1:])
    assert [round(v, 6) for v in result.fractions().values()] == [float(v) for v in row.split(",")[3:]]


def test_predict_slide_equals_predict_wsi(thin_ckpts, tmp_path, capsys, monkeypatch):
    slide = tmp_path / "slide.tif"
    write_pyramid_levels(slide, slide_pixels())
    options = ("--level", 1, "--roi", "40,20,400,300", "--save-probs", "--reader", "tifffile")
    code, _, err = run_cli(capsys, monkeypatch, "predict-wsi", slide, "--checkpoint", thin_ckpts["s2"], "--out",
                           tmp_path / "cli", "--tile", TILE, "--overlap", OVERLAP, "--device", "cpu", *options)
    assert code == 0, err
    model = wsss.load_model(thin_ckpts["s2"], device="cpu", tile=TILE, overlap=OVERLAP)
    summary = model.predict_slide(slide, tmp_path / "api", level=1, roi=(40, 20, 400, 300), save_probs=True,
                                  reader="tifffile")
    cli = json.loads((tmp_path / "cli" / "slide_summary.json").read_text())
    assert {k: v for k, v in summary.items() if k != "seconds"} == {k: v for k, v in cli.items() if k != "seconds"}
    for name in ("slide_mask.png", "slide_probs.ome.tif"):
        assert (tmp_path / "api" / name).read_bytes() == (tmp_path / "cli" / name).read_bytes()
    # roi as a list (JSON, a user's code) is the same region
    for roi in ([40, 20, 400, 300], "40,20,400,300"):
        assert model.predict_slide(slide, level=1, roi=roi, reader="tifffile")["classes"] == cli["classes"]
    with pytest.raises(wsss.WsssError, match="--roi needs x,y,w,h"):
        model.predict_slide(slide, roi=[40, 20, 400])
    with pytest.raises(wsss.WsssError, match="does not take tile"):
        model.predict_slide(slide, tile=32)


def test_an_image_at_another_magnification_is_resampled_to_the_models(thin_ckpts, tmp_path):
    ckpt = load_checkpoint(thin_ckpts["s2"])
    save_checkpoint(tmp_path / "s2_mpp.pth", {**ckpt, "mpp": 0.5})  # trained at 0.5 µm/px
    model = wsss.load_model(tmp_path / "s2_mpp.pth", device="cpu", tile=TILE, overlap=OVERLAP)
    image = tissue_image(120, 100, seed=2)
    result = model.predict(image, mpp=1.0)  # 1 µm/px: twice the model's pixels a side
    assert result.labels.shape == (120, 100) and result.probabilities.shape == (4, 120, 100)
    # by hand: PIL's bilinear upsampling to 240 × 200, the image segmented there, the pixel under each centre
    work = np.asarray(Image.fromarray(image).resize((200, 240), Image.BILINEAR))
    at_model = model.predict(work)
    rows, cols = np.arange(120) * 2 + 1, np.arange(100) * 2 + 1  # (i + 0.5) · 240 / 120
    expected = at_model.probabilities[:, rows[:, None], cols[None, :]]
    assert np.array_equal(result.probabilities, expected)
    white = result.labels == 4
    argmax = at_model.probabilities_uint8().argmax(axis=0)  # the float32 argmax (float16 may tie)
    assert np.array_equal(result.labels[~white], argmax[rows[:, None], cols[None, :]][~white])
    plain = wsss.load_model(thin_ckpts["s2"], device="cpu", tile=TILE, overlap=OVERLAP)  # records no µm/px
    assert np.array_equal(plain.predict(image, mpp=1.0).labels, plain.predict(image).labels)
    # mpp as `wsss predict --mpp` takes it; a whole-slide file is predict_slide's
    for bad in (-1, 1e6, "0.5"):
        with pytest.raises(wsss.WsssError, match=f"mpp is µm per pixel, a number from 0.05 to 100, not {bad!r}"):
            model.predict(image, mpp=bad)
    (tmp_path / "x.svs").write_bytes(b"II*\x00")
    with pytest.raises(wsss.WsssError, match="x.svs is a whole-slide image: segment it with wsss predict-wsi"):
        model.predict(tmp_path / "x.svs")


# --------------------------------------------------------------------------- the classifier


def test_classifier_gives_sigmoid_probabilities_and_normalised_cams(thin_ckpts):
    clf = wsss.load_classifier(thin_ckpts["s1a"], device="cpu")
    images = [tissue_image(40, 48, seed=s) for s in (0, 1)]
    probs = clf.classify(images)
    assert probs.shape == (2, 4) and np.allclose(clf.classify(images[1]), probs[1], atol=1e-6)
    # by the definition: the recorded input size (32 px, PIL bilinear), [0, 1] input, sigmoid of the logits
    x = torch.stack([torch.from_numpy(np.asarray(Image.fromarray(a).resize((32, 32), Image.BILINEAR)).copy())
                     for a in images]).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        expected = torch.sigmoid(clf.model(x)).numpy()
    assert np.allclose(probs, expected, atol=1e-6)
    cams = clf.cams(images[0])
    assert cams.shape == (4, 40, 48) and cams.dtype == np.float32
    assert cams.min() == 0.0 and cams.max() == pytest.approx(1.0)
    raw = clf.cams(images[0], normalise=False)
    assert np.allclose((raw - raw.min()) / (raw.max() - raw.min()), cams, atol=1e-5)


# --------------------------------------------------------------------------- bad input: the CLI's words


def test_bad_inputs_raise_the_command_lines_messages(thin_ckpts, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    Image.fromarray(tissue_image(64, 64)).save(tmp_path / "ok.png")
    code, _, err = run_cli(capsys, monkeypatch, "predict", tmp_path / "ok.png", "--checkpoint", thin_ckpts["s1a"],
                           "--out", out, "--device", "cpu")
    assert code == 1
    with pytest.raises(wsss.WsssError) as raised:
        wsss.load_model(thin_ckpts["s1a"], device="cpu")
    assert str(raised.value) == error_line(err) and "is a stage-1 checkpoint" in str(raised.value)
    with pytest.raises(wsss.WsssError, match="is a stage-2 checkpoint"):
        wsss.load_classifier(thin_ckpts["s2"], device="cpu")

    model = wsss.load_model(thin_ckpts["s2"], device="cpu", tile=TILE, overlap=OVERLAP)
    rgba = np.dstack([tissue_image(64, 64), np.full((64, 64), 255, np.uint8)])
    grey16 = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(grey16).save(tmp_path / "grey16.png")
    for name in ("rgba.png", "grey16.png"):
        code, _, err = run_cli(capsys, monkeypatch, "predict", tmp_path / name, "--checkpoint", thin_ckpts["s2"],
                               "--out", tmp_path / f"out-{name}", "--tile", TILE, "--device", "cpu")
        assert code == 1
        message = error_line(err)
        for given in (tmp_path / name, Image.open(tmp_path / name)):
            with pytest.raises(wsss.WsssError) as raised:
                model.predict(given)
            assert str(raised.value) == message
    with pytest.raises(wsss.WsssError) as raised:
        model.predict(rgba)
    assert str(raised.value) == "image has an alpha channel (mode RGBA); an RGB image is needed (drop the alpha first)"
    with pytest.raises(wsss.WsssError, match=r"^image is grayscale \(mode I;16\); an RGB image is needed$"):
        model.predict(grey16)
    with pytest.raises(wsss.WsssError, match=r"^image is 16-bit \(uint16\); an 8-bit RGB image"):
        model.predict(tissue_image(64, 64).astype(np.uint16) * 257)
    with pytest.raises(wsss.WsssError, match="far below the 64 px window"):
        model.predict(tissue_image(20, 20))
    with pytest.raises(wsss.WsssError, match="--tta must be one of"):
        wsss.load_model(thin_ckpts["s2"], device="cpu", tta="d8")


# --------------------------------------------------------------------------- the docs' example


def python_blocks(markdown: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", markdown, flags=re.S | re.M)


def test_the_docs_example_runs(tmp_path, monkeypatch):
    """Every ``python`` block of docs/api.md, in order, in one namespace, in an empty folder. Its
    ``cpu`` preset is shrunk to one thin epoch per stage here (the code is the page's)."""
    tiny1 = {"width": 0.125, "image_size": None, "epochs": 1, "batch_size": 8, "workers": 0, "pda_norm": "max"}
    tiny2 = {"backbone": "resnet18", "head_channels": 8, "image_size": None, "epochs": 1, "batch_size": 8,
             "workers": 0}
    monkeypatch.setitem(STAGE1_PRESETS, "cpu", {**STAGE1_PRESETS["cpu"], **tiny1})
    monkeypatch.setitem(STAGE2_PRESETS, "cpu", {**STAGE2_PRESETS["cpu"], **tiny2})
    monkeypatch.setitem(PM_PRESETS, "cpu", dict(PM_PRESETS["cpu"]))
    monkeypatch.chdir(tmp_path)
    blocks = python_blocks(DOCS.read_text(encoding="utf-8"))
    assert len(blocks) >= 5
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(DOCS), "exec"), namespace)
    assert (tmp_path / "wsi" / "slide_probs.ome.tif").is_file() and (tmp_path / "mosaic_mask.png").is_file()
    assert namespace["summary"] is not None


def test_version_names_wsss_torch_and_cuda(capsys, monkeypatch):
    code, out, err = run_cli(capsys, monkeypatch, "--version")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == f"wsss {wsss.__version__}" and lines[1].startswith(f"torch {torch.__version__}, ")
    assert ("CUDA" in lines[1] and "available" in lines[1]) or "CPU-only build" in lines[1]
