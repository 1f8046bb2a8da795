"""Label images → QuPath GeoJSON: one MultiPolygon per class (``per-class``) or one Polygon per
connected region (``per-region``), as QuPath annotations or detections.

Regions are 4-connected (pixels sharing an edge). Their outlines follow pixel edges, so each
polygon covers exactly the region's pixels: the exterior ring, then one ring per hole (pixels of
other classes, or background, enclosed by the region). Only corners are kept (no point in the
middle of a straight edge), which loses nothing.

Validity: at a corner where a region's pixels touch only diagonally (a "saddle"), the tracer walks
across the corner, keeping the two pixels joined. Inside one 4-connected region the enclosed
diagonal then becomes a hole touching the exterior at that point, which OGC simple-features rules
allow, and no ring passes the same point twice. Exterior rings have a positive shoelace area in
the (x, y) numbers (counter-clockwise, RFC 7946's right-hand rule, in a y-up frame); holes negative.

The exact outlines come from our own tracer (below); ``shapely`` does the rest: areas, dropping
regions under ``--min-area`` µm², and ``--simplify`` by coverage simplification
(``shapely.coverage_simplify``, Visvalingam–Whyatt on the edges of all classes' regions at once,
which keeps neighbouring classes edge to edge: no gaps, no overlaps). Simplification only removes
vertices, so every vertex stays on a pixel corner.

QuPath reads ``properties.objectType`` (``annotation`` or ``detection``), ``classification``
(``name``, ``color``) and ``measurements`` (a name → number object, QuPath 0.4 and later); see
``qupath-core/src/main/java/qupath/lib/io/QuPathTypeAdapters.java`` (``PathObjectTypeAdapter``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from wsss.data.specs import DatasetSpec
from wsss.errors import WsssError
from wsss.runtime import atomic_path

GEOJSON_MODES = ("per-class", "per-region")
OBJECT_TYPES = ("annotation", "detection")
AREA_UM2 = "wsss area µm^2"
AREA_PX2 = "wsss area px^2"  # level-0 pixels², when the slide records no µm/px
REGIONS = "wsss regions"

Ring = list[tuple[int, int]]

_FOUR_CONNECTED = np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], dtype=bool)

# Directions E, S, W, N (clockwise on screen, y down: a right turn is +1). Walking with the region
# on the right, (dcol, drow) from the vertex to the pixel ahead on the right and ahead on the left.
_STEP = ((1, 0), (0, 1), (-1, 0), (0, -1))
_AHEAD_RIGHT = ((0, 0), (-1, 0), (-1, -1), (0, -1))
_AHEAD_LEFT = ((0, -1), (0, 0), (-1, 0), (-1, -1))


def trace_outline(mask: np.ndarray) -> Ring:
    """The outer boundary of the region holding the first ``True`` pixel (in row order) of a
    boolean ``(H, W)`` mask, as pixel-corner vertices ``(x, y)``: pixel ``(row, col)`` is the square
    ``[col, col + 1] × [row, row + 1]``. Closed (the last vertex repeats the first), corners only.

    Walks the boundary with the region on the right, turning left first, so pixels touching at a
    corner count as joined (8-connected).
    """
    h, w = mask.shape
    padded = np.zeros((h + 2, w + 2), dtype=np.uint8)
    padded[1:-1, 1:-1] = mask
    cells = padded.tobytes()
    stride = w + 2
    right = [dr * stride + dc for dc, dr in _AHEAD_RIGHT]
    left = [dr * stride + dc for dc, dr in _AHEAD_LEFT]
    r0, c0 = divmod(int(np.argmax(mask.ravel())), w)
    x, y, d = c0, r0, 0  # the top edge of the first pixel, heading east
    ring = [(x, y)]
    while True:
        x, y = x + _STEP[d][0], y + _STEP[d][1]
        if x == c0 and y == r0:
            break
        here = (y + 1) * stride + x + 1  # padded index of pixel (row y, col x)
        turn = -1 if cells[here + left[d]] else (0 if cells[here + right[d]] else 1)
        if turn:
            ring.append((x, y))
            d = (d + turn) % 4
    ring.append((c0, r0))
    return ring


def region_rings(region: np.ndarray) -> list[Ring]:
    """The exterior ring and the hole rings (reversed) of one 4-connected boolean region."""
    rings = [trace_outline(region)]
    outside = np.pad(~region, 1, constant_values=True)
    holes, n = ndimage.label(outside, structure=_FOUR_CONNECTED)
    outer = holes[0, 0]
    for k, box in enumerate(ndimage.find_objects(holes), start=1):
        if k == outer or box is None:
            continue
        hole = trace_outline(holes[box] == k)
        dx, dy = box[1].start - 1, box[0].start - 1  # back from padded to region coordinates
        rings.append([(x + dx, y + dy) for x, y in reversed(hole)])
    return rings


def class_regions(labels: np.ndarray, classes: Sequence[int]) -> Iterator[tuple[int, list[Ring]]]:
    """``(class index, rings)`` for every 4-connected region of each class in ``classes`` of an
    ``(H, W)`` label image; ring vertices in the label image's pixel-corner coordinates."""
    for c in classes:
        components, _ = ndimage.label(labels == c, structure=_FOUR_CONNECTED)
        for k, box in enumerate(ndimage.find_objects(components), start=1):
            if box is None:
                continue
            dx, dy = box[1].start, box[0].start
            rings = region_rings(components[box] == k)
            yield c, [[(x + dx, y + dy) for x, y in ring] for ring in rings]


