"""GeoJSON for QuPath, checked with shapely as the oracle: every ring and polygon we emit is valid,
each class's geometry covers exactly its pixels (in both modes), simplification keeps classes valid,
edge to edge and near the exact outline, and QuPath's bounds offset."""

from __future__ import annotations

import numpy as np
import pytest
import shapely
from scipy import ndimage
from shapely.geometry import LinearRing, Polygon, box, shape
from shapely.ops import unary_union

from wsss.data.specs import LUAD
from wsss.wsi import geojson as G
from wsss.wsi import slide as S


def _identity(xy: np.ndarray) -> np.ndarray:
    return xy


def _pixels_of(labels: np.ndarray, c: int):
    """The union of the unit squares of the pixels of class ``c``: the oracle, from shapely boxes."""
    rows, cols = np.nonzero(labels == c)
    return unary_union([box(x, y, x + 1, y + 1) for y, x in zip(rows, cols)])


def _polygons(geometry: dict) -> list[list]:
    return [geometry["coordinates"]] if geometry["type"] == "Polygon" else geometry["coordinates"]


def _check_rings(geometry: dict) -> None:
    """Every ring closed and simple; exterior counter-clockwise in the numbers, holes clockwise."""
    for rings in _polygons(geometry):
        for k, ring in enumerate(rings):
            assert ring[0] == ring[-1]
            lr = LinearRing(ring)
            assert lr.is_valid, shapely.is_valid_reason(lr)
            assert lr.is_ccw == (k == 0)


def _blobs(rng, shape_hw, classes: int = 5) -> np.ndarray:
    noise = ndimage.gaussian_filter(rng.normal(size=shape_hw), 2.5)
    return np.digitize(noise, np.quantile(noise, np.linspace(0, 1, classes + 1)[1:-1])).astype(np.uint8)


@pytest.mark.parametrize("mode", ["per-region", "per-class"])
def test_every_geometry_is_valid_and_covers_exactly_its_pixels(mode):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 5, (rng.integers(1, 12), rng.integers(1, 12))).astype(np.uint8) for _ in range(40)]
    images += [_blobs(rng, (30, 40)) for _ in range(5)]  # larger regions, holes, islands in holes
    for labels in images:
        features = G.class_features(labels, LUAD, _identity, G.GeoJsonOptions(mode), um2_per_pixel=0.25)
        by_class: dict[str, list] = {}
        for f in features:
            geometry = shape(f["geometry"])
            assert geometry.is_valid, shapely.is_valid_reason(geometry)
            assert f["geometry"]["type"] == ("Polygon" if mode == "per-region" else "MultiPolygon")
            _check_rings(f["geometry"])
            name = f["properties"]["classification"]["name"]
            by_class.setdefault(name, []).append(geometry)
            assert f["properties"]["measurements"]["wsss area µm^2"] == pytest.approx(0.25 * geometry.area)
        if mode == "per-class":
            assert all(len(g) == 1 for g in by_class.values())  # one feature per class present
        for c, name in enumerate(LUAD.classes):
            expected = _pixels_of(labels, c)
            got = unary_union(by_class.get(name, []))
            assert got.area == expected.area == (labels == c).sum()
            assert got.symmetric_difference(expected).area == 0
        assert "background" not in by_class


def test_simplified_classes_stay_valid_edge_to_edge_and_near_the_exact_outline():
    rng = np.random.default_rng(1)
    for _ in range(8):
        labels = _blobs(rng, (60, 70))
        exact = {f["properties"]["classification"]["name"]: shape(f["geometry"])
                 for f in G.class_features(labels, LUAD, _identity, G.GeoJsonOptions("per-class"))}
        for tolerance in (1.0, 2.0):
            features = G.class_features(labels, LUAD, _identity, G.GeoJsonOptions("per-class", simplify=tolerance))
            simple = {f["properties"]["classification"]["name"]: shape(f["geometry"]) for f in features}
            for f in features:
                _check_rings(f["geometry"])
                assert np.all(shapely.get_coordinates(shape(f["geometry"])) % 1 == 0)  # vertices on pixel corners
            names = sorted(simple)
            assert all(simple[n].is_valid for n in names)
            for i, a in enumerate(names):  # no overlaps between classes
                for b in names[i + 1:]:
                    assert simple[a].intersection(simple[b]).area == pytest.approx(0, abs=1e-9)
                # Visvalingam–Whyatt: measured at most 2.6 tolerances from the exact outline
                assert simple[a].hausdorff_distance(exact[a]) <= 3 * tolerance
            fewer = sum(len(shapely.get_coordinates(g)) for g in simple.values())
            assert fewer < 0.75 * sum(len(shapely.get_coordinates(g)) for g in exact.values())
            # classes edge to edge: where two exact classes meet, the simplified ones leave no gap
            inner = unary_union(list(exact.values()))
            assert unary_union(list(simple.values())).symmetric_difference(inner).area < 0.05 * inner.area


def test_qupath_offset_needs_all_four_integer_bounds():
    bounds = {"openslide.bounds-x": "1200", "openslide.bounds-y": "-35", "openslide.bounds-width": "5000",
              "openslide.bounds-height": "4000", "openslide.vendor": "mirax"}
    assert S.qupath_offset(bounds) == (1200, -35)
    for name in S.BOUNDS_PROPERTIES:  # QuPath crops only when all four are there
        assert S.qupath_offset({k: v for k, v in bounds.items() if k != name}) == (0, 0)
    assert S.qupath_offset({**bounds, "openslide.bounds-x": "12.5"}) == (0, 0)  # Integer.parseInt fails: no crop
    assert S.qupath_offset({**bounds, "openslide.bounds-height": "n/a"}) == (0, 0)
    assert S.qupath_offset({}) == (0, 0)


def test_polygon_rings_from_the_tracer_are_what_shapely_computes():
    labels = np.array([[1, 1, 1, 0],
                       [1, 0, 1, 0],
                       [1, 1, 0, 1]], dtype=np.uint8)  # a hole pinched at a corner; a diagonal neighbour
    [(_, rings), (_, single)] = list(G.class_regions(labels, [1]))
    region = Polygon(rings[0], rings[1:])
    assert region.is_valid and region.area == 7 and single == [[(3, 2), (4, 2), (4, 3), (3, 3), (3, 2)]]
    assert region.equals(_pixels_of(labels[:, :3], 1))
