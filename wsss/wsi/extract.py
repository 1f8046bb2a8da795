"""``wsss extract-patches``: whole-slide images and their QuPath annotations → a dataset in the
LUAD-HistoSeg layout, cut at the µm/px the spec (or ``--mpp``) names.

Outputs in ``OUT``::

    OUT/train/<slide>-<x>-<y>-[1 0 1].png    training patches, their labels in their names
    OUT/val/img/<slide>-<x>-<y>.png          validation patches, with
    OUT/val/mask/<slide>-<x>-<y>.png         palette masks rasterised from the polygons
    OUT/test/img/..., OUT/test/mask/...      (the same for test slides)
    OUT/labels.csv                           the training labels (file, then one 0/1 column per class)
    OUT/patches.csv                          every patch: split, slide, position, tissue and class fractions
    OUT/spec.toml                            the dataset spec with the patches' mpp
    OUT/contact_sheet.png                    a few patches per class with their labels; val/test masks
    OUT/dataset.json                         mpp, patch size, options, the command, per-slide results and
                                             counts (written last: its presence says the run finished)

``<x>``, ``<y>``: the patch's top-left corner in QuPath's pixels of the slide (full resolution).

How a patch is cut: the slide is read at the pyramid level closest to the target µm/px (within 5%,
as it is; else the next finer level resized), on a grid of ``--patch`` px windows every ``--stride``
px, anchored at QuPath's pixel (0, 0). Of each window: the tissue fraction (saturation above the
Otsu threshold of the slide's thumbnail, as ``predict-wsi``), and the share of the window inside
each class's polygons (:func:`wsss.wsi.annotations.rasterise`). A window is kept when its tissue
fraction reaches ``--min-tissue`` and some class covers at least ``--min-class-fraction`` of it; a
class is in a training patch's label when it covers that share. A training window whose tissue
*outside* every polygon reaches ``--min-class-fraction`` is left out too: a class there that nobody
annotated could be missing from its label. Validation and test masks hold the polygons' classes;
tissue outside every polygon is the spec's background value (not evaluated, not a class), and so is
glass where the spec says white is background.

Coordinates: QuPath shows an OpenSlide slide that records ``openslide.bounds-*`` cropped to them
(:func:`wsss.wsi.slide.qupath_offset`); its annotations are in those cropped pixels, so level-0
pixel = annotation pixel + offset (``predict-wsi`` writes its GeoJSON the other way round).
``--no-bounds-offset`` for slides QuPath opened with ``--no-crop``.

Splits are by slide (:mod:`wsss.data.splits`). A slide that cannot be used (unreadable, no µm/px,
annotations missing or outside it) is recorded in ``dataset.json`` and the others go on.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import random
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from wsss.data.background import white_mask
from wsss.data.labels import format_label
from wsss.data.layout import list_images
from wsss.data.png import write_class_mask, write_rgb
from wsss.data.scale import DATASET_JSON
from wsss.data.specs import FOLDER_SPEC, DatasetSpec, check_mpp, get_spec
from wsss.data.splits import assign_splits
from wsss.data.validate import allowed_label_styles
from wsss.errors import WsssError
from wsss.runs.owner import owned_folder, remove_ours
from wsss.runtime import atomic_path, note_saved, progress_bar
from wsss.wsi.annotations import (
    UNANNOTATED, ClassLookup, Region, check_inside, class_areas, paint_order, rasterise, read_annotations,
    read_class_map, spec_lookup,
)
from wsss.wsi.slide import READERS, Slide, read_resampled
from wsss.wsi.tissue import saturation

log = logging.getLogger(__name__)

CONTACT_PER_CLASS = 6
"""Training patches per class on the contact sheet (drawn at random among those carrying the class)."""
CONTACT_MASKS = 4
"""Validation and test patches on the contact sheet, each beside its mask."""
LABELS_CSV = "labels.csv"
PATCHES_CSV = "patches.csv"
CONTACT_SHEET = "contact_sheet.png"
ANNOTATION_SUFFIXES = (".geojson", ".json")


@dataclass(frozen=True)
class ExtractConfig:
    """``wsss extract-patches``: which slides and annotations, at which µm/px and patch size, which
    patches to keep, which slides go to val and test, where to write."""

    inputs: tuple[Path, ...]
    dataset: str
    out: Path
    annotations: Path | None = None  # a GeoJSON file (one slide) or a folder; None: next to each slide
    mpp: float | None = None  # None: the spec's
    patch: int = 224
    stride: int | None = None  # None: the patch size
    min_tissue: float = 0.5
    min_class_fraction: float = 0.05
    class_map: Path | None = None
    val_slides: tuple[str, ...] = ()
    test_slides: tuple[str, ...] = ()
    val_fraction: float = 0.0
    test_fraction: float = 0.0
    seed: int = 0
    slide_mpp: float | None = None  # level-0 µm/px of slides that do not record it
    reader: str = "auto"
    bounds_offset: bool = True
    force: bool = False
    command: str | None = None  # the command line, recorded in dataset.json

    def __post_init__(self) -> None:
        if not self.inputs:
            raise WsssError("no slides given")
        if self.patch < 16:
            raise WsssError(f"--patch must be at least 16 px, not {self.patch}")
        if self.stride is not None and self.stride < 1:
            raise WsssError(f"--stride must be at least 1 px, not {self.stride}")
        for option, value in (("--min-tissue", self.min_tissue), ("--min-class-fraction", self.min_class_fraction)):
            if not 0.0 <= value <= 1.0:
                raise WsssError(f"{option} is a fraction of a patch, from 0 to 1, not {value:g}")
        if self.min_class_fraction == 0:
            raise WsssError("--min-class-fraction must be above 0: every class touching a patch would be in its label")
        for option, value in (("--mpp", self.mpp), ("--slide-mpp", self.slide_mpp)):
            if value is not None:
                check_mpp(value, option)
        if self.reader not in READERS:
            raise WsssError(f"unknown slide reader {self.reader!r}; use {', '.join(READERS)}")

    @property
    def step(self) -> int:
        return self.stride if self.stride is not None else self.patch


# --------------------------------------------------------------------------- where patches are cut (pure)


@dataclass(frozen=True)
class PatchGrid:
    """The patches of one slide: read at ``level`` (``downsample`` level-0 px per level px), one patch
    pixel = ``f`` QuPath pixels, QuPath's pixel (0, 0) at level-0 ``offset``; ``extent`` is the part of
    the slide QuPath shows (its pixels), ``level_size`` the level's ``(w, h)``."""

    level: int
    downsample: float
    f: float
    offset: tuple[int, int]
    extent: tuple[float, float]
    level_size: tuple[int, int]

    def level_box(self, x: float, y: float, patch: int) -> tuple[float, float, float, float]:
        """The level pixels ``(x0, y0, x1, y1)`` of the patch whose corner is QuPath's ``(x, y)``."""
        ox, oy = self.offset
        side = patch * self.f
        return tuple(v / self.downsample for v in (x + ox, y + oy, x + ox + side, y + oy + side))

    def fits(self, x: float, y: float, patch: int) -> bool:
        x0, y0, x1, y1 = self.level_box(x, y, patch)
        return x0 >= 0 and y0 >= 0 and x1 <= self.level_size[0] + 1e-6 and y1 <= self.level_size[1] + 1e-6

    def windows(self, patch: int, stride: int, bounds: tuple[float, float, float, float],
                roi: tuple[float, float, float, float] | None = None) -> list[tuple[float, float]]:
        """QuPath corners ``(x, y)`` of the windows on the grid (every ``stride`` patch pixels from
        QuPath's (0, 0)) that touch ``bounds`` = ``(x0, y0, x1, y1)`` and lie within the slide (and
        within ``roi``, QuPath pixels ``(x0, y0, x1, y1)``)."""
        step, side = stride * self.f, patch * self.f
        bx0, by0, bx1, by1 = bounds
        first_x, first_y = max(0, math.floor((bx0 - side) / step) + 1), max(0, math.floor((by0 - side) / step) + 1)
        out = []
        j = first_y
        while j * step < by1:
            i = first_x
            while i * step < bx1:
                x, y = i * step, j * step
                inside_roi = roi is None or (x >= roi[0] and y >= roi[1] and x + side <= roi[2] and y + side <= roi[3])
                if self.fits(x, y, patch) and inside_roi:
                    out.append((x, y))
                i += 1
            j += 1
        return out


