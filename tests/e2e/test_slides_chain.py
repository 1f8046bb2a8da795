"""From slides and QuPath annotations to a model and back to QuPath: extract-patches on two annotated
slides → train-stage1 → generate-pm → train-stage2 (no val or test masks: each stage keeps its last
epoch) → predict-wsi on a third, held-back slide, with no option about scale: the model's µm/px and
patch size come from its checkpoint. The GeoJSON it writes must land on the held-back slide's own
annotations (never seen in training): the IoU of each class's predicted area with its annotated area,
in QuPath's pixels, measured 0.70 (TUM), 0.89 (NEC), 0.80 (LYM) here; the bound is 0.5 each.

The slides: synthetic single-class tiles (0.5 µm/px) laid out in rectangles of one class each,
annotated by those rectangles; the held-back slide is built of other tiles. With OpenSlide, the slides
report openslide.bounds-x/y of 128 px, so QuPath's pixels (the annotations', the GeoJSON's) are level
0's less 128: a side that forgot the offset would put every label two tiles away (IoU below 0.34).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import TILE, qupath_object, rectangle, run_cli, tiled_slide, write_pyramid, write_qupath
from wsss.wsi import slide as S

NAMES = ("TUM", "NEC", "LYM")
# (class, (col0, row0, col1, row1)) in tiles of 64 px; 9 × 7 tiles a slide, the rest glass
LAYOUTS = {
    "a": [(0, (0, 0, 4, 4)), (1, (4, 0, 9, 3)), (2, (4, 3, 9, 7)), (2, (0, 4, 4, 7))],
    "b": [(2, (0, 0, 3, 7)), (0, (3, 0, 9, 3)), (1, (3, 3, 9, 7))],
    "held": [(0, (0, 0, 4, 3)), (1, (4, 0, 9, 3)), (2, (0, 3, 6, 7)), (0, (6, 3, 9, 7))],
}
IOU_BOUND = 0.5
MARGIN = 2  # glass tiles above and left of the layout: where QuPath's picture of the slide starts (bounds)


def _slide(folder: Path, name: str, tiles: dict, seed: int, offset: int) -> Path:
    """The slide, and its annotations in QuPath's pixels: level 0's less ``offset``."""
    grid = [[-1] * (10 + MARGIN) for _ in range(8 + MARGIN)]
    for c, (x0, y0, x1, y1) in LAYOUTS[name]:
        for r in range(y0, y1):
            grid[r + MARGIN][x0 + MARGIN:x1 + MARGIN] = [c] * (x1 - x0)
    path = write_pyramid(folder / f"{name}.tif", tiled_slide(grid, tiles, seed=seed), mpp=0.5)
    at = MARGIN * TILE - offset
    write_qupath(folder / f"{name}.geojson",
                 [qupath_object(NAMES[c], [rectangle(at + x0 * TILE, at + y0 * TILE, at + x1 * TILE, at + y1 * TILE)])
                  for c, (x0, y0, x1, y1) in LAYOUTS[name]])
    return path


def _areas(path: Path) -> dict:
    import shapely
    from shapely.geometry import shape

    parts: dict = {}
    for feature in json.loads(path.read_text())["features"]:
        parts.setdefault(feature["properties"]["classification"]["name"], []).append(shape(feature["geometry"]))
    return {name: shapely.union_all(p) for name, p in parts.items()}


@pytest.mark.slow
def test_slides_to_a_model_whose_geojson_lands_on_held_back_annotations(class_tiles, tri_spec, tmp_path, capsys,
                                                                          monkeypatch):
    offset = 0  # tifffile: QuPath's pixels are level 0's
    if S._import_openslide() is not None:
        import openslide

        offset = MARGIN * TILE
        properties = openslide.OpenSlide.properties
        monkeypatch.setattr(openslide.OpenSlide, "properties", property(lambda self: {
            **properties.fget(self), "openslide.bounds-x": str(offset), "openslide.bounds-y": str(offset),
            "openslide.bounds-width": str(10 * TILE), "openslide.bounds-height": str(8 * TILE)}))
    half = {k: t[: len(t) * 2 // 3] for k, t in class_tiles.items()}
    rest = {k: t[len(t) * 2 // 3:] for k, t in class_tiles.items()}
    train = tmp_path / "slides"
    train.mkdir()
    _slide(train, "a", half, 1, offset)
    _slide(train, "b", half, 2, offset)
    held = _slide(tmp_path, "held", rest, 3, offset)
    data, ckpt = tmp_path / "data", tmp_path / "ckpt"

    def ok(*args) -> str:
        code, out, err = run_cli(capsys, monkeypatch, *args)
        assert code == 0, f"{args[0]}: {err}"
        return out

    ok("extract-patches", train, "--dataset", tri_spec, "--out", data, "--patch", 32, "--stride", 16)
    spec = data / "spec.toml"
    assert spec.is_file()  # train-stage1 and train-stage2 take it as --dataset
    ok("train-stage1", "--data", data, "--out", ckpt, "--preset", "cpu", "--epochs", 8,
       "--device", "cpu")
    s1 = ckpt / "stage1_checkpoint_trained_on_tri.pth"
    ok("generate-pm", "--data", data, "--checkpoint", s1, "--preset", "cpu", "--device", "cpu", "--workers", 0)
    ok("train-stage2", "--data", data, "--out", ckpt, "--report", tmp_path / "report",
       "--preset", "cpu", "--epochs", 4, "--head-channels", 16, "--no-gate", "--device", "cpu")
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert metrics["kept"] == "last epoch (no val masks)" and metrics["test"] is None and metrics["best_epoch"] == 4
    s2 = ckpt / "stage2_checkpoint_trained_on_tri.pth"
    ok("predict-wsi", held, "--checkpoint", s2, "--out", tmp_path / "wsi", "--geojson", "--device", "cpu")
    summary = json.loads((tmp_path / "wsi" / "held_summary.json").read_text())
    assert summary["mpp"] == [1.0, 1.0] and summary["tile"] == 32  # the model's, from its checkpoint
    assert summary["geojson_offset"] == [offset, offset]
    assert json.loads((data / "dataset.json").read_text())["slides"][0]["offset"] == [offset, offset]
    predicted, annotated = _areas(tmp_path / "wsi" / "held.geojson"), _areas(held.with_suffix(".geojson"))
    iou = {name: predicted[name].intersection(area).area / predicted[name].union(area).area
           for name, area in annotated.items()}
    print("IoU of the predicted and annotated areas of the held-back slide:", iou)
    assert all(v > IOU_BOUND for v in iou.values()), iou
