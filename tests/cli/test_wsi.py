"""`wsss predict-wsi`: slide readers, level and region choice, tissue mask, resumable tiled
segmentation, label images, GeoJSON polygons in level-0 coordinates, bad inputs.

Every test builds its own small pyramidal tiled TIFF with tifffile (no downloads): 512 × 384 px at
level 0, 0.5 µm/px, levels 1 and 2 at 2× and 4×, 64-px tiles; tissue (saturated pink) in the
top-left quarter, glass (near-white grey) everywhere else.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from helpers import (
    tiny_checkpoint,
    HAVE_OPENSLIDE, SLIDE_MPP, assert_one_line_error, live_lock, run_cli, slide_pixels, spy_on_models, write_lock,
    write_pyramid_levels,
)
from wsss.models import loading
from wsss.data.background import white_mask
from wsss.data.specs import LUAD
from wsss.errors import WsssError
from wsss import inference as I
from wsss import tiling as TL
from wsss.wsi import geojson as G
from wsss.wsi import label_image as L
from wsss.wsi import predict_wsi as W
from wsss.wsi import slide as S
from wsss.wsi import tissue as T

TILE, OVERLAP = 64, 16  # level 1 (256 × 192): window columns at 0, 48, 96, 144, 192; rows at 0, 48, 96, 128
XS, YS = [0, 48, 96, 144, 192], [0, 48, 96, 128]
MPP = 0.5

@pytest.fixture(scope="module")
def slide(tmp_path_factory) -> tuple[Path, list[np.ndarray]]:
    path = tmp_path_factory.mktemp("wsi") / "slide.tif"
    return path, write_pyramid_levels(path, slide_pixels())


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """An untrained tiny stage-2 checkpoint trained "at 32 px": 64-px windows are halved."""
    return tiny_checkpoint(tmp_path_factory.mktemp("wsi_ckpt") / "s2.pth", 2)


@pytest.fixture(scope="module")
def s1_ckpt(tmp_path_factory) -> Path:
    """An untrained thin stage-1 classifier for the gate."""
    return tiny_checkpoint(tmp_path_factory.mktemp("wsi_ckpt") / "s1.pth", 1, seed=1, image_size=48)


@pytest.fixture(scope="module")
def predictor(ckpt) -> I.TilePredictor:
    return I.TilePredictor(loading.load_segmenter(ckpt), TILE, torch.device("cpu"))


def _args(slide_path, ckpt, out, *extra):
    return ("predict-wsi", slide_path, "--checkpoint", ckpt, "--out", out, "--tile", TILE, "--overlap", OVERLAP,
            "--device", "cpu", *extra)


def _read_png(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        assert img.mode == "P"
        return np.asarray(img)


# --------------------------------------------------------------------------- readers


READER_NAMES = ["tifffile"] + (["openslide"] if HAVE_OPENSLIDE else [])


@pytest.mark.parametrize("reader", READER_NAMES)
def test_readers_give_levels_mpp_and_pixels(slide, reader):
    path, levels = slide
    with S.open_slide(path, reader) as s:
        assert s.reader == reader
        assert s.dimensions == ((512, 384), (256, 192), (128, 96))
        assert s.downsamples == (1.0, 2.0, 4.0)
        assert s.mpp == pytest.approx((MPP, MPP))
        # across tile borders, and flush with the level's right and bottom edges
        assert np.array_equal(s.read(1, 10, 20, 70, 50), levels[1][20:70, 10:80])
        assert np.array_equal(s.read(1, 200, 150, 56, 42), levels[1][150:192, 200:256])
        assert np.array_equal(s.read(0, 0, 0, 512, 384), levels[0])
        with pytest.raises(ValueError, match="outside level 2"):
            s.read(2, 100, 0, 29, 10)


@pytest.mark.skipif(not HAVE_OPENSLIDE, reason="OpenSlide is not installed")
def test_openslide_keeps_a_vendors_mpp_and_filters_a_generic_tiffs_dpi(tmp_path, monkeypatch):
    """A TIFF OpenSlide reads: what tifffile finds in it comes first; else OpenSlide's own µm/px, kept
    for a vendor's format (Philips, Ventana: their metadata, not the resolution tags) and, for a
    generic TIFF (taken from the resolution tags), dropped when it is a print resolution."""
    import openslide

    path = tmp_path / "s.tif"
    tifffile.imwrite(path, slide_pixels(seed=1)[:256, :256], photometric="rgb", tile=(128, 128))
    properties = openslide.OpenSlide.properties

    def reporting(vendor: str, mpp: str):
        def props(self):
            return {**properties.fget(self), "openslide.vendor": vendor, "openslide.mpp-x": mpp,
                    "openslide.mpp-y": mpp}
        monkeypatch.setattr(openslide.OpenSlide, "properties", property(props))

    reporting("philips", "0.242")
    with S.open_slide(path, "openslide") as s:
        assert s.mpp == pytest.approx((0.242, 0.242))
    reporting("generic-tiff", "352.777")  # 72 dpi
    with S.open_slide(path, "openslide") as s:
        assert s.mpp is None
    reporting("generic-tiff", "0.5")
    with S.open_slide(path, "openslide") as s:
        assert s.mpp == pytest.approx((0.5, 0.5))
    # tifffile's record (OME-XML here) comes first
    tifffile.imwrite(path, slide_pixels(seed=1)[:256, :256], photometric="rgb", tile=(128, 128), ome=True,
                     metadata={"axes": "YXS", "PhysicalSizeX": 0.25, "PhysicalSizeY": 0.25})
    reporting("philips", "0.242")
    with S.open_slide(path, "openslide") as s:
        assert s.mpp == pytest.approx((0.25, 0.25))


def test_auto_reader_and_tiffs_without_openslide(slide, tmp_path, monkeypatch):
    path, levels = slide
    with S.open_slide(path) as s:
        assert s.reader == ("openslide" if HAVE_OPENSLIDE else "tifffile")
    # a stripped (untiled), single-level TIFF: OpenSlide refuses it, tifffile reads it strip by strip
    image = slide_pixels(seed=3)[:100, :150]
    tifffile.imwrite(tmp_path / "strips.tif", image, photometric="rgb", rowsperstrip=16)
    with S.open_slide(tmp_path / "strips.tif") as s:
        assert (s.reader, s.dimensions, s.mpp) == ("tifffile", ((150, 100),), None)
        assert np.array_equal(s.read(0, 5, 10, 100, 80), image[10:90, 5:105])
    # without OpenSlide installed, TIFFs still open (with tifffile); other formats say what to install
    monkeypatch.setattr(S, "_import_openslide", lambda: None)
    with S.open_slide(path) as s:
        assert s.reader == "tifffile"
    (tmp_path / "x.svs").write_bytes(b"not really a slide")
    with pytest.raises(WsssError, match=r"reading \.svs slides needs OpenSlide: pip install openslide-python openslide-bin"):
        S.open_slide(tmp_path / "x.svs")
    with pytest.raises(WsssError, match=r"pip install openslide-python openslide-bin"):
        S.open_slide(path, "openslide")


def test_tiff_mpp_from_resolution_tags(tmp_path, caplog):
    image = np.zeros((8, 8, 3), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "inch.tif", image, resolution=(25400 / 0.25, 25400 / 0.4), resolutionunit="INCH")
    tifffile.imwrite(tmp_path / "none.tif", image)  # ResolutionUnit "none"
    with tifffile.TiffFile(tmp_path / "inch.tif") as tif:
        assert S.tiff_mpp(tif.pages[0].tags) == pytest.approx((0.25, 0.4))
    with tifffile.TiffFile(tmp_path / "none.tif") as tif:
        assert S.tiff_mpp(tif.pages[0].tags) is None
    # 72 dpi is 352.8 µm/px: a screen's resolution, not a scan's; a slide that records only that records none
    tifffile.imwrite(tmp_path / "dpi.tif", image, resolution=(72.0, 72.0), resolutionunit="INCH")
    with tifffile.TiffFile(tmp_path / "dpi.tif") as tif:
        assert S.tiff_mpp(tif.pages[0].tags) is None
    with S.open_slide(tmp_path / "dpi.tif", "tifffile") as slide:
        assert slide.mpp is None
    # ImageJ/Fiji: pixels per "micron" (or "\u00B5m", as it writes µ) with ResolutionUnit "none"
    for unit in ("micron", "\\u00B5m", "mm"):
        tifffile.imwrite(tmp_path / "ij.tif", image, imagej=True, resolution=(4.0, 4.0), metadata={"unit": unit})
        with S.open_slide(tmp_path / "ij.tif", "tifffile") as slide:  # 4 px a mm: 250 µm/px, out of range
            assert slide.mpp == (None if unit == "mm" else pytest.approx((0.25, 0.25)))
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == [
        f"warning: {tmp_path / 'ij.tif'} records 250 µm/px (outside 0.05 to 100): taken as not recorded "
        "(--slide-mpp or a manifest's mpp gives it)"]


def test_aperio_mpp_read_by_tifffile(tmp_path):
    """An .svs forced through tifffile takes its µm/px from the Aperio description, as OpenSlide does."""
    description = ("Aperio Image Library v11.2.1 \n46000x32914 [0,100 46000x32914] (256x256) JPEG/RGB Q=30"
                   "|AppMag = 20|MPP = 0.4990|Left = 25.69")
    path = tmp_path / "aperio.svs"
    tifffile.imwrite(path, np.zeros((64, 64, 3), np.uint8), tile=(32, 32), photometric="rgb", description=description)
    with S.open_slide(path, "tifffile") as s:
        assert s.mpp == pytest.approx((0.499, 0.499))
    assert S.aperio_mpp("Aperio Image Library|AppMag = 20") is None
    assert S.aperio_mpp("Aperio Image Library|MPP = n/a") is None
    assert S.aperio_mpp("ImageJ=1.5|MPP = 0.5") is None


def test_rgba_on_white():
    rgba = np.array([[[10, 20, 30, 255], [10, 20, 30, 0], [0, 100, 200, 51]]], dtype=np.uint8)
    # alpha 51 = 0.2: 0.2 · colour + 0.8 · 255
    assert S.rgba_on_white(rgba).tolist() == [[[10, 20, 30], [255, 255, 255], [204, 224, 244]]]


def test_resampled_reads_and_thumbnails(slide):
    path, levels = slide
    with S.open_slide(path, "tifffile") as s:
        assert np.array_equal(S.read_resampled(s, 1, (8, 4, 40, 20), (32, 16)), levels[1][4:20, 8:40])
        # bands of a level shrunk by 2/3 match the whole level shrunk at once (PIL, bilinear)
        whole = np.asarray(Image.fromarray(levels[1]).resize((171, 128), Image.BILINEAR))
        for top, bottom in ((0, 40), (40, 100), (100, 128)):
            band = S.read_resampled(s, 1, (0, top * 1.5, 256, bottom * 1.5), (171, bottom - top))
            assert np.abs(band.astype(int) - whole[top:bottom]).max() <= 1
        # a thumbnail comes from the coarsest level at least as fine: 128 × 96 is level 2 itself
        assert np.array_equal(S.read_thumbnail(s, (0, 0, 512, 384), (128, 96)), levels[2])
        assert S.fit_size(512, 384, 100) == (100, 75) and S.fit_size(50, 20, 100) == (50, 20)


# --------------------------------------------------------------------------- level, region, tissue (pure)


def test_choose_level_by_level_or_mpp():
    ds, mpp = (1.0, 2.0, 4.0), (0.5, 0.5)
    assert W.choose_level(ds, mpp) == (0, 1.0)
    assert W.choose_level(ds, mpp, level=2) == (2, 1.0)
    assert W.choose_level(ds, None, level=1) == (1, 1.0)  # --level needs no mpp
    assert W.choose_level(ds, mpp, mpp=1.0) == (1, 1.0)
    assert W.choose_level(ds, mpp, mpp=1.5) == (1, pytest.approx(2 / 3))  # level 1 (1 µm/px) shrunk by 1/1.5
    assert W.choose_level(ds, mpp, mpp=4.0) == (2, 0.5)
    assert W.choose_level(ds, mpp, mpp=2.05) == (2, 1.0)  # within 5%: read as it is
    assert W.choose_level(ds, mpp, mpp=0.49) == (0, 1.0)
    with pytest.raises(WsssError, match=r"--level 3: the slide has levels 0 to 2"):
        W.choose_level(ds, mpp, level=3)
    with pytest.raises(WsssError, match=r"--mpp 0.4 is finer than the slide's level 0 \(0.5 µm/px\)"):
        W.choose_level(ds, mpp, mpp=0.4)
    with pytest.raises(WsssError, match="does not record"):
        W.choose_level(ds, None, mpp=1.0)


def test_grid_maps_label_pixels_to_level_0():
    dims, ds = ((512, 384), (256, 192), (128, 96)), (1.0, 2.0, 4.0)
    g = W.plan_grid(dims, ds, 1, 1.0, (100, 60, 200, 100))
    assert (g.box, g.size, g.origin, g.downsample) == ((50, 30, 150, 80), (100, 50), (100.0, 60.0), (2.0, 2.0))
    assert g.to_level0(np.array([[0, 0], [100, 50], [3, 1]])).tolist() == [[100, 60], [300, 160], [106, 62]]
    # a region off the level's pixel grid is widened to whole level pixels
    g = W.plan_grid(dims, ds, 1, 1.0, (101, 61, 200, 100))
    assert (g.box, g.size, g.origin) == ((50, 30, 151, 81), (101, 51), (100.0, 60.0))
    # resized by 2/3: 256 × 192 → 171 × 128 label pixels; corners still land on the slide's
    g = W.plan_grid(dims, ds, 1, 2 / 3, None)
    assert g.size == (171, 128) and g.downsample == pytest.approx((512 / 171, 3.0))
    assert g.to_level0(np.array([[171.0, 128.0]])).tolist() == [[pytest.approx(512), 384]]
    assert g.rows_box(64, 128) == (0, 96.0, 256, 192.0)
    assert g.mpp((0.5, 0.5)) == pytest.approx((0.5 * 512 / 171, 1.5)) and g.mpp(None) is None
    with pytest.raises(WsssError, match=r"--roi 400,0,200,10 reaches beyond the slide \(512×384"):
        W.plan_grid(dims, ds, 0, 1.0, (400, 0, 200, 10))


def test_replay_start_goes_back_to_every_row_that_reaches_the_next():
    assert [W.replay_start(YS, TILE, k) for k in range(5)] == [0, 0, 1, 2, 4]  # 48 + 64 > 96; 96 + 64 > 128
    ys = TL.tile_starts(100, 64, 48)  # stride 16: three rows above reach row 36
    assert ys == [0, 16, 32, 36] and W.replay_start(ys, 64, 3) == 0


def test_saturation_otsu_and_tissue_fractions():
    pixels = np.array([[[255, 0, 0], [200, 100, 100], [90, 90, 90], [0, 0, 0]]], dtype=np.uint8)
    assert T.saturation(pixels).tolist() == [[255, 127, 0, 0]]  # 255 · 100 / 200 = 127.5
    # between-class variance w0·w1·(m0 - m1)²: {0} | {100, 200, 200}: 3 · 166.7² = 83,333;
    # {0, 100} | {200, 200}: 4 · 150² = 90,000 (the largest), so t = 100
    assert T.otsu_threshold(np.array([0, 100, 200, 200])) == 100
    assert T.otsu_threshold(np.array([0, 0, 100, 200])) == 0  # 4 · 150² against 3 · 166.7²
    assert T.otsu_threshold(np.array([10] * 4 + [200] * 4)) == 10  # the smallest of the tied thresholds
    assert T.otsu_threshold(np.full(9, 7)) == 0
    grey = np.full((4, 4, 3), 240, dtype=np.uint8)
    assert T.tissue_threshold(grey) == T.MIN_SATURATION  # nothing to separate: the floor
    tissue = np.zeros((4, 10), dtype=bool)
    tissue[:2, 3:7] = True
    assert T.tissue_fractions(tissue, [0, 3, 6], 4) == [0.125, 0.5, 0.125]


# --------------------------------------------------------------------------- GeoJSON (pure)


def test_trace_outline_single_pixel_and_corners_only():
    mask = np.zeros((5, 6), dtype=bool)
    mask[2, 3] = True
    assert G.trace_outline(mask) == [(3, 2), (4, 2), (4, 3), (3, 3), (3, 2)]
    mask[2:4, 1:4] = True  # a 2 × 3 block; straight runs keep no middle points
    mask[1, 1] = True  # an L: the block and one pixel on top of its left column
    assert G.trace_outline(mask) == [(1, 1), (2, 1), (2, 2), (4, 2), (4, 4), (1, 4), (1, 1)]


def test_regions_holes_and_diagonal_touches():
    ring = np.ones((3, 3), dtype=np.uint8)
    ring[1, 1] = 0
    [(c, rings)] = list(G.class_regions(ring, [1]))
    assert c == 1 and rings == [[(0, 0), (3, 0), (3, 3), (0, 3), (0, 0)], [(1, 1), (1, 2), (2, 2), (2, 1), (1, 1)]]
    assert [G.ring_area(r) for r in rings] == [9, -1]
    # pixels touching only at a corner are separate regions (4-connected)
    diagonal = np.array([[1, 0], [0, 1]], dtype=np.uint8)
    assert [rings for _, rings in G.class_regions(diagonal, [1])] == [
        [[(0, 0), (1, 0), (1, 1), (0, 1), (0, 0)]], [[(1, 1), (2, 1), (2, 2), (1, 2), (1, 1)]]]
    # inside one region, a hole touching the outside at a corner: the exterior ring cuts across
    # the corner (2, 2) once and the hole touches it there (valid), no ring repeats a point
    pinched = np.array([[1, 1, 1], [1, 0, 1], [1, 1, 0]], dtype=np.uint8)
    [(_, rings)] = list(G.class_regions(pinched, [1]))
    assert rings == [[(0, 0), (3, 0), (3, 2), (2, 2), (2, 3), (0, 3), (0, 0)], [(1, 1), (1, 2), (2, 2), (2, 1), (1, 1)]]
    assert sum(G.ring_area(r) for r in rings) == 7


def test_polygons_cover_exactly_the_pixels_of_random_label_images():
    rng = np.random.default_rng(0)
    for _ in range(150):
        labels = rng.integers(0, 3, (rng.integers(1, 10), rng.integers(1, 10))).astype(np.uint8)
        for c in range(3):
            area = 0.0
            for _, rings in G.class_regions(labels, [c]):
                assert G.ring_area(rings[0]) > 0 and all(G.ring_area(r) < 0 for r in rings[1:])
                for r in rings:
                    assert r[0] == r[-1] and len(set(r[:-1])) == len(r) - 1  # closed, simple at vertices
                area += sum(G.ring_area(r) for r in rings)
            assert area == (labels == c).sum()


def test_features_are_qupath_objects_in_level_0_coordinates():
    labels = np.full((4, 8), LUAD.background_index, dtype=np.uint8)
    labels[1:3, 3:6] = 2  # LYM: 3 × 2 label pixels at column 3, row 1
    labels[0, 7] = 2  # and one more LYM pixel, apart
    grid = W.Grid(level=1, level_downsample=2.0, box=(50, 30, 58, 34), size=(8, 4))  # origin (100, 60)
    # per region: Polygons, areas in level-0 px² (2 × 2 per label pixel) when µm/px is unknown
    first, second = G.class_features(labels, LUAD, grid.to_level0, G.GeoJsonOptions("per-region"), None, 4.0)
    assert first == {
        "type": "Feature",
        "geometry": {"type": "Polygon", "coordinates": [[[114, 60], [116, 60], [116, 62], [114, 62], [114, 60]]]},
        "properties": {"objectType": "annotation", "classification": {"name": "LYM", "color": [65, 105, 225]},
                       "measurements": {"wsss area px^2": 4.0}},
    }
    assert second["geometry"]["coordinates"] == [[[106, 62], [112, 62], [112, 66], [106, 66], [106, 62]]]
    assert second["properties"]["measurements"] == {"wsss area px^2": 24.0}
    # per class: one MultiPolygon of both, as detections, areas in µm² (0.25 µm² per label pixel)
    [both] = G.class_features(labels, LUAD, grid.to_level0, G.GeoJsonOptions("per-class", "detection"), 0.25, 4.0)
    assert both["geometry"] == {"type": "MultiPolygon", "coordinates": [first["geometry"]["coordinates"],
                                                                         second["geometry"]["coordinates"]]}
    assert both["properties"]["objectType"] == "detection"
    assert both["properties"]["measurements"] == {"wsss area µm^2": 7 * 0.25, "wsss regions": 2}
    # --min-area 1 µm² drops the 1-pixel region (0.25 µm²) and keeps the 6-pixel one (1.5 µm²)
    [kept] = G.class_features(labels, LUAD, grid.to_level0, G.GeoJsonOptions("per-class", min_area=1.0), 0.25, 4.0)
    assert kept["geometry"]["coordinates"] == [second["geometry"]["coordinates"]]
    with pytest.raises(WsssError, match="--min-area is in µm², and the slide does not record its µm/px"):
        G.class_features(labels, LUAD, grid.to_level0, G.GeoJsonOptions(min_area=1.0), None)
    for bad, message in (({"mode": "per-slide"}, "--geojson-mode must be one of per-class, per-region"),
                         ({"object_type": "cell"}, "--object-type must be one of annotation, detection"),
                         ({"min_area": -1.0}, "--min-area is an area in µm²"),
                         ({"simplify": -0.5}, "--simplify is a tolerance in label pixels")):
        with pytest.raises(WsssError, match=message):
            G.GeoJsonOptions(**bad)


# --------------------------------------------------------------------------- the command


def test_predict_wsi_skips_glass_and_writes_everything(slide, ckpt, predictor, tmp_path, capsys, monkeypatch):
    path, levels = slide
    out = tmp_path / "out"
    code, stdout, err = run_cli(capsys, monkeypatch, *_args(path, ckpt, out, "--level", 1, "--geojson",
                                                            "--geojson-mode", "per-region"))
    assert code == 0, err
    assert "level 1 (downsample 2, 1 µm/px), 256×192 px; tiles: 6 segmented, 14 without tissue skipped" in stdout
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "slide.geojson", "slide_mask.png", "slide_overlay.png", "slide_summary.json"]
    summary = json.loads((out / "slide_summary.json").read_text())
    # tissue: level-1 rows [0, 96), columns [0, 128). Windows with >= 5% of it: columns 0, 48, 96 (96: half)
    # by rows 0, 48 (48: 48 of 64 rows); row 96 and column 144 hold none.
    assert summary["tiles"] == {"total": 20, "segmented": 6, "skipped": 14}
    assert (summary["level"], summary["size"], summary["mpp"], summary["region"]) == (1, [256, 192], [1, 1],
                                                                                      [0, 0, 512, 384])
    assert summary["tissue_threshold"] == T.MIN_SATURATION  # glass 0..7, tissue >= 111: Otsu says 7, floor 20

    mask = _read_png(out / "slide_mask.png")
    assert mask.shape == (192, 256)
    covered = np.zeros_like(mask, dtype=bool)
    covered[:48 + TILE, :96 + TILE] = True  # the six segmented windows
    assert np.all(mask[~covered] == 4) and np.all(mask[:96, :128] < 4)

    # the same run segmenting every window (read with tifffile): equal wherever no skipped window
    # reaches (rows < 96, columns < 144)
    code, _, err = run_cli(capsys, monkeypatch, *_args(path, ckpt, tmp_path / "all", "--level", 1,
                                                       "--min-tissue", 0, "--reader", "tifffile"))
    assert code == 0, err
    assert json.loads((tmp_path / "all" / "slide_summary.json").read_text())["reader"] == "tifffile"
    full = _read_png(tmp_path / "all" / "slide_mask.png")
    expected = TL.predict_mask(levels[1], predictor, TILE, OVERLAP, 8)  # `wsss predict` on level 1 as an image
    expected[white_mask(levels[1])] = 4
    assert np.array_equal(full, expected)
    assert np.array_equal(mask[:96, :144], full[:96, :144])

    counts = np.bincount(mask.ravel(), minlength=5)
    for i, name in enumerate([*LUAD.classes, "background"]):
        entry = summary["classes"][name]
        assert entry["pixels"] == counts[i] and entry["area_um2"] == pytest.approx(counts[i] * 1.0)  # 1 µm/px
        assert entry["fraction"] == pytest.approx(counts[i] / mask.size)

    collection = json.loads((out / "slide.geojson").read_text())
    assert collection["type"] == "FeatureCollection" and len(collection["features"]) == summary["regions"]
    areas = dict.fromkeys(LUAD.classes, 0.0)
    for f in collection["features"]:
        props = f["properties"]
        assert props["objectType"] == "annotation" and f["geometry"]["type"] == "Polygon"
        name = props["classification"]["name"]
        assert props["classification"]["color"] == list(LUAD.palette[LUAD.classes.index(name)])
        rings = f["geometry"]["coordinates"]
        assert all(r[0] == r[-1] for r in rings)
        xy = np.concatenate([np.asarray(r) for r in rings])
        assert xy.min() >= 0 and xy[:, 0].max() <= 2 * (96 + TILE) and xy[:, 1].max() <= 2 * (48 + TILE)
        assert np.all(xy % 2 == 0)  # label pixel corners, ×2 at level 0
        areas[name] += sum(G.ring_area(r) for r in rings)
        # level 0 is 0.5 µm/px: 0.25 µm² per level-0 px²
        assert props["measurements"]["wsss area µm^2"] == 0.25 * sum(G.ring_area(r) for r in rings)
    assert [areas[n] for n in LUAD.classes] == [4 * counts[i] for i in range(4)]  # level-0 px² = 2 × 2 per pixel

    with Image.open(out / "slide_overlay.png") as img:
        canvas = np.asarray(img.convert("RGB"))
    assert canvas.shape[1] >= 256 and np.array_equal(canvas[:192, :256][mask == 4], levels[1][mask == 4])


def test_roi_and_mpp_map_back_to_level_0(slide, ckpt, s1_ckpt, predictor, tmp_path, capsys, monkeypatch):
    path, levels = slide
    # a region inside the tissue, at level 1: label pixels = the level-1 crop [40, 90) × [30, 125),
    # gated per window as `wsss predict` gates
    code, _, err = run_cli(capsys, monkeypatch, *_args(path, ckpt, tmp_path / "roi", "--level", 1,
                                                       "--roi", "60,80,190,100", "--geojson", "--gate",
                                                       "--geojson-mode", "per-region",
                                                       "--stage1-checkpoint", s1_ckpt, "--gate-threshold", 0.5))
    assert code == 0, err
    mask = _read_png(tmp_path / "roi" / "slide_mask.png")
    crop = levels[1][40:90, 30:125]
    gated = I.TilePredictor(predictor.seg, TILE, torch.device("cpu"), loading.load_classifier(s1_ckpt, 4), 0.5)
    assert np.array_equal(mask, TL.predict_mask(crop, gated, TILE, OVERLAP, 8))
    summary = json.loads((tmp_path / "roi" / "slide_summary.json").read_text())
    assert summary["region"] == [60, 80, 250, 180] and summary["tiles"]["skipped"] == 0
    features = json.loads((tmp_path / "roi" / "slide.geojson").read_text())["features"]
    xy = np.concatenate([np.asarray(r) for f in features for r in f["geometry"]["coordinates"]])
    assert xy[:, 0].min() == 60 and xy[:, 1].min() == 80 and xy[:, 0].max() == 250 and xy[:, 1].max() == 180
    # the region of the top-left label pixel starts at the ROI's corner in level-0 pixels
    first = LUAD.classes[mask[0, 0]]
    assert any(f["properties"]["classification"]["name"] == first
               and f["geometry"]["coordinates"][0][0] == [60, 80] for f in features)

    # --mpp 1.5: level 1 (1 µm/px) shrunk by 2/3 to 171 × 128 label pixels of 1.497 × 1.5 µm
    code, stdout, err = run_cli(capsys, monkeypatch, *_args(path, ckpt, tmp_path / "mpp", "--mpp", 1.5))
    assert code == 0, err
    summary = json.loads((tmp_path / "mpp" / "slide_summary.json").read_text())
    assert (summary["level"], summary["size"]) == (1, [171, 128])
    assert summary["mpp"] == pytest.approx([0.5 * 512 / 171, 1.5])
    mask = _read_png(tmp_path / "mpp" / "slide_mask.png")
    assert mask.shape == (128, 171)
    te = int((mask == 0).sum())
    assert summary["classes"]["TE"]["area_um2"] == pytest.approx(te * 0.5 * 512 / 171 * 1.5)


@pytest.mark.skipif(not HAVE_OPENSLIDE, reason="needs OpenSlide")
def test_geojson_is_shifted_as_qupath_crops_slides_to_their_bounds(slide, ckpt, tmp_path, capsys, monkeypatch):
    """QuPath shows a slide with openslide.bounds-* cropped: its pixel (0, 0) is OpenSlide's level-0
    (bounds-x, bounds-y), and imported objects are placed in those coordinates."""
    import openslide

    path, _ = slide
    args = ("--level", 1, "--geojson", "--reader", "openslide", "--geojson-mode", "per-region")

    def coordinates(out):
        features = json.loads((out / "slide.geojson").read_text())["features"]
        return [np.asarray(r) for f in features for r in f["geometry"]["coordinates"]]

    assert run_cli(capsys, monkeypatch, *_args(path, ckpt, tmp_path / "plain", *args))[0] == 0
    plain = coordinates(tmp_path / "plain")
    properties = openslide.OpenSlide.properties

    def with_bounds(self):  # what a MIRAX or Leica SCN slide reports
        return {**properties.fget(self), "openslide.bounds-x": "40", "openslide.bounds-y": "20",
                "openslide.bounds-width": "400", "openslide.bounds-height": "300"}

    monkeypatch.setattr(openslide.OpenSlide, "properties", property(with_bounds))
    assert run_cli(capsys, monkeypatch, *_args(path, ckpt, tmp_path / "cropped", *args))[0] == 0
    cropped = coordinates(tmp_path / "cropped")
    assert len(cropped) == len(plain) and all(np.array_equal(c, p - [40, 20]) for c, p in zip(cropped, plain))
    assert json.loads((tmp_path / "cropped" / "slide_summary.json").read_text())["geojson_offset"] == [40, 20]
    assert run_cli(capsys, monkeypatch, *_args(path, ckpt, tmp_path / "uncropped", *args, "--no-bounds-offset"))[0] == 0
    assert all(np.array_equal(c, p) for c, p in zip(coordinates(tmp_path / "uncropped"), plain))


def test_an_interrupted_run_resumes_where_it_stopped(slide, ckpt, tmp_path, capsys, monkeypatch):
    path, _ = slide
    spies, spy_load = spy_on_models(monkeypatch, W)

    # every window segmented, one batch (5 windows) per window row: one call per row, 4 rows
    args = ("--level", 1, "--min-tissue", 0, "--batch-size", 5, "--geojson")
    spy_load(None)
    assert run_cli(capsys, monkeypatch, *_args(path, ckpt, tmp_path / "once", *args))[0] == 0
    assert spies[-1].calls == 4

    out = tmp_path / "out"
    spy_load(3)  # stopped during window row 2: rows 0 and 1 are on disk
    code, _, err = run_cli(capsys, monkeypatch, *_args(path, ckpt, out, *args))
    assert code == 130
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["slide_partial"]
    state = json.loads((out / "slide_partial" / "state.json").read_text())["state"]
    assert (state["rows_done"], state["segmented"], state["skipped"]) == (2, 10, 0)

    spy_load(None)
    code, _, err = run_cli(capsys, monkeypatch, *_args(path, ckpt, out, *args))
    assert code == 0, err
    assert spies[-1].calls == 3  # row 1 again (its windows reach row 2's), then rows 2 and 3
    assert not (out / "slide_partial").exists()
    for name in ("slide_mask.png", "slide.geojson"):
        assert (out / name).read_bytes() == (tmp_path / "once" / name).read_bytes()
    summary = json.loads((out / "slide_summary.json").read_text())
    assert summary["tiles"] == {"total": 20, "segmented": 20, "skipped": 0}

    # the same command once finished: not segmented again
    assert run_cli(capsys, monkeypatch, *_args(path, ckpt, out, *args))[0] == 0 and spies[-1].calls == 0
    # an unfinished run (3 of 4 rows) with other settings is not continued: all 4 rows again
    spy_load(4)
    assert run_cli(capsys, monkeypatch, *_args(path, ckpt, out, *args, "--overlap", 4))[0] == 130
    spy_load(None)
    assert run_cli(capsys, monkeypatch, *_args(path, ckpt, out, *args, "--overlap", 8))[0] == 0
    assert len(TL.tile_starts(192, 64, 8)) == 4 and spies[-1].calls == 4


def test_a_resumed_run_rebuilds_the_batches_that_span_rows(slide, ckpt, tmp_path, capsys, monkeypatch):
    """Batches of 8 with 5 windows a row: rows go in groups of 2 (10 windows: batches of 8 and 2).
    A conv's floating-point result depends on the batch it ran in, so a resumed run must run the
    same batches: it goes back to the start of the group holding the rows it must replay."""
    path, _ = slide
    spies, spy_load = spy_on_models(monkeypatch, W)

    args = ("--level", 1, "--min-tissue", 0, "--batch-size", 8, "--geojson")
    spy_load(None)
    assert run_cli(capsys, monkeypatch, *_args(path, ckpt, tmp_path / "once", *args))[0] == 0
    assert spies[-1].calls == 4
    out = tmp_path / "out"
    spy_load(3)  # stopped in the second group's first batch: rows 0 and 1 are on disk
    assert run_cli(capsys, monkeypatch, *_args(path, ckpt, out, *args))[0] == 130
    assert json.loads((out / "slide_partial" / "state.json").read_text())["state"]["rows_done"] == 2
    spy_load(None)
    assert run_cli(capsys, monkeypatch, *_args(path, ckpt, out, *args))[0] == 0
    # row 2's blend needs row 1's windows (48 + 64 > 96): row 1's whole group (rows 0 and 1) again
    assert spies[-1].calls == 4
    for name in ("slide_mask.png", "slide.geojson"):
        assert (out / name).read_bytes() == (tmp_path / "once" / name).read_bytes()


# --------------------------------------------------------------------------- the output folder: lock, manifest, the user's files


def _visible(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


def test_predict_wsi_never_replaces_a_file_it_did_not_write_unless_forced(slide, ckpt, tmp_path, capsys,
                                                                          monkeypatch):
    path, _ = slide
    spies, spy_load = spy_on_models(monkeypatch, W)
    spy_load(None)
    out = tmp_path / "out"
    out.mkdir()
    args = _args(path, ckpt, out, "--level", 1, "--geojson")
    for name in ("slide_overlay.png", "slide_mask.png", "slide_summary.json", "slide.geojson"):
        mine = out / name
        mine.write_bytes(b"the user's own " + name.encode())
        err = assert_one_line_error(capsys, monkeypatch, *args)
        assert f"{mine} exists and was not written by wsss" in err and "--force" in err, err
        assert mine.read_bytes() == b"the user's own " + name.encode()
        assert _visible(out) == [name] and not list(out.glob(".wsss-lock*"))  # nothing else written, unlocked
        assert all(spy.calls == 0 for spy in spies)  # refused before any window was segmented
        mine.unlink()

    mine = out / "slide_overlay.png"
    mine.write_bytes(b"the user's own overlay")
    code, _, err = run_cli(capsys, monkeypatch, *args, "--force")
    assert code == 0, err
    assert spies[-1].calls > 0 and mine.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # replaced, as asked
    assert _visible(out) == ["slide.geojson", "slide_mask.png", "slide_overlay.png", "slide_summary.json"]
    mask = (out / "slide_mask.png").read_bytes()

    # the same command again, without --force: every file there is one wsss wrote, and the slide is
    # finished with these models and settings: not segmented again (as a cohort skips it), files kept
    stamps = {name: (out / name).stat().st_mtime_ns for name in _visible(out)}
    code, printed, err = run_cli(capsys, monkeypatch, *args)
    assert code == 0, err
    assert spies[-1].calls == 0 and (out / "slide_mask.png").read_bytes() == mask
    assert {name: (out / name).stat().st_mtime_ns for name in _visible(out)} == stamps
    assert "finished earlier with these models and settings (not segmented again): " in printed
    # an output edited since is not wsss's any more: the finished slide is refused (its file would be
    # replaced), and with --force segmented again and the file replaced
    (out / "slide_mask.png").write_bytes(b"edited")
    err = assert_one_line_error(capsys, monkeypatch, *args)
    assert "slide_mask.png exists and was not written by wsss" in err
    code, printed, err = run_cli(capsys, monkeypatch, *args, "--force")
    assert code == 0 and spies[-1].calls > 0 and "written: " in printed, err
    assert (out / "slide_mask.png").read_bytes() == mask
    # another setting (here --min-tissue) is segmented again
    code, _, err = run_cli(capsys, monkeypatch, *args, "--min-tissue", 0.2)
    assert code == 0, err
    assert spies[-1].calls > 0


def test_a_finished_slide_read_at_another_level_now_is_segmented_again(slide, ckpt, tmp_path, capsys, monkeypatch):
    """The same options can pick another level when the slide's µm/px is read otherwise (a newer rule
    for its metadata): the finished outputs are of the old level, so the slide is segmented again."""
    path, _ = slide
    spies, spy_load = spy_on_models(monkeypatch, W)
    args = _args(path, ckpt, tmp_path / "out", "--mpp", 2 * SLIDE_MPP)
    spy_load(None)
    assert run_cli(capsys, monkeypatch, *args)[0] == 0
    summary = json.loads((tmp_path / "out" / "slide_summary.json").read_text())
    assert summary["level"] == 1
    spy_load(None)
    assert run_cli(capsys, monkeypatch, *args)[0] == 0 and spies[-1].calls == 0  # finished: skipped
    open_job = W.open_job

    def read_otherwise(*a, **k):  # the slide's µm/px now read as twice as coarse: level 0 is 2 × SLIDE_MPP
        slide = open_job(*a, **k)
        slide.mpp = (2 * SLIDE_MPP, 2 * SLIDE_MPP)
        return slide

    monkeypatch.setattr(W, "open_job", read_otherwise)
    spy_load(None)
    code, printed, err = run_cli(capsys, monkeypatch, *args)
    assert code == 0 and spies[-1].calls > 0 and "written: " in printed, err
    assert json.loads((tmp_path / "out" / "slide_summary.json").read_text())["level"] == 0


def test_predict_wsi_removes_only_the_earlier_outputs_it_wrote(slide, ckpt, tmp_path, capsys, monkeypatch):
    """A run without --geojson removes the GeoJSON of an earlier run with it, and a PNG label image
    the OME-TIFF of an earlier run; the user's own files of those names stay, --force or not."""
    path, _ = slide
    ours = tmp_path / "ours"
    assert run_cli(capsys, monkeypatch, *_args(path, ckpt, ours, "--level", 1, "--geojson",
                                               "--mask-format", "ome-tiff"))[0] == 0
    assert _visible(ours) == ["slide.geojson", "slide_mask.ome.tif", "slide_overlay.png", "slide_summary.json"]
    assert run_cli(capsys, monkeypatch, *_args(path, ckpt, ours, "--level", 1))[0] == 0
    assert _visible(ours) == ["slide_mask.png", "slide_overlay.png", "slide_summary.json"]

    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "slide.geojson").write_text('{"type": "FeatureCollection", "features": []}')  # drawn in QuPath
    (theirs / "slide_mask.ome.tif").write_bytes(b"the user's own label image")
    before = {name: (theirs / name).read_bytes() for name in _visible(theirs)}
    for extra in ((), ("--force",)):
        code, _, err = run_cli(capsys, monkeypatch, *_args(path, ckpt, theirs, "--level", 1, *extra))
        assert code == 0, err
        assert {name: (theirs / name).read_bytes() for name in before} == before
        assert _visible(theirs) == ["slide.geojson", "slide_mask.ome.tif", "slide_mask.png", "slide_overlay.png",
                                    "slide_summary.json"]