def ring_area(ring: Sequence[Sequence[float]]) -> float:
    """Signed shoelace area of a closed ring (positive: counter-clockwise in a y-up frame)."""
    xy = np.asarray(ring, dtype=np.float64)
    return float(np.sum(xy[:-1, 0] * xy[1:, 1] - xy[1:, 0] * xy[:-1, 1]) / 2)


@dataclass(frozen=True)
class GeoJsonOptions:
    """``--geojson-mode``, ``--object-type``, ``--min-area`` (µm²) and ``--simplify`` (label pixels)."""

    mode: str = "per-class"
    object_type: str = "annotation"
    min_area: float = 0.0
    simplify: float = 0.0

    def __post_init__(self) -> None:
        if self.mode not in GEOJSON_MODES:
            raise WsssError(f"--geojson-mode must be one of {', '.join(GEOJSON_MODES)}, not {self.mode!r}")
        if self.object_type not in OBJECT_TYPES:
            raise WsssError(f"--object-type must be one of {', '.join(OBJECT_TYPES)}, not {self.object_type!r}")
        if not self.min_area >= 0:
            raise WsssError(f"--min-area is an area in µm², 0 or more, not {self.min_area:g}")
        if not self.simplify >= 0:
            raise WsssError(f"--simplify is a tolerance in label pixels, 0 or more, not {self.simplify:g}")


def region_polygons(labels: np.ndarray, classes: Sequence[int]):
    """``(class indices, shapely Polygons)`` of every 4-connected region of ``classes``, exact, in
    label-pixel corner coordinates."""
    from shapely.geometry import Polygon

    found, polygons = [], []
    for c, rings in class_regions(labels, classes):
        found.append(c)
        polygons.append(Polygon(rings[0], rings[1:]))
    return found, polygons


def shape_regions(classes: list[int], polygons: list, options: GeoJsonOptions, um2_per_pixel: float | None):
    """Drop regions under ``options.min_area`` µm² (label pixels of ``um2_per_pixel`` µm² each),
    then simplify what is left as one coverage."""
    import shapely

    if options.min_area > 0:
        if um2_per_pixel is None:
            raise WsssError("--min-area is in µm², and the slide does not record its µm/px")
        keep = [k for k, p in enumerate(polygons) if p.area * um2_per_pixel >= options.min_area]
        classes, polygons = [classes[k] for k in keep], [polygons[k] for k in keep]
    if options.simplify > 0 and polygons:
        polygons = list(shapely.coverage_simplify(polygons, options.simplify))
    return classes, polygons


def _coordinates(polygon, transform: Callable[[np.ndarray], np.ndarray]) -> list:
    """GeoJSON rings of a shapely Polygon: exterior counter-clockwise in the numbers, holes the
    other way, each mapped by ``transform`` and rounded to 3 decimals."""
    from shapely.geometry.polygon import orient

    polygon = orient(polygon, sign=1.0)
    rings = [polygon.exterior, *polygon.interiors]
    return [np.round(transform(np.asarray(r.coords, dtype=np.float64)), 3).tolist() for r in rings]


def feature(geometry: dict, name: str, colour: Sequence[int], object_type: str, measurements: dict) -> dict:
    """A QuPath object: a GeoJSON geometry with a named, coloured classification and measurements."""
    return {
        "type": "Feature",
        "geometry": geometry,
        "properties": {
            "objectType": object_type,
            "classification": {"name": name, "color": [int(v) for v in colour]},
            "measurements": measurements,
        },
    }


def _area(polygons, um2_per_pixel: float | None, px2_per_pixel: float) -> dict:
    area = sum(p.area for p in polygons)
    return {AREA_UM2: area * um2_per_pixel} if um2_per_pixel is not None else {AREA_PX2: area * px2_per_pixel}


def class_features(labels: np.ndarray, spec: DatasetSpec, transform: Callable[[np.ndarray], np.ndarray],
                   options: GeoJsonOptions = GeoJsonOptions(mode="per-region"), um2_per_pixel: float | None = None,
                   px2_per_pixel: float = 1.0) -> list[dict]:
    """QuPath objects of the tissue classes of ``labels`` (not the background): one per region or
    one MultiPolygon per class. ``transform`` maps ``(N, 2)`` label-pixel corners ``(x, y)`` to
    output (level-0) coordinates; a label pixel covers ``um2_per_pixel`` µm² (None: unknown) and
    ``px2_per_pixel`` output units², which the area measurements use."""
    classes, polygons = shape_regions(*region_polygons(labels, range(spec.num_classes)), options, um2_per_pixel)
    out = []
    if options.mode == "per-region":
        for c, p in zip(classes, polygons):
            geometry = {"type": "Polygon", "coordinates": _coordinates(p, transform)}
            out.append(feature(geometry, spec.classes[c], spec.colors[c], options.object_type,
                               _area([p], um2_per_pixel, px2_per_pixel)))
        return out
    for c in range(spec.num_classes):
        parts = [p for k, p in zip(classes, polygons) if k == c]
        if not parts:
            continue
        geometry = {"type": "MultiPolygon", "coordinates": [_coordinates(p, transform) for p in parts]}
        measurements = {**_area(parts, um2_per_pixel, px2_per_pixel), REGIONS: len(parts)}
        out.append(feature(geometry, spec.classes[c], spec.colors[c], options.object_type, measurements))
    return out


def write_geojson(path: Path, features: list[dict]) -> None:
    """A GeoJSON FeatureCollection, written atomically (QuPath: File → Import objects)."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"type": "FeatureCollection", "features": features}, f, separators=(",", ":"))
