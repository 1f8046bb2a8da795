"""QuPath annotations (GeoJSON) as class regions, and their rasterisation onto patches.

What QuPath writes (File → Export objects as GeoJSON; ``qupath-core``'s ``GsonTools`` /
``QuPathTypeAdapters``), and what is read here:

* a ``FeatureCollection``, a single ``Feature``, or a JSON list of Features (QuPath's export without
  its "Export as FeatureCollection" box ticked);
* ``geometry``: ``Polygon`` or ``MultiPolygon`` (the first ring of a polygon is its outline, the
  others its holes) in the image's full-resolution pixels, ``x`` to the right, ``y`` down, pixel
  ``(col, row)`` being the square ``[col, col + 1] × [row, row + 1]``; a ``GeometryCollection`` is
  read for its polygons. Points and lines have no area: skipped and counted;
* ``properties.objectType``: ``annotation`` is read (as is a feature without one, from other tools);
  detections, cells and tiles are skipped and counted;
* ``properties.classification``: ``{"name": "Tumor", "color": [...]}`` (QuPath 0.3 and later; older
  versions wrote ``colorRGB``), or a plain string. Objects without one are unclassified: skipped.

QuPath's class names are matched to the spec's classes ignoring case, or through ``--class-map``
(:func:`read_class_map`). A polygon that is not valid (a self-intersecting outline, a hole crossing
its outline) is repaired with ``shapely.make_valid`` and counted.

Rasterisation (:func:`rasterise`): a patch pixel belongs to a polygon when its centre lies inside it
(inside its outline and outside its holes; a centre exactly on a left or top edge is inside, on a
right or bottom edge outside, so that polygons sharing an edge share no pixel), the polygon mapped to
the patch's pixels by ``(x - x0) / f`` for a patch whose pixels are ``f`` QuPath pixels wide from
``x0``. A rectangle on pixel edges covers exactly its pixels, as ``ImageDraw.rectangle`` of its first
and last pixel would. Regions are painted largest first: a region drawn inside another (necrosis
within a tumour) wins where they overlap.
"""

from __future__ import annotations

import csv
import json
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from wsss.data.specs import DatasetSpec
from wsss.errors import WsssError

UNANNOTATED = 255
"""Raster value of a pixel outside every region."""
UNCLASSIFIED = "(unclassified)"
AREA_TYPES = ("Polygon", "MultiPolygon")
OTHER_TYPES = ("Point", "MultiPoint", "LineString", "MultiLineString")


@dataclass(frozen=True)
class Region:
    """One classified area: ``feature`` (its number in the file, from 1), the spec class index
    ``cls``, QuPath's class ``name`` and a shapely (Multi)Polygon in QuPath's image pixels."""

    feature: int
    cls: int
    name: str
    geometry: Any


@dataclass
class Annotations:
    """The regions of one GeoJSON file and what was left out of it."""

    source: str
    regions: list[Region] = field(default_factory=list)
    unknown_classes: Counter = field(default_factory=Counter)  # QuPath name not in the spec (or unclassified) -> objects
    skipped_classes: Counter = field(default_factory=Counter)  # QuPath name --class-map maps to nothing -> objects
    skipped_objects: Counter = field(default_factory=Counter)  # "detection", "Point (no area)", ... -> objects
    repaired: int = 0  # invalid polygons repaired by shapely.make_valid

    def summary(self) -> dict:
        return {"regions": len(self.regions), "unknown_classes": dict(self.unknown_classes),
                "skipped_classes": dict(self.skipped_classes), "skipped_objects": dict(self.skipped_objects),
                "repaired": self.repaired}


# --------------------------------------------------------------------------- class names


@dataclass(frozen=True)
class ClassLookup:
    """QuPath class names → spec class indices. ``mapping`` keys are lower-cased names; a value None
    means "skip". ``strict`` (a ``--class-map`` was given): a name it does not list is an error."""

    mapping: Mapping[str, int | None]
    strict: bool = False
    source: str = ""

    def find(self, name: str) -> int | None | str:
        """The class index, None (skip), or ``"unknown"``."""
        key = name.strip().lower()
        return self.mapping[key] if key in self.mapping else "unknown"


def spec_lookup(spec: DatasetSpec) -> ClassLookup:
    """Names matched to the spec's classes, ignoring case."""
    return ClassLookup({name.lower(): i for i, name in enumerate(spec.classes)})


