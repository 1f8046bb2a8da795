"""`wsss extract-patches`: slides built from synthetic single-class tiles at known squares, QuPath
GeoJSON written by hand; the labels, masks, splits, scale and coordinates of the patches are checked
against values worked out here from the layout, not by the code under test.

Slides: 8 × 6 tiles of 64 px at 0.5 µm/px (512 × 384 px, levels at 2× and 4×). Patches of 32 px at
1 µm/px: one patch is one tile, read from level 1.

    row 0-2: TUM TUM TUM TUM NEC NEC NEC NEC
    row 3-4: LYM LYM LYM LYM  -   -   -   -      (- glass)
    row 5:    -   -   -   -   -   -   -   -
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image, ImageDraw

from helpers import TILE, qupath_object, rectangle, run_cli, tiled_slide, write_pyramid, write_qupath
from wsss.data.png import read_mask
from wsss.wsi import slide as S

T, N, L, G = 0, 1, 2, -1
LAYOUT = [[T] * 4 + [N] * 4] * 3 + [[L] * 4 + [G] * 4] * 2 + [[G] * 8]
BACKGROUND = 3
MIN_CLASS = 0.05

# (class, outline, holes) in level-0 = QuPath pixels, as annotated
POLYGONS = [
    (T, (0, 0, 256, 192), [(64, 64, 128, 128)]),  # the tumour, one tile left out (a hole)
    (N, (256, 0, 512, 160), []),  # the necrosis, over half of its third tile row
    (L, (0, 192, 256, 320), []),  # lymphocytes ...
    (L, (0, 322, 256, 330), []),  # ... and a sliver over glass, second part of the MultiPolygon
    (L, (128, 0, 192, 64), []),  # "lym" drawn inside the tumour: painted over it
]
WHITE = (16, 16, 40, 40)  # a white square on the val slide's first tumour tile: glass inside a polygon


def _features() -> list:
    tum, nec, lym, sliver, inner = POLYGONS
    return [
        qupath_object("TUM", [rectangle(*tum[1])[::-1], rectangle(*tum[2][0])]),  # clockwise outline: also read
        qupath_object("Necrosis", [rectangle(*nec[1])]),
        qupath_object("LYM", [rectangle(*lym[1])], [rectangle(*sliver[1])]),
        qupath_object("lym", [rectangle(*inner[1])]),
        qupath_object("Other", [rectangle(300, 250, 400, 300)]),  # not a class of the spec: skipped
        qupath_object("TUM", [rectangle(256, 0, 320, 64)], object_type="detection"),  # a detection: skipped
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [10, 10]},
         "properties": {"objectType": "annotation", "classification": {"name": "TUM"}}},  # no area: skipped
    ]


CLASS_MAP = "qupath,class\nTUM,TUM\nNecrosis,NEC\nLYM,LYM\nOther,\n"


@pytest.fixture(scope="module")
def slides(tmp_path_factory, class_tiles) -> Path:
    """Three slides s0, s1, s2 of the layout (other tiles each), each with its GeoJSON beside it; a
    white square on s1."""
    folder = tmp_path_factory.mktemp("slides")
    for i in range(3):
        image = tiled_slide(LAYOUT, class_tiles, seed=i)
        if i == 1:
            x0, y0, x1, y1 = WHITE
            image[y0:y1, x0:x1] = 255
        write_pyramid(folder / f"s{i}.tif", image, mpp=0.5)
        write_qupath(folder / f"s{i}.geojson", _features(), collection=i != 2)  # s2: a bare list, as QuPath can
    (folder / "map.csv").write_text(CLASS_MAP)
    return folder


@pytest.fixture(scope="module")
def extracted(slides, tri_spec, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("extracted") / "data"
    from wsss.wsi.extract import ExtractConfig, run

    result = run(ExtractConfig(inputs=(slides,), dataset=str(tri_spec), out=out, patch=32, min_tissue=0.5,
                               min_class_fraction=MIN_CLASS, class_map=slides / "map.csv", val_slides=("s1",),
                               test_slides=("s2",)))
    assert not result.failures
    return out


def _annotation_image() -> np.ndarray:
    """Level-0 class of every pixel under the polygons (255: none), painted largest first."""
    label = np.full((384, 512), 255, dtype=np.uint8)
    area = {}
    for k, (c, (x0, y0, x1, y1), holes) in enumerate(POLYGONS):
        area[k] = (x1 - x0) * (y1 - y0) - sum((h[2] - h[0]) * (h[3] - h[1]) for h in holes)
    area[2] = area[3] = area[2] + area[3]  # one MultiPolygon
    for k in sorted(area, key=lambda k: -area[k]):
        c, (x0, y0, x1, y1), holes = POLYGONS[k]
        inside = np.zeros_like(label, dtype=bool)
        inside[y0:y1, x0:x1] = True
        for hx0, hy0, hx1, hy1 in holes:
            inside[hy0:hy1, hx0:hx1] = False
        label[inside] = c
    return label


def _expected_patches(split: str) -> dict[tuple[int, int], tuple[int, ...]]:
    """``{(x, y): label}`` of the patches a slide of ``split`` should give, from the layout."""
    label = _annotation_image()
    out = {}
    for r, row in enumerate(LAYOUT):
        for c, k in enumerate(row):
            block = label[r * TILE:(r + 1) * TILE, c * TILE:(c + 1) * TILE]
            tissue = k >= 0
            fractions = [(block == i).mean() for i in range(3)]
            labels = tuple(int(f >= MIN_CLASS) for f in fractions)
            unannotated_tissue = (block == 255).mean() if tissue else 0.0
            if not tissue or not any(labels):
                continue
            if split == "train" and unannotated_tissue >= MIN_CLASS:
                continue
            out[(c * TILE, r * TILE)] = labels
    return out


def _parse(name: str) -> tuple[str, int, int, tuple[int, ...] | None]:
    stem = Path(name).stem
    label = None
    if stem.endswith("]"):
        stem, digits = stem.rsplit("-[", 1)
        label = tuple(int(d) for d in digits[:-1].split())
    slide, x, y = stem.rsplit("-", 2)
    return slide, int(x), int(y), label


def test_labels_equal_those_of_the_known_layout(extracted):
    names = [p.name for p in (extracted / "train").glob("*.png")]
    got = {(x, y): label for slide, x, y, label in map(_parse, names)}
    assert {_parse(n)[0] for n in names} == {"s0"}
    assert got == _expected_patches("train")
    # by hand: 10 tumour tiles (12 less the hole and the nested "lym"), 8 necrosis, 8 + 1 lymphocytes
    assert sorted(got.values()).count((1, 0, 0)) == 10 and sorted(got.values()).count((0, 1, 0)) == 8
    assert sorted(got.values()).count((0, 0, 1)) == 9 and len(got) == 27
    with open(extracted / "labels.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["file", "TUM", "NEC", "LYM"]
    assert {r[0]: tuple(map(int, r[1:])) for r in rows[1:]} == {n: _parse(n)[3] for n in names}


def test_val_masks_equal_an_imagedraw_rasterisation(extracted):
    """Each val patch's mask equals the polygons drawn with PIL's ImageDraw in the patch's pixels (a
    polygon of QuPath pixels [x0, x1) covers patch columns (x0 - px) / 2 to (x1 - px) / 2 - 1), painted
    largest first, holes and unannotated tissue the background value, and the white square too."""
    masks = sorted((extracted / "val" / "mask").glob("*.png"))
    assert {(x, y) for _, x, y, _ in (_parse(p.name) for p in masks)} == set(_expected_patches("val"))
    order = [0, 1, 2, 3, 4]  # the outlines by area, largest first (the two LYM parts: one MultiPolygon)
    for path in masks:
        _, px, py, _ = _parse(path.name)
        want = Image.new("L", (32, 32), 255)
        draw = ImageDraw.Draw(want)
        for k in order:
            c, (x0, y0, x1, y1), holes = POLYGONS[k]
            draw.rectangle([(x0 - px) / 2, (y0 - py) / 2, (x1 - px) / 2 - 1, (y1 - py) / 2 - 1], fill=c)
            for hx0, hy0, hx1, hy1 in holes:
                draw.rectangle([(hx0 - px) / 2, (hy0 - py) / 2, (hx1 - px) / 2 - 1, (hy1 - py) / 2 - 1], fill=255)
        x0, y0, x1, y1 = WHITE
        draw.rectangle([(x0 - px) / 2, (y0 - py) / 2, (x1 - px) / 2 - 1, (y1 - py) / 2 - 1], fill=BACKGROUND)
        want = np.asarray(want).copy()
        want[want == 255] = BACKGROUND
        assert np.array_equal(read_mask(path), want), path.name
    assert (read_mask(extracted / "val" / "mask" / "s1-0-0.png") == BACKGROUND).sum() == 12 * 12


def test_no_patch_crosses_a_split(extracted):
    with open(extracted / "patches.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    split_of = {"s0": "train", "s1": "val", "s2": "test"}
    assert rows and all(split_of[r["slide"]] == r["split"] for r in rows)
    for split, folder in (("val", "val/img"), ("test", "test/img"), ("train", "train")):
        assert {_parse(p.name)[0] for p in (extracted / folder).glob("*.png")} == {[s for s, v in split_of.items()
                                                                                   if v == split][0]}
    summary = json.loads((extracted / "dataset.json").read_text())
    assert summary["counts"] == {"train": 27, "val": len(_expected_patches("val")), "test": len(_expected_patches("test"))}
    assert [r["split"] for r in summary["slides"]] == ["train", "val", "test"]
    assert summary["mpp"] == 1.0 and summary["patch_size"] == 32
    assert summary["slides"][0]["level"] == 1 and summary["slides"][0]["read_mpp"] == 1.0
    skipped = summary["slides"][0]["annotations"]
    assert skipped["skipped_classes"] == {"Other": 1} and skipped["skipped_objects"] == {"detection": 1,
                                                                                          "Point (no area)": 1}


def test_the_dataset_checks_and_trains_at_its_mpp(extracted, capsys, monkeypatch):
    code, out, _ = run_cli(capsys, monkeypatch, "check-data", extracted)  # --dataset: OUT/spec.toml
    assert code == 0 and "no problems found" in out and "patches at 1 µm/px" in out
    assert out.startswith("dataset tri: 3 classes (TUM, NEC, LYM)")  # the spec extract-patches wrote, not luad's
    (extracted / "spec.toml").rename(extracted / "moved.toml")
    code, _, err = run_cli(capsys, monkeypatch, "check-data", extracted)
    assert code == 1 and err.count("error:") == 1 and "--dataset is needed (luad, bcss or a TOML spec file): " \
        f"{extracted} holds no spec.toml" in err
    out = ("--out", extracted.parent / "x")
    for command in (("train-stage1", *out), ("train-stage2", *out), ("eval-pm",), ("reproduce", *out)):
        code, _, err = run_cli(capsys, monkeypatch, *command, "--data", extracted)
        assert code == 1 and f"{extracted} holds no spec.toml" in err, (command, err)
    code, _, err = run_cli(capsys, monkeypatch, "check-data", extracted.parent / "nowhere")
    assert code == 1 and err.count("error:") == 1 and "nowhere does not exist" in err
    # reproduce runs one dataset: the one a --config file's tables name, when --dataset is not given
    config = extracted.parent / "c.toml"
    config.write_text('[stage1]\ndataset = "bcss"\n[stage2]\ndataset = "bcss"\n')
    code, printed, err = run_cli(capsys, monkeypatch, "reproduce", "--data", extracted, "--config", config,
                                 "--print-config")
    assert code == 0 and 'dataset = "bcss"' in printed and "luad" not in printed, err
    config.write_text('[stage1]\ndataset = "bcss"\n[stage2]\ndataset = "luad"\n')
    code, _, err = run_cli(capsys, monkeypatch, "reproduce", "--data", extracted, "--config", config, "--print-config")
    assert code == 1 and "names several datasets (bcss, luad): reproduce runs one, pass --dataset" in err
    (extracted / "moved.toml").rename(extracted / "spec.toml")
    assert "mpp = 1.0" in (extracted / "spec.toml").read_text()
    with Image.open(extracted / "contact_sheet.png") as sheet:
        assert sheet.width > 6 * 128 and sheet.height > 5 * 128


def test_unknown_class_names_are_skipped_with_one_warning(slides, tri_spec, tmp_path, capsys, monkeypatch, caplog):
    code, out, err = run_cli(capsys, monkeypatch, "extract-patches", slides / "s0.tif", "--dataset", tri_spec,
                             "--out", tmp_path / "d", "--patch", 32)
    assert code == 0, err
    warnings = [r.getMessage() for r in caplog.records if "not in the spec" in r.getMessage()]
    # without a class map "Necrosis" is not NEC: skipped with "Other", and said once
    assert warnings == ["warning: annotation classes not in the spec were skipped: Necrosis (1 object, 1 slide), "
                        "Other (1 object, 1 slide); map them with --class-map"]
    assert not list((tmp_path / "d" / "train").glob("*[[]0 1 0[]].png"))


def test_a_slide_at_a_quarter_of_the_target_mpp_gives_a_quarter_of_the_pixel_density(tri_spec, tmp_path,
                                                                                      capsys, monkeypatch):
    """0.25 µm/px, one level: at 1 µm/px a 32-px patch spans 128 slide pixels, and a dark 40-px square
    at (160, 160) becomes a 10-px square at (8, 8) of the patch at (128, 128)."""
    image = np.zeros((512, 512, 3), dtype=np.uint8) + np.array([220, 120, 200], dtype=np.uint8)
    image[160:200, 160:200] = 40
    path = write_pyramid(tmp_path / "fine.tif", image, mpp=0.25, levels=1)
    write_qupath(tmp_path / "fine.geojson", [qupath_object("TUM", [rectangle(0, 0, 512, 512)])])
    code, _, err = run_cli(capsys, monkeypatch, "extract-patches", path, "--dataset", tri_spec, "--out",
                           tmp_path / "d", "--patch", 32, "--min-tissue", 0.1)
    assert code == 0, err
    patches = sorted((tmp_path / "d" / "train").glob("*.png"))
    assert [_parse(p.name)[1:3] for p in patches] == sorted((x, y) for x in range(0, 512, 128) for y in range(0, 512, 128))
    patch = np.asarray(Image.open(tmp_path / "d" / "train" / "fine-128-128-[1 0 0].png"))
    assert patch.shape == (32, 32, 3)
    dark = np.argwhere(patch.mean(axis=2) < 130)
    assert dark.min(axis=0).tolist() == [8, 8] and dark.max(axis=0).tolist() == [17, 17]
    summary = json.loads((tmp_path / "d" / "dataset.json").read_text())["slides"][0]
    assert (summary["level"], summary["pixels_per_patch_pixel"], summary["read_mpp"]) == (0, 4.0, 1.0)
    # finer than the slide can give: one line
    code, _, err = run_cli(capsys, monkeypatch, "extract-patches", path, "--dataset", tri_spec, "--out",
                           tmp_path / "e", "--mpp", 0.1)
    assert code == 1 and err.count("error:") == 1 and "--mpp 0.1 is finer than the slide's level 0 (0.25 µm/px)" in err


@pytest.mark.skipif(S._import_openslide() is None, reason="needs OpenSlide")
def test_annotations_are_in_qupaths_cropped_picture_of_a_slide(slides, tri_spec, tmp_path, monkeypatch):
    """A slide with openslide.bounds-* is shown by QuPath from (bounds-x, bounds-y): annotations
    shifted by (-64, -128) cut the same pixels with the same labels at those level-0 places."""
    import openslide

    from wsss.wsi.extract import ExtractConfig, run

    def cut(name: str, features: list, reader: str, **options) -> dict:
        folder = tmp_path / name
        folder.mkdir()
        (folder / "s0.tif").symlink_to(slides / "s0.tif")
        write_qupath(folder / "s0.geojson", features)
        run(ExtractConfig(inputs=(folder / "s0.tif",), dataset=str(tri_spec), out=tmp_path / f"{name}-out", patch=32,
                          class_map=slides / "map.csv", reader=reader, **options))
        return {(x, y, label): np.asarray(Image.open(p)) for p in (tmp_path / f"{name}-out" / "train").glob("*.png")
                for _, x, y, label in [_parse(p.name)]}

    plain = cut("plain", _features(), "tifffile")
    properties = openslide.OpenSlide.properties
    monkeypatch.setattr(openslide.OpenSlide, "properties", property(lambda self: {
        **properties.fget(self), "openslide.bounds-x": "64", "openslide.bounds-y": "128",
        "openslide.bounds-width": "448", "openslide.bounds-height": "256"}))
    # the nested "lym" (tile row 0) lies outside QuPath's picture of the slide: left out
    shifted = [f for k, f in enumerate(json.loads(json.dumps(_features()))) if k != 3]
    for feature in shifted:
        geometry = feature["geometry"]
        if geometry["type"] == "Polygon":
            geometry["coordinates"] = [[[x - 64, y - 128] for x, y in ring] for ring in geometry["coordinates"]]
        elif geometry["type"] == "MultiPolygon":
            geometry["coordinates"] = [[[[x - 64, y - 128] for x, y in ring] for ring in part]
                                       for part in geometry["coordinates"]]
    cropped = cut("cropped", shifted, "openslide")
    expected = {(x - 64, y - 128, label): pixels for (x, y, label), pixels in plain.items() if x >= 64 and y >= 128}
    assert expected and set(cropped) == set(expected)
    assert all(np.array_equal(cropped[k], expected[k]) for k in expected)
    # --no-bounds-offset: the annotations are taken as OpenSlide's level-0 pixels
    uncropped = cut("uncropped", _features(), "openslide", bounds_offset=False)
    assert set(uncropped) == set(plain) and all(np.array_equal(uncropped[k], plain[k]) for k in plain)


def _one_error(capsys, monkeypatch, *args) -> str:
    code, _, err = run_cli(capsys, monkeypatch, *args)
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 1 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_bad_input_is_one_clear_line(slides, tri_spec, tmp_path, capsys, monkeypatch):
    one = tmp_path / "one"
    one.mkdir()
    (one / "a.tif").symlink_to(slides / "s0.tif")
    base = ("--dataset", tri_spec, "--patch", 32)

    def error(geojson, *extra) -> str:
        if geojson is not None:
            (one / "a.geojson").write_text(json.dumps(geojson) if not isinstance(geojson, str) else geojson)
        out = tmp_path / f"out{len(list(tmp_path.iterdir()))}"
        return _one_error(capsys, monkeypatch, "extract-patches", one / "a.tif", *base, "--out", out, *extra)

    assert "is not QuPath's GeoJSON: expected a FeatureCollection" in error({"type": "Polygon", "coordinates": []})
    assert "are not JSON" in error("{not json")
    assert "lies outside the slide" in error([qupath_object("TUM", [rectangle(600, 0, 700, 50)])])
    assert "ring coordinates are not [x, y] pairs" in error([qupath_object("TUM", [[["a", 1], [2, 2], [3, 1]]])])
    (tmp_path / "bad-map.csv").write_text("qupath,class\nTumor,Tumour\n")
    assert "'Tumour' is not a class of the tri spec" in error(_features(), "--class-map", tmp_path / "bad-map.csv")
    (tmp_path / "short-map.csv").write_text("qupath,class\nTUM,TUM\n")
    assert "classes not in --class-map" in error(_features(), "--class-map", tmp_path / "short-map.csv")
    assert "--val-slides: no slide named b" in error(_features(), "--val-slides", "b")
    assert "every slide is in val or test" in error(_features(), "--test-slides", "a")
    assert "at what µm/px" in _one_error(capsys, monkeypatch, "extract-patches", one / "a.tif", "--dataset", "luad",
                                         "--out", tmp_path / "x")
    (one / "a.geojson").unlink()
    assert "no annotations for" in error(None)
    # a slide without µm/px: one line, unless --slide-mpp
    bare = tmp_path / "bare"
    bare.mkdir()
    with tifffile.TiffFile(slides / "s0.tif") as tif:
        write_pyramid(bare / "b.tif", tif.pages[0].asarray(), mpp=None)
    write_qupath(bare / "b.geojson", _features())
    assert "does not record its µm/px" in _one_error(capsys, monkeypatch, "extract-patches", bare / "b.tif", *base,
                                                     "--out", tmp_path / "bare-out")
    code, _, err = run_cli(capsys, monkeypatch, "extract-patches", bare / "b.tif", *base, "--out",
                           tmp_path / "bare-ok", "--slide-mpp", 0.5)
    assert code == 0, err
    # an earlier extraction is not replaced without --force
    assert "is not empty; pass --force" in _one_error(capsys, monkeypatch, "extract-patches", bare / "b.tif", *base,
                                                      "--out", tmp_path / "bare-ok", "--slide-mpp", 0.5)


def test_force_with_fewer_slides_leaves_no_empty_split_behind(slides, tri_spec, tmp_path, capsys, monkeypatch):
    """An earlier extraction with val and test slides, replaced (--force) by one of train slides only:
    its val/ and test/ folders go with their patches (an empty val/img stopped check-data and training)."""
    out = tmp_path / "data"
    base = ("--dataset", tri_spec, "--out", out, "--patch", 32, "--min-tissue", 0.5, "--class-map", slides / "map.csv")
    code, _, err = run_cli(capsys, monkeypatch, "extract-patches", slides, *base, "--val-slides", "s1",
                           "--test-slides", "s2")
    assert code == 0 and (out / "val" / "img").is_dir() and (out / "test" / "mask").is_dir(), err
    code, _, err = run_cli(capsys, monkeypatch, "extract-patches", slides / "s0.tif", *base, "--force")
    assert code == 0, err
    assert not (out / "val").exists() and not (out / "test").exists() and any((out / "train").iterdir())
    code, _, err = run_cli(capsys, monkeypatch, "check-data", out, "--dataset", tri_spec)
    assert code == 0, err


def test_a_self_intersecting_polygon_is_repaired_and_counted(slides, tri_spec, tmp_path, capsys, monkeypatch, caplog):
    caplog.set_level(logging.INFO)
    folder = tmp_path / "s"
    folder.mkdir()
    (folder / "a.tif").symlink_to(slides / "s0.tif")
    bowtie = [[0, 0], [256, 192], [256, 0], [0, 192], [0, 0]]  # two triangles crossing at (128, 96)
    write_qupath(folder / "a.geojson", [qupath_object("TUM", [bowtie])])
    code, _, err = run_cli(capsys, monkeypatch, "extract-patches", folder, "--dataset", tri_spec, "--out",
                           tmp_path / "d", "--patch", 32, "--min-class-fraction", 0.5)
    assert code == 0, err
    summary = json.loads((tmp_path / "d" / "dataset.json").read_text())
    assert summary["slides"][0]["annotations"]["repaired"] == 1
    assert any("1 invalid polygon (self-intersecting, or a hole crossing its outline) repaired" in r.getMessage()
               for r in caplog.records)


def test_an_unreadable_slide_is_recorded_and_the_others_go_on(slides, tri_spec, tmp_path, capsys, monkeypatch):
    folder = tmp_path / "cohort"
    folder.mkdir()
    for name in ("s0", "s1"):
        (folder / f"{name}.tif").symlink_to(slides / f"{name}.tif")
        (folder / f"{name}.geojson").symlink_to(slides / f"{name}.geojson")
    (folder / "broken.tif").write_bytes(b"II*\x00" + bytes(100))
    write_qupath(folder / "broken.geojson", _features())
    code, out, err = run_cli(capsys, monkeypatch, "extract-patches", folder, "--dataset", tri_spec, "--out",
                             tmp_path / "d", "--patch", 32, "--class-map", slides / "map.csv")
    assert code == 1 and "1 slide failed:" in err and "broken.tif" in err and "2 of 3 slides" in out
    summary = json.loads((tmp_path / "d" / "dataset.json").read_text())
    assert [r["status"] for r in summary["slides"]] == ["failed", "done", "done"]
    assert summary["failed"] == [str(folder / "broken.tif")] and summary["counts"]["train"] == 2 * 27