def patch_grid(slide: Slide, target_mpp: float, bounds_offset: bool) -> PatchGrid:
    """Where the patches of ``slide`` are cut at ``target_mpp`` µm/px (its level-0 µm/px known)."""
    from wsss.wsi.predict_wsi import choose_level

    level, scale = choose_level(slide.downsamples, slide.mpp, mpp=target_mpp)
    ds = slide.downsamples[level]
    offset = slide.qupath_offset if bounds_offset else (0, 0)
    w0, h0 = slide.dimensions[0]
    return PatchGrid(level, ds, ds / scale, offset, (w0 - offset[0], h0 - offset[1]), slide.dimensions[level])


def class_fractions(raster: np.ndarray, num_classes: int) -> np.ndarray:
    """Share of the window's pixels in each class's regions ``(C,)``."""
    return np.bincount(raster.ravel(), minlength=256)[:num_classes] / raster.size


def patch_label(fractions: np.ndarray, min_fraction: float) -> tuple[int, ...]:
    """Multi-hot label: the classes covering at least ``min_fraction`` of the window."""
    return tuple(int(f >= min_fraction) for f in fractions)


def eval_mask(raster: np.ndarray, pixels: np.ndarray, spec: DatasetSpec) -> np.ndarray:
    """A val/test mask: the regions' classes; outside every region, and (where white is background)
    on glass, the spec's background value."""
    mask = np.where(raster == UNANNOTATED, spec.background_index, raster).astype(np.uint8)
    if spec.white_is_background:
        mask[white_mask(pixels, rule="glass")] = spec.background_index
    return mask