def read_class_map(path: Path, spec: DatasetSpec) -> ClassLookup:
    """A ``--class-map`` CSV: a header row, then one row per QuPath class name: the name, and the spec
    class it stands for (by name), or nothing to skip its objects::

        qupath,class
        Tumor,TUM
        Stroma,STR
        Immune cells,LYM
        Ignore,

    The header may be left out (a first row mapping onto a class of the spec is read as a mapping). A
    target that is not a class of the spec, or a name listed twice, is a user error."""
    path = Path(path)
    if not path.is_file():
        raise WsssError(f"class map not found: {path}")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = [r for r in csv.reader(f) if any(cell.strip() for cell in r)]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise WsssError(f"cannot read class map {path}: {exc}") from None
    classes = {name.lower(): i for i, name in enumerate(spec.classes)}
    # the header's second cell names the column; a first row mapping onto a class of the spec, or onto
    # nothing (skipped objects), is a mapping: the file has no header row
    second = rows[0][1].strip().lower() if rows and len(rows[0]) > 1 else ""
    start = 1 if second and second not in classes else 0
    if len(rows) <= start:
        raise WsssError(f"class map {path} maps nothing: rows of QuPath name,class (after a header row, if any)")
    mapping: dict[str, int | None] = {}
    for line, row in enumerate(rows[start:], start=start + 1):
        cells = [c.strip() for c in row] + [""]
        name, target = cells[0], cells[1]
        where = f"class map {path}, line {line}"
        if not name:
            raise WsssError(f"{where}: no QuPath class name")
        if name.lower() in mapping:
            raise WsssError(f"{where}: {name!r} is listed twice")
        if target and target.lower() not in classes:
            raise WsssError(f"{where}: {target!r} is not a class of the {spec.name} spec ({', '.join(spec.classes)}); "
                            "leave it empty to skip these objects")
        mapping[name.lower()] = classes[target.lower()] if target else None
    return ClassLookup(mapping, strict=True, source=str(path))


# --------------------------------------------------------------------------- reading


def read_annotations(path: Path, lookup: ClassLookup) -> Annotations:
    """The regions of a QuPath GeoJSON file; a file that is not JSON or not QuPath's GeoJSON is a
    user error in one line naming it."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError) as exc:
        raise WsssError(f"cannot read annotations {path}: {exc}") from None
    except ValueError as exc:
        raise WsssError(f"annotations {path} are not JSON: {exc}") from None
    return parse_annotations(data, str(path), lookup)


def features_of(data: Any, source: str) -> list:
    """The Features of a FeatureCollection, of a single Feature, or of a JSON list of them."""
    if isinstance(data, list):
        features = data
    elif isinstance(data, dict) and data.get("type") == "FeatureCollection":
        features = data.get("features")
    elif isinstance(data, dict) and data.get("type") == "Feature":
        features = [data]
    else:
        kind = data.get("type") if isinstance(data, dict) else type(data).__name__
        raise WsssError(f"{source} is not QuPath's GeoJSON: expected a FeatureCollection, a Feature or a list of "
                        f"Features, not {kind!r} (QuPath: File → Export objects as GeoJSON)")
    if not isinstance(features, list):
        raise WsssError(f"{source} is not QuPath's GeoJSON: its 'features' is not a list")
    return features


def parse_annotations(data: Any, source: str, lookup: ClassLookup) -> Annotations:
    """:func:`read_annotations` of parsed JSON ``data`` (pure)."""
    found = Annotations(source)
    unknown = found.unknown_classes
    for number, feature in enumerate(features_of(data, source), start=1):
        where = f"{source}, feature {number}"
        if not isinstance(feature, dict) or feature.get("type") != "Feature":
            raise WsssError(f"{where} is not a GeoJSON Feature")
        props = feature.get("properties") or {}
        if not isinstance(props, dict):
            raise WsssError(f"{where}: its properties are not an object")
        kind = props.get("objectType", "annotation")
        if kind != "annotation":
            found.skipped_objects[str(kind)] += 1
            continue
        polygons = feature_polygons(feature.get("geometry"), where, found)
        if not polygons:
            continue
        name = class_name(props, where)
        cls = UNCLASSIFIED if name is None else lookup.find(name)
        if cls == "unknown" or cls == UNCLASSIFIED:
            unknown[name or UNCLASSIFIED] += 1
            continue
        if cls is None:  # mapped to nothing
            found.skipped_classes[name] += 1
            continue
        geometry, repaired = valid_area(polygons, where)
        found.repaired += repaired
        if geometry is None:
            found.skipped_objects["empty after repair"] += 1
            continue
        found.regions.append(Region(number, cls, name, geometry))
    if lookup.strict:
        missing = sorted(n for n in unknown if n != UNCLASSIFIED)
        if missing:
            raise WsssError(f"{source}: classes not in --class-map {lookup.source}: {', '.join(missing)} (map each "
                            "to a class, or to nothing to skip its objects)")
    return found


def class_name(props: Mapping, where: str) -> str | None:
    """QuPath's class name of a feature, None when unclassified."""
    c = props.get("classification")
    if c is None:
        return None
    if isinstance(c, str):
        return c.strip() or None
    if isinstance(c, dict):
        name = c.get("name")
        if name is None and isinstance(c.get("names"), list):  # QuPath 0.5: a derived class as its parts
            name = ": ".join(str(n) for n in c["names"])
        if name is None or isinstance(name, str):
            return (name or "").strip() or None
    raise WsssError(f"{where}: classification is not a name or a QuPath classification object: {c!r}")