def test_a_slide_is_locked_while_it_runs_and_its_outputs_are_recorded(slide, ckpt, tmp_path, capsys, monkeypatch,
                                                                      caplog):
    path, _ = slide
    spies, spy_load = spy_on_models(monkeypatch, W)
    out = tmp_path / "out"
    args = _args(path, ckpt, out, "--level", 1)
    lock = out / ".wsss-lock.slide"

    # another run holds the slide (a live process), or the whole folder: one line, nothing computed
    for scope in ("slide", None):
        sleeper = live_lock(out, "predict-wsi" if scope else "predict", scope)
        try:
            spy_load(None)
            err = assert_one_line_error(capsys, monkeypatch, *args)
        finally:
            sleeper.kill()
            sleeper.wait()
        assert f"in use by `wsss {'predict-wsi' if scope else 'predict'}` (pid {sleeper.pid}" in err, err
        assert all(spy.calls == 0 for spy in spies) and _visible(out) == []
        (out / (".wsss-lock" if scope is None else ".wsss-lock.slide")).unlink()

    # the killed holder's lock is taken over (and said so); during the run the lock is this process's
    write_lock(out, "predict-wsi", sleeper.pid, "slide")
    held = []
    spy_load(None, on_call=lambda: held.append(json.loads(lock.read_text())))
    caplog.set_level(logging.INFO)
    code, _, err = run_cli(capsys, monkeypatch, *args)
    assert code == 0, err
    assert f"pid {sleeper.pid}" in caplog.text and "no longer running" in caplog.text
    assert held and all(h["pid"] == os.getpid() and h["command"] == "predict-wsi" for h in held)
    assert not lock.exists()

    # the manifest records every output as it is on disk, and the run with its checkpoint's sha256
    lines = [json.loads(line) for line in (out / ".wsss-manifest.jsonl").read_text().splitlines()]
    files = {line["file"]: line for line in lines if "file" in line}
    assert sorted(files) == _visible(out) == ["slide_mask.png", "slide_overlay.png", "slide_summary.json"]
    for name, record in files.items():
        st = (out / name).stat()
        assert (record["size"], record["mtime_ns"]) == (st.st_size, st.st_mtime_ns)
    runs = [line for line in lines if "key" in line]
    assert [r["key"] for r in runs] == ["predict-wsi slide"]
    assert runs[0]["inputs"]["checkpoint"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()


def test_label_images_png_or_pyramidal_ome_tiff_read_back_by_tifffile_and_openslide(tmp_path):
    labels = np.random.default_rng(0).integers(0, 5, (300, 520)).astype(np.uint8)
    stem = tmp_path / "s"
    (tmp_path / "s_mask.tif").write_bytes(b"a flat TIFF of an earlier version")
    assert L.write_label_image(stem, labels, LUAD, (1.5, 2.0)).name == "s_mask.png"
    assert not (tmp_path / "s_mask.tif").exists()
    path = L.write_label_image(stem, labels, LUAD, (1.5, 2.0), png_max_pixels=1000)
    assert path.name == "s_mask.ome.tif" and not (tmp_path / "s_mask.png").exists()
    assert L.write_label_image(stem, labels, LUAD, None, "ome-tiff") == path  # forced, whatever the size
    first = path.read_bytes()
    L.write_label_image(stem, labels, LUAD, (1.5, 2.0), "ome-tiff")
    with tifffile.TiffFile(path) as tif:
        assert tif.is_ome and len(tif.series) == 1
        levels = tif.series[0].levels  # 520 wide: halved twice until one 256-px tile holds it
        assert [lv.shape for lv in levels] == [(300, 520), (150, 260), (75, 130)]
        for k, level in enumerate(levels):
            assert np.array_equal(level.asarray(), labels[:: 2**k, :: 2**k])
        page = tif.pages[0]
        assert page.is_tiled and (page.tilelength, page.tilewidth) == (256, 256) and page.photometric == 3
        assert (page.colormap[:, 2] // 257).tolist() == list(LUAD.palette[2])
        assert S.tiff_mpp(page.tags) == pytest.approx((1.5, 2.0))
        ome = tifffile.xml2dict(tif.ome_metadata)["OME"]
        assert S.ome_mpp(tif.ome_metadata) == pytest.approx((1.5, 2.0))  # what our slide readers take
    pixels = ome["Image"]["Pixels"]
    assert (pixels["PhysicalSizeX"], pixels["PhysicalSizeY"], pixels["PhysicalSizeXUnit"]) == (1.5, 2.0, "µm")
    classes, colours = ome["StructuredAnnotations"]["MapAnnotation"]
    assert classes["Namespace"] == "wsss/classes"
    assert [(m["K"], m["value"]) for m in classes["Value"]["M"]] == [
        (0, "TE"), (1, "NEC"), (2, "LYM"), (3, "TAS"), (4, "background")]
    assert colours["Value"]["M"][0]["value"] == "#cd3333"  # TE (205, 51, 51)
    if HAVE_OPENSLIDE:
        import openslide

        with openslide.OpenSlide(str(path)) as osl:  # a generic tiled TIFF to OpenSlide: level 0 only
            assert osl.dimensions == (520, 300)
            rgb = np.asarray(osl.read_region((0, 0), 0, (520, 300)))[..., :3]
        palette = np.asarray(LUAD.palette, dtype=np.uint8)
        assert np.array_equal(rgb, palette[labels])
    # same labels, same bytes (no time stamp or random UUID inside): a resumed run writes the same file
    L.write_label_image(stem, labels, LUAD, None, "ome-tiff")
    assert path.read_bytes() == first
    assert np.array_equal(W.sample_labels(labels, (260, 150)), labels[1::2, 1::2])


@pytest.mark.parametrize("reader", READER_NAMES)
def test_ome_tiff_slides_give_their_physical_pixel_size(tmp_path, reader):
    image = slide_pixels()[:128, :192]
    path = tmp_path / "slide.ome.tif"
    with tifffile.TiffWriter(path, ome=True) as tif:  # OME pixel size only: no resolution tags
        tif.write(image, tile=(64, 64), photometric="rgb", metadata={
            "axes": "YXS", "PhysicalSizeX": 250.0, "PhysicalSizeXUnit": "nm", "PhysicalSizeY": 0.25})
    with tifffile.TiffFile(path) as tif:
        assert S.tiff_mpp(tif.pages[0].tags) is None
    with S.open_slide(path, reader) as s:
        assert s.mpp == pytest.approx((0.25, 0.25))  # 250 nm; Y without a unit is in µm
    assert S.ome_mpp('<OME><Image><Pixels PhysicalSizeX="2" PhysicalSizeXUnit="mm" PhysicalSizeY="4"'
                     ' PhysicalSizeYUnit="mm"/></Image></OME>') == (2000.0, 4000.0)
    assert S.ome_mpp('<OME><Image><Pixels PhysicalSizeX="2" PhysicalSizeXUnit="inch" PhysicalSizeY="2"/>'
                     '</Image></OME>') is None
    assert S.ome_mpp("<OME><Image><Pixels/></Image></OME>") is None and S.ome_mpp("not xml") is None



def test_bad_inputs_end_in_one_clear_line(slide, ckpt, tmp_path, capsys, monkeypatch):
    path, _ = slide
    out = tmp_path / "out"
    bare = tmp_path / "bare.tif"
    write_pyramid_levels(bare, slide_pixels()[:128, :128], levels=1, mpp=None)
    grey = tmp_path / "grey.tif"
    tifffile.imwrite(grey, np.zeros((64, 64), dtype=np.uint8), tile=(16, 16))
    (tmp_path / "x.svs").write_bytes(b"not a slide")
    cases = [
        ((tmp_path / "missing.tif",), "slide not found"),
        ((path, "--level", 5), "--level 5: the slide has levels 0 to 2"),
        ((path, "--level", 1, "--mpp", 1.0), "--level and --mpp both pick the level"),
        ((bare, "--mpp", 1.0), "does not record"),
        ((path, "--mpp", 0.1), "finer than the slide's level 0"),
        ((path, "--roi", "400,300,200,100"), "reaches beyond the slide"),
        ((path, "--roi", "1,2,3"), "--roi needs four numbers"),
        ((path, "--min-tissue", 1.5), "--min-tissue is a fraction"),
        ((grey,), "grey.tif"),  # tifffile: not RGB; OpenSlide (generic TIFF): cannot read it
        ((tmp_path / "x.svs",), "OpenSlide"),
    ]
    for (slide_path, *rest), message in cases:
        assert message in assert_one_line_error(capsys, monkeypatch, *_args(slide_path, ckpt, out, *rest))
    assert not out.exists()
    with pytest.raises(WsssError, match=r"grey\.tif is not an 8-bit RGB TIFF"):
        S.open_slide(grey, "tifffile")
    monkeypatch.setattr(S, "_import_openslide", lambda: None)
    assert "pip install openslide-python openslide-bin" in assert_one_line_error(capsys, monkeypatch, *_args(tmp_path / "x.svs", ckpt, out))


def test_a_tile_tifffile_cannot_decode_is_one_error_line(tmp_path, monkeypatch):
    """tifffile says ValueError (an unknown compression, imagecodecs missing) or NotImplementedError
    (e.g. chroma subsampling without JPEG): either is the slide's one error line, naming the remedy."""
    path = tmp_path / "s.tif"
    tifffile.imwrite(path, slide_pixels(seed=2)[:128, :128], photometric="rgb", tile=(64, 64))
    for error in (ValueError("<COMPRESSION.JPEG: 7> requires the 'imagecodecs' package"),
                  NotImplementedError("chroma subsampling not supported without JPEG compression")):
        def decode(self, *args, error=error, **kwargs):
            raise error
        monkeypatch.setattr(tifffile.TiffPage, "decode", decode)
        with S.open_slide(path, "tifffile") as slide:
            with pytest.raises(WsssError, match=f"cannot decode {path} \\(tifffile\\): {error}; pip install imagecodecs"):
                slide.read(0, 0, 0, 64, 64)