# --------------------------------------------------------------------------- inputs


def annotation_file(slide: Path, name: str, annotations: Path | None) -> Path:
    """The GeoJSON of a slide: ``annotations`` when it is a file; else ``<name>.geojson`` (or
    ``.json``, or the slide's file name with one of those added) in the folder ``annotations`` or,
    without it, next to the slide."""
    if annotations is not None and annotations.is_file():
        return annotations
    folder = annotations if annotations is not None else slide.parent
    candidates = [folder / f"{stem}{suffix}" for stem in (name, slide.name) for suffix in ANNOTATION_SUFFIXES]
    for path in candidates:
        if path.is_file():
            return path
    raise WsssError(f"no annotations for {slide}: {candidates[0]} not found (export them from QuPath: File → Export "
                    "objects as GeoJSON, named after the slide)")


@dataclass
class SlidePlan:
    """One slide ready to cut: its reader, grid, tissue threshold and regions (in paint order)."""

    job: object  # wsss.wsi.predict_wsi.SlideJob
    split: str
    slide: Slide
    grid: PatchGrid
    threshold: int
    regions: list[Region]
    annotations: dict
    clipped: int


def plan_slide(job, split: str, cfg: ExtractConfig, spec: DatasetSpec, lookup: ClassLookup,
               target_mpp: float) -> SlidePlan:
    """Open a slide and read its annotations; anything that makes it unusable is a :class:`WsssError`."""
    from wsss.wsi.predict_wsi import open_job, slide_threshold

    path = annotation_file(job.path, job.name, cfg.annotations)
    annotations = read_annotations(path, lookup)
    slide = open_job(job, cfg.reader, cfg.slide_mpp)
    try:
        if slide.mpp is None:
            raise WsssError(f"{job.path} does not record its µm/px, which cutting patches at {target_mpp:g} µm/px "
                            "needs: pass --slide-mpp (its level-0 µm/px) or give it in a manifest's mpp column")
        grid = patch_grid(slide, target_mpp, cfg.bounds_offset)
        regions, clipped = check_inside(annotations.regions, *grid.extent, str(path))
        if not regions:
            left = dict(annotations.unknown_classes + annotations.skipped_classes)
            raise WsssError(f"{path}: no region of a class of the {spec.name} spec ({', '.join(spec.classes)})"
                            + (f"; skipped: {_counts(left)}" if left else ""))
        threshold = slide_threshold(slide)
    except BaseException:
        slide.close()
        raise
    return SlidePlan(job, split, slide, grid, threshold, paint_order(regions), annotations.summary(), clipped)


