"""QuPath GeoJSON read as class regions, their rasterisation (pixel centres, checked against shapely's
point-in-polygon on random polygons), and splits by slide and patient."""

from __future__ import annotations

import numpy as np
import pytest
from shapely.geometry import Polygon

from helpers import qupath_object, rectangle
from wsss.data.specs import DatasetSpec
from wsss.data.splits import assign_splits
from wsss.errors import WsssError
from wsss.wsi import annotations as A

SPEC = DatasetSpec("tri", ("TUM", "NEC", "LYM"), ((1, 0, 0), (0, 1, 0), (0, 0, 1)), True)


def _parse(data, lookup=None):
    return A.parse_annotations(data, "a.geojson", lookup or A.spec_lookup(SPEC))


def test_the_three_shapes_of_qupath_export_and_class_names():
    tum = qupath_object("tum", [rectangle(0, 0, 10, 10)])
    nec = qupath_object("NEC", [rectangle(20, 0, 30, 10)], [rectangle(40, 0, 50, 10)])
    for data in ({"type": "FeatureCollection", "features": [tum, nec]}, [tum, nec]):
        found = _parse(data)
        assert [(r.feature, r.cls, r.name) for r in found.regions] == [(1, 0, "tum"), (2, 1, "NEC")]
        assert found.regions[1].geometry.area == 200  # both parts of the MultiPolygon
    assert [r.cls for r in _parse(tum).regions] == [0]  # a single Feature
    # QuPath 0.5 writes a derived class as its parts; older versions a plain string; none: unclassified
    lym = {**qupath_object(None, [rectangle(0, 0, 5, 5)]),
           "properties": {"classification": {"names": ["LYM"], "color": [0, 0, 0]}}}
    plain = {**qupath_object(None, [rectangle(0, 0, 5, 5)]), "properties": {"classification": "NEC"}}
    unclassified = qupath_object(None, [rectangle(0, 0, 5, 5)])
    found = _parse([lym, plain, unclassified])
    assert [r.cls for r in found.regions] == [2, 1] and found.unknown_classes == {"(unclassified)": 1}


def test_holes_detections_points_and_repairs():
    with_hole = qupath_object("TUM", [rectangle(0, 0, 10, 10), rectangle(2, 2, 4, 4)])
    found = _parse([with_hole,
                    qupath_object("TUM", [rectangle(0, 0, 9, 9)], object_type="detection"),
                    qupath_object("TUM", [rectangle(0, 0, 9, 9)], object_type="cell"),
                    {"type": "Feature", "geometry": {"type": "LineString", "coordinates": [[0, 0], [1, 1]]},
                     "properties": {"classification": {"name": "TUM"}}},
                    qupath_object("TUM", [[[0, 0], [10, 10], [10, 0], [0, 10], [0, 0]]])])  # a bow tie
    assert [r.geometry.area for r in found.regions] == [96, 50]  # 100 - 4; two triangles of 25
    assert found.repaired == 1
    assert found.skipped_objects == {"detection": 1, "cell": 1, "LineString (no area)": 1}


def test_class_maps(tmp_path):
    path = tmp_path / "map.csv"
    path.write_text("qupath,class\nTumor,tum\nImmune cells,LYM\nIgnore,\n")
    lookup = A.read_class_map(path, SPEC)
    found = _parse([qupath_object("Tumor", [rectangle(0, 0, 1, 1)]), qupath_object("immune cells", [rectangle(0, 0, 1, 1)]),
                    qupath_object("Ignore", [rectangle(0, 0, 1, 1)])], lookup)
    assert [r.cls for r in found.regions] == [0, 2] and found.skipped_classes == {"Ignore": 1}
    with pytest.raises(WsssError, match="classes not in --class-map .*: Stroma"):
        _parse([qupath_object("Stroma", [rectangle(0, 0, 1, 1)])], lookup)
    path.write_text("qupath,class\nTumor,TUM\ntumor,NEC\n")
    with pytest.raises(WsssError, match="line 3: 'tumor' is listed twice"):
        A.read_class_map(path, SPEC)
    # without a header row: its first mapping is not taken for one
    path.write_text("Tumor,TUM\nStroma,\n")
    lookup = A.read_class_map(path, SPEC)
    found = _parse([qupath_object("Tumor", [rectangle(0, 0, 1, 1)]), qupath_object("Stroma", [rectangle(0, 0, 1, 1)])],
                   lookup)
    assert [r.cls for r in found.regions] == [0] and found.skipped_classes == {"Stroma": 1}
    path.write_text("Tumor,TUM\ntumor,NEC\n")
    with pytest.raises(WsssError, match="line 2: 'tumor' is listed twice"):
        A.read_class_map(path, SPEC)
    path.write_text("Stroma,\nTumor,TUM\n")  # a first row that skips a class is a mapping too
    found = _parse([qupath_object("Stroma", [rectangle(0, 0, 1, 1)])], A.read_class_map(path, SPEC))
    assert found.regions == [] and found.skipped_classes == {"Stroma": 1}