def feature_polygons(geometry: Any, where: str, found: Annotations) -> list:
    """The shapely Polygons of a GeoJSON geometry (as written, maybe invalid); points and lines are
    counted in ``found.skipped_objects``."""
    from shapely.geometry import Polygon

    if not isinstance(geometry, dict) or "type" not in geometry:
        raise WsssError(f"{where} has no GeoJSON geometry")
    kind = geometry["type"]
    if kind == "GeometryCollection":
        parts = geometry.get("geometries")
        if not isinstance(parts, list):
            raise WsssError(f"{where}: a GeometryCollection without 'geometries'")
        return [p for part in parts for p in feature_polygons(part, where, found)]
    if kind in OTHER_TYPES:
        found.skipped_objects[f"{kind} (no area)"] += 1
        return []
    if kind not in AREA_TYPES:
        raise WsssError(f"{where}: unknown geometry type {kind!r}")
    coords = geometry.get("coordinates")
    polys = [coords] if kind == "Polygon" else coords
    if not isinstance(polys, list):
        raise WsssError(f"{where}: {kind} coordinates are not a list")
    out = []
    for rings in polys:
        if not isinstance(rings, list) or not rings:
            raise WsssError(f"{where}: a polygon without rings")
        shell, *holes = (_ring(r, where) for r in rings)
        try:
            out.append(Polygon(shell, holes))
        except (ValueError, TypeError) as exc:
            raise WsssError(f"{where}: not a polygon: {exc}") from None
    return out


def _ring(ring: Any, where: str) -> list[tuple[float, float]]:
    if not isinstance(ring, list) or len(ring) < 3:
        raise WsssError(f"{where}: a polygon ring needs at least 3 points")
    try:
        points = [(float(p[0]), float(p[1])) for p in ring]
    except (TypeError, ValueError, IndexError, KeyError):
        raise WsssError(f"{where}: ring coordinates are not [x, y] pairs of numbers") from None
    if not all(math.isfinite(v) for p in points for v in p):
        raise WsssError(f"{where}: ring coordinates are not finite numbers")
    return points


def valid_area(polygons: Sequence, where: str) -> tuple[Any, int]:
    """The union of ``polygons`` as one valid (Multi)Polygon (None when no area is left) and how many
    of them were invalid and repaired (``shapely.make_valid``, keeping the polygonal parts)."""
    import shapely
    from shapely.geometry import MultiPolygon, Polygon

    parts, repaired = [], 0
    for p in polygons:
        if not p.is_valid:
            repaired += 1
            p = shapely.make_valid(p)
        parts += [g for g in getattr(p, "geoms", [p]) if isinstance(g, (Polygon, MultiPolygon)) and not g.is_empty]
    if not parts:
        return None, repaired
    area = shapely.union_all(parts) if len(parts) > 1 else parts[0]
    return (None if area.is_empty or area.area == 0 else area), repaired


# --------------------------------------------------------------------------- the regions of a slide


def check_inside(regions: Sequence[Region], width: float, height: float, source: str) -> tuple[list[Region], int]:
    """``regions`` clipped to the image ``[0, width] × [0, height]`` (QuPath's pixels) and how many
    were clipped. A region wholly outside is a user error: exported from another image, or in other
    coordinates."""
    from shapely.geometry import box

    frame = box(0, 0, width, height)
    kept, clipped = [], 0
    for r in regions:
        if not r.geometry.intersects(frame) or r.geometry.intersection(frame).area == 0:
            x0, y0, x1, y1 = r.geometry.bounds
            raise WsssError(f"{source}, feature {r.feature} ({r.name}) lies outside the slide: x {x0:g}..{x1:g}, "
                            f"y {y0:g}..{y1:g}, the slide 0..{width:g} × 0..{height:g} px (annotations of another "
                            "image, or of other coordinates?)")
        if not frame.contains(r.geometry):
            clipped += 1
            r = Region(r.feature, r.cls, r.name, r.geometry.intersection(frame))
        kept.append(r)
    return kept, clipped