def _counts(counter: dict) -> str:
    return ", ".join(f"{name} ({n})" for name, n in sorted(counter.items()))


# --------------------------------------------------------------------------- cutting


@dataclass
class Patch:
    """A kept window: its file name, split, QuPath corner, tissue and class fractions, label or mask."""

    name: str
    split: str
    slide: str
    patient: str | None
    x: float
    y: float
    tissue: float
    fractions: np.ndarray
    label: tuple[int, ...]


@dataclass
class Tally:
    """What the run kept: counts, the CSV rows, samples for the contact sheet."""

    spec: DatasetSpec
    seed: int
    rows: list[Patch] = field(default_factory=list)
    train_labels: Counter = field(default_factory=Counter)  # class index -> training patches carrying it
    mask_pixels: dict = field(default_factory=lambda: {"val": Counter(), "test": Counter()})
    samples: dict = field(default_factory=dict)  # class index -> [(seen, image, caption)] (reservoir)
    masks: list = field(default_factory=list)  # (split, image, mask, caption), the first few
    seen: Counter = field(default_factory=Counter)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    def add(self, patch: Patch, pixels: np.ndarray, mask: np.ndarray | None) -> None:
        self.rows.append(patch)
        if mask is None:
            for c, present in enumerate(patch.label):
                if present:
                    self.train_labels[c] += 1
                    self._sample(c, pixels, f"{label_text(patch.label, self.spec)} · {patch.slide}")
        else:
            values, counts = np.unique(mask, return_counts=True)
            self.mask_pixels[patch.split].update({int(v): int(n) for v, n in zip(values, counts)})
            if sum(1 for m in self.masks if m[0] == patch.split) < CONTACT_MASKS:
                self.masks.append((patch.split, pixels, mask, patch.slide))

    def _sample(self, c: int, pixels: np.ndarray, caption: str) -> None:
        """Reservoir sampling: every training patch of class ``c`` is equally likely to be shown."""
        self.seen[c] += 1
        keep = self.samples.setdefault(c, [])
        if len(keep) < CONTACT_PER_CLASS:
            keep.append((pixels, caption))
        elif (k := self.rng.randrange(self.seen[c])) < CONTACT_PER_CLASS:
            keep[k] = (pixels, caption)


def label_text(label: Sequence[int], spec: DatasetSpec) -> str:
    return "+".join(name for name, present in zip(spec.classes, label) if present)


def cut_slide(plan: SlidePlan, cfg: ExtractConfig, spec: DatasetSpec, tally: Tally, progress: bool = False) -> int:
    """Cut, test and write the patches of one slide; returns how many were kept."""

    grid, regions = plan.grid, plan.regions
    union = class_areas(regions, spec.num_classes)
    bounds = _union_bounds(regions)
    roi = None
    if plan.job.roi is not None:
        x, y, w, h = plan.job.roi
        roi = (x - grid.offset[0], y - grid.offset[1], x + w - grid.offset[0], y + h - grid.offset[1])
    windows = grid.windows(cfg.patch, cfg.step, bounds, roi)
    windows = _touching(windows, union, cfg.patch * grid.f, cfg.min_class_fraction)
    spaced = "spaced" in (allowed_label_styles(spec) or ("spaced",))
    out = Path(cfg.out)
    kept = 0
    for x, y in progress_bar(windows, progress, desc=plan.job.name, leave=False):
        pixels = read_resampled(plan.slide, grid.level, grid.level_box(x, y, cfg.patch), (cfg.patch, cfg.patch))
        tissue = saturation(pixels) > plan.threshold
        tissue_fraction = float(tissue.mean())
        if tissue_fraction < cfg.min_tissue:
            continue
        raster = rasterise(regions, (x, y), grid.f, (cfg.patch, cfg.patch))
        fractions = class_fractions(raster, spec.num_classes)
        label = patch_label(fractions, cfg.min_class_fraction)
        if not any(label):
            continue
        stem = f"{plan.job.name}-{round(x)}-{round(y)}"
        if plan.split == "train":
            if float((tissue & (raster == UNANNOTATED)).mean()) >= cfg.min_class_fraction:
                continue  # unannotated tissue: its class could be missing from the label
            name = f"{stem}-{format_label(label, spaced)}.png"
            write_rgb(out / "train" / name, pixels)
            mask = None
        else:
            name = f"{stem}.png"
            mask = eval_mask(raster, pixels, spec)
            write_rgb(out / plan.split / "img" / name, pixels)
            write_class_mask(out / plan.split / "mask" / name, mask, spec)
        tally.add(Patch(name, plan.split, plan.job.name, plan.job.patient, x, y, tissue_fraction, fractions, label),
                  pixels, mask)
        kept += 1
    return kept


