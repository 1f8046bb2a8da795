"""Label images → QuPath GeoJSON: one polygon annotation per connected region per class.

Regions are 4-connected (pixels sharing an edge). Their outlines follow pixel edges, so each
polygon covers exactly the region's pixels: the exterior ring, then one ring per hole (pixels of
other classes, or background, enclosed by the region). Only corners are kept (no point in the
middle of a straight edge), which loses nothing.

Validity: at a corner where a region's pixels touch only diagonally (a "saddle"), the tracer walks
across the corner, keeping the two pixels joined. Inside one 4-connected region the enclosed
diagonal then becomes a hole touching the exterior at that point, which OGC simple-features rules
allow, and no ring passes the same point twice. Exterior rings have a positive shoelace area in
the (x, y) numbers (counter-clockwise, RFC 7946's right-hand rule, in a y-up frame); holes negative.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
from scipy import ndimage

from wsss.data.specs import DatasetSpec
from wsss.runtime import atomic_path

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


def annotation(rings: Sequence[np.ndarray], name: str, colour: Sequence[int]) -> dict:
    """A QuPath annotation feature: a GeoJSON Polygon with a named, coloured classification."""
    return {
        "type": "Feature",
        "geometry": {"type": "Polygon", "coordinates": [np.round(r, 3).tolist() for r in rings]},
        "properties": {
            "objectType": "annotation",
            "classification": {"name": name, "color": [int(v) for v in colour]},
        },
    }


def class_features(labels: np.ndarray, spec: DatasetSpec,
                   transform: Callable[[np.ndarray], np.ndarray]) -> list[dict]:
    """One annotation per connected region of each tissue class of ``labels`` (not the background);
    ``transform`` maps ``(N, 2)`` pixel-corner ``(x, y)`` to output (level-0) coordinates."""
    features = []
    for c, rings in class_regions(labels, range(spec.num_classes)):
        coords = [transform(np.asarray(ring, dtype=np.float64)) for ring in rings]
        features.append(annotation(coords, spec.classes[c], spec.colors[c]))
    return features


def write_geojson(path: Path, features: list[dict]) -> None:
    """A GeoJSON FeatureCollection, written atomically (QuPath: File → Import objects)."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"type": "FeatureCollection", "features": features}, f, separators=(",", ":"))