@pytest.mark.parametrize("data,message", [
    ({"type": "Polygon", "coordinates": []}, "not QuPath's GeoJSON: expected a FeatureCollection"),
    ({"type": "FeatureCollection", "features": {}}, "'features' is not a list"),
    ([{"type": "Polygon"}], "feature 1 is not a GeoJSON Feature"),
    ([{"type": "Feature", "properties": {}}], "feature 1 has no GeoJSON geometry"),
    ([qupath_object("TUM", [[[0, 0], [1, 1]]])], "at least 3 points"),
    ([{"type": "Feature", "geometry": {"type": "Circle"}, "properties": {}}], "unknown geometry type 'Circle'"),
    ([{**qupath_object(None, [rectangle(0, 0, 1, 1)]), "properties": {"classification": 3}}], "classification is not"),
])
def test_geojson_that_is_not_qupaths_is_one_line(data, message):
    with pytest.raises(WsssError, match=message):
        _parse(data)


def test_regions_outside_the_slide_are_refused_and_those_across_its_edge_clipped():
    regions = _parse([qupath_object("TUM", [rectangle(90, 0, 110, 10)])]).regions
    kept, clipped = A.check_inside(regions, 100, 50, "a.geojson")
    assert clipped == 1 and kept[0].geometry.area == 100
    with pytest.raises(WsssError, match="feature 1 \\(TUM\\) lies outside the slide: x 120..130"):
        A.check_inside(_parse([qupath_object("TUM", [rectangle(120, 0, 130, 10)])]).regions, 100, 50, "a.geojson")


def test_pixel_centres_inside_random_polygons_as_shapely_finds_them():
    """The scanline fill against the definition (shapely's point-in-polygon at every pixel centre) on
    random star-shaped polygons with a hole; a centre exactly on an edge is ambiguous and not compared."""
    import shapely

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:40, 0:48] + 0.5
    for _ in range(25):
        angles = np.sort(rng.uniform(0, 2 * np.pi, 9))
        radii = rng.uniform(6, 22, 9)
        shell = np.stack([24 + radii * np.cos(angles), 20 + radii * np.sin(angles)], 1)
        hole = np.array([[22, 18], [26, 18], [26, 22], [22, 22]], dtype=float) + rng.uniform(-2, 2, 2)
        polygon = Polygon(shell, [hole])
        if not polygon.is_valid:
            continue
        got = A.fill_rings([np.asarray(polygon.exterior.coords), np.asarray(polygon.interiors[0].coords)], (48, 40))
        want = shapely.contains_xy(polygon, xx, yy)
        on_edge = shapely.intersects_xy(polygon.boundary, xx, yy)
        assert np.array_equal(got[~on_edge], want[~on_edge])


def test_a_window_takes_the_smaller_region_where_two_overlap_and_pixels_of_its_scale():
    tumour = A.Region(1, 0, "TUM", Polygon(rectangle(0, 0, 40, 40)))
    necrosis = A.Region(2, 1, "NEC", Polygon(rectangle(8, 8, 16, 24)))
    # the window from (4, 4), 2 QuPath pixels a pixel: necrosis covers columns 2..5, rows 2..9
    raster = A.rasterise(A.paint_order([necrosis, tumour]), (4, 4), 2.0, (20, 20))
    want = np.full((20, 20), A.UNANNOTATED)
    want[:18, :18] = 0
    want[2:10, 2:6] = 1
    assert np.array_equal(raster, want)


def test_splits_by_name_by_fraction_and_by_patient():
    slides = [f"s{i}" for i in range(10)]
    split = assign_splits(slides, val_slides=["s1"], test_slides=["s2", "s3"])
    assert [split[s] for s in ("s0", "s1", "s2", "s3")] == ["train", "val", "test", "test"]
    drawn = assign_splits(slides, val_fraction=0.2, test_fraction=0.1, seed=3)
    assert sorted(drawn.values()).count("val") == 2 and sorted(drawn.values()).count("test") == 1
    assert drawn == assign_splits(slides, val_fraction=0.2, test_fraction=0.1, seed=3)  # the seed decides
    assert drawn != assign_splits(slides, val_fraction=0.2, test_fraction=0.1, seed=4)
    # five patients of two slides each: whole patients move, a fraction counts patients
    patients = {s: f"p{i // 2}" for i, s in enumerate(slides)}
    for seed in range(5):
        by_patient = assign_splits(slides, patients, val_fraction=0.2, test_fraction=0.2, seed=seed)
        for p in set(patients.values()):
            assert len({by_patient[s] for s in slides if patients[s] == p}) == 1
        assert sorted(by_patient.values()).count("val") == 2 and sorted(by_patient.values()).count("test") == 2
    assert sorted(assign_splits(["a", "b", "c"], val_fraction=0.1).values()).count("val") == 1  # at least one


@pytest.mark.parametrize("kwargs,message", [
    ({"val_slides": ["s9"]}, "--val-slides: no slide named s9"),
    ({"val_slides": ["s0"], "test_slides": ["s0"]}, "s0 named in both"),
    ({"val_slides": ["s0"], "val_fraction": 0.5}, "not both"),
    ({"val_fraction": 0.6, "test_fraction": 0.4}, "leave nothing to train on"),
    ({"val_fraction": 0.5, "test_fraction": 0.4}, "3 slides cannot give 2 to val and 1 to test"),
    ({"val_fraction": -0.1}, "--val-fraction is a fraction"),
    ({"val_slides": ["s0"], "patients": {"s0": "p", "s1": "p"}}, "patient p has slides in val \\(s0\\) and in train"),
])
def test_bad_splits_are_one_line(kwargs, message):
    with pytest.raises(WsssError, match=message):
        assign_splits(["s0", "s1", "s2"], **kwargs)