def _union_bounds(regions: Sequence[Region]) -> tuple[float, float, float, float]:
    b = np.array([r.geometry.bounds for r in regions])
    return float(b[:, 0].min()), float(b[:, 1].min()), float(b[:, 2].max()), float(b[:, 3].max())


def _touching(windows: list[tuple[float, float]], union: Sequence, side: float, min_fraction: float) -> list:
    """The windows some class's regions cover at least half of ``min_fraction`` of (measured on the
    polygons; the kept ones are decided on the raster, which PIL draws a little wider)."""
    import shapely

    if not windows:
        return []
    xy = np.asarray(windows)
    boxes = shapely.box(xy[:, 0], xy[:, 1], xy[:, 0] + side, xy[:, 1] + side)
    best = np.zeros(len(windows))
    for area in union:
        if area is not None:
            best = np.maximum(best, shapely.area(shapely.intersection(area, boxes)) / side**2)
    return [w for w, b in zip(windows, best) if b >= min_fraction / 2]


# --------------------------------------------------------------------------- the run


@dataclass
class ExtractResult:
    summary: dict
    failures: list[str]


def target_mpp(cfg: ExtractConfig, spec: DatasetSpec) -> float:
    if cfg.mpp is not None:
        return cfg.mpp
    if spec.mpp is None:
        raise WsssError(f"at what µm/px should the patches be cut? pass --mpp, or set mpp in the spec "
                        f"{spec.source or spec.name} (LUAD-HistoSeg's 10×: about 1)")
    return spec.mpp


def run(cfg: ExtractConfig, progress: bool = False) -> ExtractResult:
    """Extract the patches of every slide; a slide that cannot be used is recorded and the others go on."""
    from wsss.wsi.cohort import collect_slides

    started = time.perf_counter()
    spec = get_spec(cfg.dataset)
    mpp = target_mpp(cfg, spec)
    lookup = read_class_map(cfg.class_map, spec) if cfg.class_map is not None else spec_lookup(spec)
    jobs = collect_slides(cfg.inputs, cfg.out)
    if cfg.annotations is not None and not cfg.annotations.exists():
        raise WsssError(f"--annotations {cfg.annotations} not found")
    if cfg.annotations is not None and cfg.annotations.is_file() and len(jobs) > 1:
        raise WsssError(f"--annotations {cfg.annotations} is one file for {len(jobs)} slides: give a folder of "
                        "<slide name>.geojson files")
    splits = assign_splits([j.name for j in jobs], {j.name: j.patient for j in jobs}, cfg.val_slides,
                           cfg.test_slides, cfg.val_fraction, cfg.test_fraction, cfg.seed)
    settings = {k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v)
                for k, v in vars(cfg).items() if k not in ("force", "command", "inputs")}
    settings["inputs"] = [str(p) for p in cfg.inputs]
    with owned_folder(cfg.out, "extract-patches", config=settings, force=cfg.force,
                      read_from=[j.path.parent for j in jobs]):
        _prepare_out(Path(cfg.out), cfg.force)
        tally = Tally(spec, cfg.seed)
        records, failures = [], []
        note_saved(f"0 of {len(jobs)} slides cut into {cfg.out}, the patches of the first kept there (dataset.json is "
                   "written at the end; run the command again with --force to start over)")
        for job in progress_bar(jobs, progress and len(jobs) > 1, desc="slides", unit="slide"):
            record = {"slide": str(job.path), "name": job.name, "patient": job.patient, "split": splits[job.name]}
            try:
                plan = plan_slide(job, splits[job.name], cfg, spec, lookup, mpp)
                with plan.slide:
                    record.update(_describe(plan))
                    record["patches"] = cut_slide(plan, cfg, spec, tally, progress)
                record["status"] = "done"
            except WsssError as exc:
                record.update(status="failed", error=str(exc))
                failures.append(f"{job.path}: {exc}" if str(job.path) not in str(exc) else str(exc))
            except Exception as exc:  # a corrupt file can fail in any library: recorded, the others go on
                log.debug("%s failed", job.path, exc_info=True)
                record.update(status="failed", error=f"{type(exc).__name__}: {exc}")
                failures.append(f"{job.path}: {type(exc).__name__}: {exc}")
            records.append(record)
            note_saved(f"{len(records)} of {len(jobs)} slides cut into {cfg.out} (dataset.json is written at the "
                       "end; run the command again with --force to start over)")
        _warn_skipped(records)
        counts = Counter(p.split for p in tally.rows)
        if not counts["train"]:
            raise WsssError(_nothing_kept(records, failures, cfg))
        summary = _write_outputs(Path(cfg.out), cfg, spec.with_mpp(mpp), tally, records, started)
    return ExtractResult(summary, failures)