def paint_order(regions: Iterable[Region]) -> list[Region]:
    """Largest area first, so that a region inside another is painted over it."""
    return sorted(regions, key=lambda r: -r.geometry.area)


def class_areas(regions: Sequence[Region], num_classes: int):
    """One shapely geometry per class (None when the class has no region): for fast window tests."""
    import shapely

    out = []
    for c in range(num_classes):
        parts = [r.geometry for r in regions if r.cls == c]
        out.append(shapely.union_all(parts) if parts else None)
    return out


def rasterise(regions: Sequence[Region], origin: tuple[float, float], f: float, size: tuple[int, int]) -> np.ndarray:
    """Class index ``(h, w)`` uint8 of each pixel of a window whose pixel ``(col, row)`` covers QuPath
    pixels ``[x0 + col·f, x0 + (col + 1)·f] × [y0 + row·f, ...]`` (``origin`` = ``(x0, y0)``);
    :data:`UNANNOTATED` outside every region. ``regions`` in :func:`paint_order`; rule in the module doc."""
    from shapely.geometry import box

    w, h = size
    x0, y0 = origin
    out = np.full((h, w), UNANNOTATED, dtype=np.uint8)
    frame = box(x0, y0, x0 + w * f, y0 + h * f)
    for region in regions:
        if not region.geometry.intersects(frame):
            continue
        for polygon in getattr(region.geometry, "geoms", [region.geometry]):
            if polygon.intersects(frame):
                rings = [(np.asarray(r.coords, dtype=np.float64) - (x0, y0)) / f
                         for r in (polygon.exterior, *polygon.interiors)]
                out[fill_rings(rings, size)] = region.cls
    return out


def fill_rings(rings: Sequence[np.ndarray], size: tuple[int, int], rows_at_once: int = 64) -> np.ndarray:
    """Boolean ``(h, w)``: the pixels whose centres ``(col + 0.5, row + 0.5)`` lie inside closed rings
    ``(N, 2)`` ``(x, y)`` by the even-odd rule (an outline and its holes), in pixel-corner coordinates;
    a centre on a left or top edge is inside, on a right or bottom edge outside. A scanline fill: each
    pixel row's centre line crosses the edges at sorted ``x``, and the pixels between the 1st and 2nd,
    3rd and 4th ... crossing are filled."""
    w, h = size
    ends = [(r, np.roll(r, -1, axis=0)) for r in rings]
    a = np.concatenate([e[0] for e in ends])
    b = np.concatenate([e[1] for e in ends])
    keep = (a[:, 1] != b[:, 1]) & (np.maximum(a[:, 1], b[:, 1]) > 0) & (np.minimum(a[:, 1], b[:, 1]) < h)
    a, b = a[keep], b[keep]
    ylo, yhi = np.minimum(a[:, 1], b[:, 1]), np.maximum(a[:, 1], b[:, 1])
    slope = (b[:, 0] - a[:, 0]) / (b[:, 1] - a[:, 1])
    out = np.zeros((h, w), dtype=bool)
    for top in range(0, h, rows_at_once):
        ys = np.arange(top, min(h, top + rows_at_once)) + 0.5
        cross = (ys[:, None] >= ylo) & (ys[:, None] < yhi)
        xs = np.where(cross, a[:, 0] + (ys[:, None] - a[:, 1]) * slope, np.inf)
        xs.sort(axis=1)
        n = int(cross.sum(axis=1).max(initial=0))
        # pixel col is filled between crossings x_in <= col + 0.5 < x_out: cols ceil(x_in - .5) .. ceil(x_out - .5) - 1
        cols = np.clip(np.ceil(xs[:, :n] - 0.5), 0, w).astype(np.int64)
        change = np.zeros((len(ys), w + 1), dtype=np.int32)
        rows = np.broadcast_to(np.arange(len(ys))[:, None], cols.shape)
        valid = np.isfinite(xs[:, :n])
        sign = np.where(np.arange(n) % 2 == 0, 1, -1)[None, :].repeat(len(ys), 0)
        np.add.at(change, (rows[valid], cols[valid]), sign[valid])
        out[top : top + len(ys)] = np.cumsum(change[:, :w], axis=1) > 0
    return out
