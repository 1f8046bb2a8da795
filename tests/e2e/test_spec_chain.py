"""Synthetic datasets of a 3-class and a 6-class spec through the whole command-line chain on tiny
data: synth, check-data, reproduce (train-stage1 + eval-cam, generate-pm, eval-pm, train-stage2 with
the gate, figures), eval-cam, evaluate, predict, predict-wsi and figures, each taking the spec from
the checkpoints; every table, file name, legend and GeoJSON carries the spec's classes."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from helpers import run_cli
from wsss.data.png import read_mask


THREE = """name = "wsss4luad"
classes = ["tumor", "stroma", "normal"]
colors = [[205, 51, 51], [255, 165, 0], [0, 255, 0]]
white_is_background = true
background_index = 3
"""
# six classes, background far from them, RGB masks and labels in a CSV
SIX = """name = "crc6"
classes = ["TUM", "NEC", "LYM", "STR", "NORM", "MUS"]
colors = [[205, 51, 51], [0, 255, 0], [65, 105, 225], [255, 165, 0], [255, 105, 180], [139, 69, 19]]
white_is_background = false
background_index = 200
background_color = [250, 250, 250]
mask_encoding = "rgb"
labels_csv = "labels.csv"
"""


def _ok(capsys, monkeypatch, *args) -> str:
    code, out, err = run_cli(capsys, monkeypatch, *args)
    assert code == 0, f"{args[0]}: {err}"
    return out


def _slide(path: Path, image: np.ndarray) -> Path:
    with tifffile.TiffWriter(path) as tif:
        tif.write(image, tile=(32, 32), photometric="rgb", compression="zlib")
    return path


def _chain(tmp_path: Path, capsys, monkeypatch, spec_text: str, name: str, classes: list[str], background: int):
    spec = tmp_path / f"{name}.toml"
    spec.write_text(spec_text)
    data, ckpt, report = tmp_path / "data", tmp_path / "ckpt", tmp_path / "report"
    _ok(capsys, monkeypatch, "synth", data, "--spec", spec, "--train", 24, "--val", 4, "--test", 4, "--size", 32,
        "--workers", 1)
    out = _ok(capsys, monkeypatch, "check-data", data, "--dataset", spec)
    assert f"dataset {name}: {len(classes)} classes ({', '.join(classes)}), background value {background}" in out
    assert "no problems found" in out

    _ok(capsys, monkeypatch, "reproduce", "--dataset", spec, "--data", data, "--synth", "--synth-size", 32,
        "--preset", "tiny", "--run", "r", "--out", ckpt, "--report", report, "--device", "cpu", "--workers", 0)
    s1, s2 = ckpt / f"stage1_checkpoint_trained_on_{name}.pth", ckpt / f"stage2_checkpoint_trained_on_{name}.pth"
    assert s1.is_file() and s2.is_file()
    md = (report / "report.md").read_text()
    assert "| result | mIoU | fwIoU | pixel acc | " + " | ".join(f"IoU {c}" for c in classes) + " |" in md
    metrics = json.loads((report / "metrics.json").read_text())
    assert list(metrics["test_gate"]["per_class"]) == classes
    pm_values = {int(v) for p in (data / "train_PM" / "PM_bn7").glob("*.png") for v in np.unique(read_mask(p))}
    assert pm_values <= {*range(len(classes)), background}
    pred_values = {int(v) for p in (report / "pred_gate").glob("*.png") for v in np.unique(read_mask(p))}
    assert pred_values <= {*range(len(classes)), background}
    assert (report / "examples.png").is_file() and (report / "cams.png").is_file()

    # the checkpoints carry the spec: no --dataset needed
    out = _ok(capsys, monkeypatch, "eval-cam", "--data", data, "--checkpoint", s1, "--device", "cpu")
    assert all(c in out for c in classes)
    _ok(capsys, monkeypatch, "evaluate", "--data", data, "--checkpoint", s2, "--gate", "--stage1-checkpoint", s1,
        "--device", "cpu", "--json", tmp_path / "e.json")
    assert json.loads((tmp_path / "e.json").read_text())["test_gate"] == metrics["test_gate"]
    image = next((data / "test" / "img").glob("*.png"))
    _ok(capsys, monkeypatch, "predict", image, "--checkpoint", s2, "--gate", "--stage1-checkpoint", s1,
        "--tile", 32, "--overlap", 8, "--out", tmp_path / "pred", "--device", "cpu")
    with open(tmp_path / "pred" / "summary.csv", newline="") as f:
        assert csv.reader(f).__next__() == ["image", "width", "height", *classes, "background"]
    with Image.open(tmp_path / "pred" / f"{image.stem}_mask.png") as img:
        assert img.getpalette()[: 3 * len(classes)] == [v for c in _spec_colours(spec_text) for v in c]
    tiles = np.concatenate([np.asarray(Image.open(p)) for p in sorted((data / "test" / "img").glob("*.png"))[:2]], 1)
    slide = _slide(tmp_path / "slide.tif", tiles)
    # the slide records no µm/px; it is made of the patches, at the model's (synth.json's)
    patch_mpp = json.loads((data / "synth.json").read_text())["mpp"]
    _ok(capsys, monkeypatch, "predict-wsi", slide, "--checkpoint", s2, "--out", tmp_path / "wsi", "--tile", 32,
        "--overlap", 0, "--min-tissue", 0, "--geojson", "--device", "cpu", "--slide-mpp", patch_mpp)
    geo = json.loads((tmp_path / "wsi" / "slide.geojson").read_text())
    colours = dict(zip(classes, _spec_colours(spec_text)))
    assert geo["features"] and all(colours[f["properties"]["classification"]["name"]]
                                   == f["properties"]["classification"]["color"] for f in geo["features"])
    summary = json.loads((tmp_path / "wsi" / "slide_summary.json").read_text())
    assert list(summary["classes"]) == [*classes, "background"]
    _ok(capsys, monkeypatch, "figures", "--data", data, "--stage1-checkpoint", s1, "--report", report, "--device", "cpu")

    # another spec with these checkpoints is refused in one line naming the difference
    code, _, err = run_cli(capsys, monkeypatch, "evaluate", "--dataset", "luad", "--data", data, "--checkpoint", s2,
                           "--device", "cpu")
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert f"trained on dataset spec '{name}', not the 'luad' given" in err and "classes [" in err
    return data


def _spec_colours(text: str) -> list[list[int]]:
    import tomllib

    return tomllib.loads(text)["colors"]


def test_three_class_spec_through_the_chain(tmp_path, tiny_presets, capsys, monkeypatch):
    data = _chain(tmp_path, capsys, monkeypatch, THREE, "wsss4luad", ["tumor", "stroma", "normal"], 3)
    assert all(p.name.endswith(("].png",)) for p in (data / "train").glob("*.png"))


def test_six_class_spec_with_rgb_masks_and_csv_labels_through_the_chain(tmp_path, tiny_presets, capsys, monkeypatch):
    data = _chain(tmp_path, capsys, monkeypatch, SIX, "crc6", ["TUM", "NEC", "LYM", "STR", "NORM", "MUS"], 200)
    # the synthetic data follows the spec: labels in labels.csv (not in the names), RGB evaluation masks
    names = sorted(p.name for p in (data / "train").glob("*.png"))
    assert names[0] == "synth-000000.png"
    rows = (data / "labels.csv").read_text().splitlines()
    assert rows[0] == "file,TUM,NEC,LYM,STR,NORM,MUS" and len(rows) == 25
    with Image.open(next((data / "val" / "mask").glob("*.png"))) as img:
        assert img.mode == "RGB"


def test_reproduce_refuses_to_continue_a_run_of_other_classes(tmp_path, tiny_presets):
    from wsss.errors import WsssError
    from wsss.stages.reproduce import ReproduceConfig, run

    spec = tmp_path / "w.toml"
    spec.write_text(THREE)
    cfg = ReproduceConfig(dataset=str(spec), data=tmp_path / "data", run="r", preset="tiny", out=tmp_path / "c",
                          report=tmp_path / "r", device="cpu", workers=0, figures=False)
    (tmp_path / "data" / "train").mkdir(parents=True)
    (tmp_path / "r").mkdir()
    saved = {**cfg.signature(), "classes": ["tumor", "stroma", "fat"]}
    (tmp_path / "r" / "progress.json").write_text(json.dumps({"signature": saved, "steps": {}}))
    with pytest.raises(WsssError, match=r'other settings \(classes: \["tumor", "stroma", "fat"\] → '
                                        r'\["tumor", "stroma", "normal"\]\)'):
        run(cfg)