def _describe(plan: SlidePlan) -> dict:
    g = plan.grid
    return {"mpp": list(plan.slide.mpp), "level": g.level, "read_mpp": round(plan.slide.mpp[0] * g.f, 6),
            "pixels_per_patch_pixel": g.f,
            "offset": list(g.offset), "reader": plan.slide.reader, "annotations": plan.annotations,
            "clipped": plan.clipped, "tissue_threshold": plan.threshold}


def _nothing_kept(records: list[dict], failures: list[str], cfg: ExtractConfig) -> str:
    if failures and all(r["status"] == "failed" for r in records):
        more = f" (and {len(failures) - 1} more slides failed)" if len(failures) > 1 else ""
        return failures[0] + more
    return (f"no training patch was kept: none reaches --min-tissue {cfg.min_tissue:g} with a class covering "
            f"--min-class-fraction {cfg.min_class_fraction:g} and no more unannotated tissue than that; check "
            "that the annotations cover the tissue, or lower the thresholds")


def _warn_skipped(records: list[dict]) -> None:
    """One warning line for annotation classes that are not in the spec, one note for the rest."""
    unknown, slides, repaired, clipped = Counter(), Counter(), 0, 0
    for r in records:
        a = r.get("annotations") or {}
        for name, n in (a.get("unknown_classes") or {}).items():
            unknown[name] += n
            slides[name] += 1
        repaired += a.get("repaired", 0)
        clipped += r.get("clipped", 0)
    if unknown:
        log.warning("warning: annotation classes not in the spec were skipped: %s; map them with --class-map",
                    ", ".join(f"{name} ({_plural(n, 'object')}, {_plural(slides[name], 'slide')})"
                              for name, n in sorted(unknown.items())))
    if repaired:
        log.info("%s (self-intersecting, or a hole crossing its outline) repaired with shapely.make_valid",
                 _plural(repaired, "invalid polygon"))
    if clipped:
        log.info("%s reaching beyond their slide clipped to it", _plural(clipped, "region"))


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' if n != 1 else ''}"


def _prepare_out(out: Path, force: bool) -> None:
    """OUT must be empty (wsss's bookkeeping apart); with ``--force`` an earlier extraction's files
    are removed first (only those wsss wrote), and a folder holding other images is refused."""
    visible = [p for p in out.iterdir() if not p.name.startswith(".wsss-")]
    if visible and not force:
        raise WsssError(f"{out} is not empty; pass --force to replace an earlier extraction there")
    if (out / "train_PM").exists():
        raise WsssError(f"{out / 'train_PM'} holds the pseudo-masks of earlier patches: delete it, or choose "
                        "another --out")
    remove_ours(out / DATASET_JSON)
    for folder in _layout_dirs(out):
        if folder.is_dir():
            for p in list_images(folder):
                remove_ours(p)
            left = list_images(folder)
            if left:
                raise WsssError(f"{folder} holds images wsss did not write (e.g. {left[0].name}); choose an empty "
                                "--out")
    # an earlier extraction's split folders that this one may not fill: an empty val/img stops training
    for folder in [*_layout_dirs(out), out / "val", out / "test"]:
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()


def _layout_dirs(out: Path) -> list[Path]:
    return [out / "train", *(out / s / sub for s in ("val", "test") for sub in ("img", "mask"))]


def _write_outputs(out: Path, cfg: ExtractConfig, spec: DatasetSpec, tally: Tally, records: list[dict],
                   started: float) -> dict:
    """labels.csv, patches.csv, spec.toml, the contact sheet and, last, dataset.json."""
    train = [p for p in tally.rows if p.split == "train"]
    scale = {r["name"]: r.get("pixels_per_patch_pixel") for r in records}
    labels = spec.labels_csv_path(out) or out / LABELS_CSV
    _write_csv(labels, ["file", *spec.classes], [[p.name, *p.label] for p in sorted(train, key=lambda p: p.name)])
    _write_csv(out / PATCHES_CSV, ["split", "file", "slide", "patient", "x", "y", "size", "tissue",
                                   *(f"{c}_fraction" for c in spec.classes)],
               [[p.split, p.name, p.slide, p.patient or "", f"{p.x:.2f}", f"{p.y:.2f}",
                 f"{cfg.patch * scale[p.slide]:.2f}", f"{p.tissue:.4f}", *(f"{v:.4f}" for v in p.fractions)]
                for p in tally.rows])
    with atomic_path(out / FOLDER_SPEC) as tmp:
        tmp.write_text(spec.to_toml(), encoding="utf-8")
    write_contact_sheet(out / CONTACT_SHEET, tally, spec)
    counts = Counter(p.split for p in tally.rows)
    names = [*spec.classes, "background"]
    values = [*range(spec.num_classes), spec.background_index]
    summary = {
        "command": cfg.command, "spec": spec.to_dict(), "mpp": spec.mpp, "patch_size": cfg.patch,
        "stride": cfg.step, "min_tissue": cfg.min_tissue, "min_class_fraction": cfg.min_class_fraction,
        "class_map": None if cfg.class_map is None else str(cfg.class_map),
        "bounds_offset": cfg.bounds_offset, "seed": cfg.seed,
        "splits": {"val_slides": list(cfg.val_slides), "test_slides": list(cfg.test_slides),
                   "val_fraction": cfg.val_fraction, "test_fraction": cfg.test_fraction},
        "counts": {s: counts[s] for s in ("train", "val", "test")},
        "train_label_counts": {c: tally.train_labels[i] for i, c in enumerate(spec.classes)},
        "mask_pixels": {s: {n: int(tally.mask_pixels[s][v]) for n, v in zip(names, values)} for s in ("val", "test")},
        "slides": records,
        "failed": [r["slide"] for r in records if r["status"] == "failed"],
        "seconds": round(time.perf_counter() - started, 1),
    }
    with atomic_path(out / DATASET_JSON) as tmp:
        tmp.write_text(json.dumps(summary, indent=2, default=_json) + "\n", encoding="utf-8")
    return summary


def _json(value):
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(type(value).__name__)


def _write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    with atomic_path(path) as tmp:
        tmp.write_text(buffer.getvalue(), encoding="utf-8")


def write_contact_sheet(path: Path, tally: Tally, spec: DatasetSpec) -> None:
    """A few training patches per class (captioned with their labels and slides), then val/test
    patches beside their masks, the legend below."""
    from wsss.viz import colorize, contact_sheet, legend

    rows = [(f"{name}: {tally.train_labels[c]} training patches carry it (a random {CONTACT_PER_CLASS})",
             [(img, caption) for img, caption in tally.samples.get(c, [])]) for c, name in enumerate(spec.classes)]
    for split in ("val", "test"):
        items = []
        for s, img, mask, slide in tally.masks:
            if s == split:
                items += [(img, slide), (colorize(mask, spec), "mask")]
        rows.append((f"{split}: patches and their masks", items))
    write_png = contact_sheet(rows, footer=legend(spec))
    with atomic_path(path) as tmp:
        write_png.save(tmp, format="PNG")


def command_line() -> str:
    """The command as typed (for dataset.json)."""
    import shlex

    return shlex.join(["wsss", *sys.argv[1:]])
