"""``wsss predict-wsi``: segment a whole-slide image tile by tile and export the result (one slide;
a cohort of slides runs each through :func:`run_slide`, see :mod:`wsss.wsi.cohort`).

Outputs, for a slide ``<name>.<ext>`` (a cohort: in ``OUT/<name>/``)::

    OUT/<name>_mask.png        class indices at the processed level, palette PNG (4 = background) …
    OUT/<name>_mask.ome.tif    … or, above PNG_MAX_PIXELS (or with --mask-format ome-tiff), a tiled
                               pyramidal palette OME-TIFF with µm/px and class names (label_image.py)
    OUT/<name>_overlay.png     thumbnail of the processed region, classes blended in, legend below
    OUT/<name>_probs.ome.tif   with --save-probs: class probabilities 0-255, one channel per class
                               (named by class), tiled pyramidal OME-TIFF (channel_image.py)
    OUT/<name>_tissue.png      with --save-tissue-mask: 255 where a pixel counts as tissue (saturation
    (or _tissue.ome.tif)       above the slide's threshold), in the label image's format
    OUT/<name>_summary.json    level, scale, µm per pixel, where the images lie on the slide
                               (placement: level-0 origin, in QuPath's coordinates too), tiles
                               segmented and skipped, per-class
                               pixels, fractions and (when the slide records µm/px) areas in µm²,
                               seconds, and the fingerprint of inputs and options (a cohort re-run
                               skips a slide whose summary has the same fingerprint)
    OUT/<name>.geojson         with --geojson: QuPath objects (one MultiPolygon per class, or one
                               Polygon per region), in level-0 pixels shifted as QuPath shows the
                               slide (:func:`wsss.wsi.slide.qupath_offset`)
    OUT/.wsss-lock.<name>      held while the slide is processed (:func:`owned_slide`); files are
    OUT/.wsss-manifest.jsonl   recorded in the manifest, and a file of these names that wsss did
                               not write is never replaced (unless --force) nor removed

The processed region (the slide or ``--roi``, in level-0 pixels) is read at ``--level``, or at the
level closest to ``--mpp`` and resized (without either: the µm/px the checkpoint was trained at,
:mod:`wsss.data.scale`; a slide that does not record its own µm/px then needs ``--slide-mpp``), one
row of windows at a time; windows are tiled, predicted
and blended exactly as in ``wsss predict`` (:mod:`wsss.tiling`). A window whose tissue
fraction is below ``--min-tissue`` (saturation above the Otsu threshold of a slide thumbnail) is
not segmented; pixels no segmented window covers are background.

Memory: one window row of pixels and blended probabilities (``tile × width``), never the whole
level. The label image lives in ``OUT/<name>_partial/labels.npy`` (a memory-mapped file) while
the run goes on; ``state.json`` next to it records the finished window rows after each one, so an
interrupted run continues where it stopped. The outputs are written (atomically) at the end and
the partial folder removed.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from wsss.data import stain
from wsss.data.png import write_rgb
from wsss.data.scale import MPP_TOLERANCE as SCALE_TOLERANCE
from wsss.data.specs import BACKGROUND_NAME, DatasetSpec, check_mpp
from wsss.errors import WsssError
from wsss.gate import DEFAULT_GATE_THRESHOLD, check_gate_options
from wsss.metrics import write_json
from wsss.inference import (
    TilePredictor, check_tta, check_window_options, load_models, model_scale, run_precision, upgrade_settings,
    window_for, windows_counted,
)
from wsss.runs.journal import Journal
from wsss.runs.owner import (
    Manifest, Owner, check_output_folder, file_sha256, manifest_record, owned_folder, remove_ours,
)
from wsss.pixels import class_counts, overlay_with_legend, row_blocks, white_background
from wsss.probabilities import quantise, to_float16, winners
from wsss.tiling import (
    Predictor, WindowGrid, WindowRow, as_predictor, blend_groups, final_rows, group_start, prefetch, row_groups, rows_per_group,
)
from wsss.runtime import check_precision, note_saved, progress_bar, warn_once
from wsss.wsi.channel_image import write_probability_image, write_tissue_image, write_tissue_png
from wsss.wsi.label_image import check_mask_format, label_image_path, label_kind, write_label_image
from wsss.wsi.placement import Placement
from wsss.wsi.geojson import GeoJsonOptions, class_features, write_geojson
from wsss.wsi.slide import READERS, Slide, fit_size, open_slide, output_stem, read_resampled, read_thumbnail
from wsss.wsi.tissue import saturation, tissue_fractions, tissue_threshold

log = logging.getLogger(__name__)

MPP_TOLERANCE = SCALE_TOLERANCE
"""A level within 5% of ``--mpp`` is used as it is (a 0.2527 µm/px scan's 4× level for ``--mpp 1``)."""

GEOJSON_MAX_PIXELS = 2**26
"""Largest label grid traced for GeoJSON at full resolution (8192²): labelling its regions and
their holes peaks at about 8 bytes a pixel (540 MB measured). A larger label image is traced on
every ``step``-th pixel and row, ``step`` the smallest that fits."""

THUMBNAIL_SIDE = 1024  # the whole-slide thumbnail that sets the tissue threshold
OVERLAY_SIDE = 2048  # longest side of the overlay picture


@dataclass(frozen=True)
class WsiConfig:
    """``wsss predict-wsi``: which slides and models, which level and region, how to tile, what to
    write where, and (a cohort) which share of the slides this process takes."""

    inputs: tuple[Path, ...]
    checkpoint: Path
    out: Path
    dataset: str | None = None  # None: the one recorded in the checkpoint
    gate: bool = False
    stage1_checkpoint: Path | None = None
    gate_threshold: float = DEFAULT_GATE_THRESHOLD
    gate_mode: str = "mask"
    level: int | None = None  # neither level nor mpp: the model's µm/px (model_mpp), else level 0
    mpp: float | None = None
    roi: tuple[int, int, int, int] | None = None  # x, y, w, h in level-0 pixels
    tile: int | None = None  # None: the checkpoint's training patch size (wsss.inference.window_for)
    overlap: int | None = None  # None: 32 px, or half the window when that is less
    batch_size: int = 8
    min_tissue: float = 0.05
    geojson: bool = False
    reader: str = "auto"
    device: str = "auto"
    precision: str = "fp32"  # fp32, bf16, fp16 or auto (wsss.runtime.resolve_precision)
    tta: str = "none"
    mask_format: str = "auto"
    geojson_mode: str = "per-class"
    object_type: str = "annotation"
    min_area: float = 0.0  # µm²
    simplify: float = 0.0  # label pixels
    bounds_offset: bool = True  # shift GeoJSON as QuPath crops slides to openslide.bounds-*
    shard: tuple[int, int] | None = None  # (index, count) of a cluster array job
    force: bool = False  # replace files in a slide's output folder that wsss did not write
    slide_mpp: float | None = None  # level-0 µm/px of slides that do not record it (a manifest's mpp wins)
    model_mpp: float | None = None  # set from the checkpoint by with_model_scale, not an option
    save_probs: bool = False  # also <name>_probs.ome.tif
    save_tissue_mask: bool = False  # also <name>_tissue.png / .ome.tif

    def __post_init__(self) -> None:
        if not self.inputs:
            raise WsssError("no slides given")
        check_precision(self.precision)
        self.geojson_options  # validates the GeoJSON options
        check_window_options(self.tile, self.overlap, self.batch_size, self.gate, self.stage1_checkpoint)
        check_gate_options(self.gate_mode, self.gate_threshold)
        check_tta(self.tta)
        check_mask_format(self.mask_format)
        if self.level is not None and self.mpp is not None:
            raise WsssError("--level and --mpp both pick the level to read; give one of them")
        if self.level is not None and self.level < 0:
            raise WsssError(f"--level must be 0 or more, not {self.level}")
        if self.mpp is not None and not self.mpp > 0:
            raise WsssError(f"--mpp must be positive, not {self.mpp}")
        if self.slide_mpp is not None:
            check_mpp(self.slide_mpp, "--slide-mpp")
        if self.roi is not None:  # four whole numbers: a sequence (the Python API, JSON) or "x,y,w,h"
            try:
                roi = tuple(self.roi.split(",")) if isinstance(self.roi, str) else tuple(self.roi)
                if all(not isinstance(v, bool) and float(v).is_integer() for v in roi):
                    object.__setattr__(self, "roi", tuple(int(float(v)) for v in roi))
            except (TypeError, ValueError):
                pass
        if self.roi is not None and (not isinstance(self.roi, tuple) or len(self.roi) != 4 or min(self.roi[:2]) < 0
                                     or min(self.roi[2:]) < 1):
            raise WsssError(f"--roi needs x,y,w,h with x, y >= 0 and w, h >= 1 (level-0 pixels), not {self.roi}")
        if not 0.0 <= self.min_tissue <= 1.0:
            raise WsssError(f"--min-tissue is a fraction from 0 to 1, not {self.min_tissue}")
        if self.reader not in READERS:
            raise WsssError(f"unknown slide reader {self.reader!r}; use {', '.join(READERS)}")

    @property
    def geojson_options(self) -> GeoJsonOptions:
        return GeoJsonOptions(self.geojson_mode, self.object_type, self.min_area, self.simplify)

    @property
    def target_mpp(self) -> tuple[float | None, str]:
        """The µm/px slides are read at and what says so: ``--mpp``, else (without ``--level``) the
        model's; ``(None, "")``: a level as it is."""
        if self.mpp is not None:
            return self.mpp, "--mpp"
        if self.level is None and self.model_mpp is not None:
            return self.model_mpp, "the model's µm/px"
        return None, ""


def with_model_scale(cfg: WsiConfig) -> WsiConfig:
    """The configuration with what the checkpoint records (:func:`wsss.inference.model_scale`): its
    µm/px (slides are read at it unless ``--level`` or ``--mpp`` say otherwise) and its training patch
    size (the window unless ``--tile`` gives one)."""
    mpp, patch_size = model_scale(cfg.checkpoint)
    tile, overlap = window_for(cfg.tile, cfg.overlap, patch_size)
    if mpp is None and cfg.level is None and cfg.mpp is None:
        log.info("%s does not record the µm/px it was trained at: slides are read at level 0 (--mpp reads them at "
                 "another)", cfg.checkpoint)
    return replace(cfg, tile=tile, overlap=overlap, model_mpp=mpp)


@dataclass(frozen=True)
class SlideJob:
    """One slide to segment: its file, the folder and file-name stem of its outputs, and what a
    cohort manifest may set per slide: its level-0 µm/px (for files that do not record it) and
    its region (level-0 ``x, y, w, h``)."""

    path: Path
    out: Path
    name: str
    mpp: float | None = None
    roi: tuple[int, int, int, int] | None = None
    patient: str | None = None  # a manifest's patient column (extract-patches splits by patient)

    def file(self, suffix: str) -> Path:
        """``OUT/<name><suffix>``, one of the slide's outputs."""
        return self.out / f"{self.name}{suffix}"

    # the slide's outputs; _partial: where an unfinished run keeps its label image and progress
    stem = property(lambda self: self.file(""))
    partial = property(lambda self: self.file("_partial"))
    summary = property(lambda self: self.file("_summary.json"))
    overlay = property(lambda self: self.file("_overlay.png"))
    geojson = property(lambda self: self.file(".geojson"))
    probs = property(lambda self: self.file("_probs.ome.tif"))

    def tissue(self, kind: str) -> Path:
        """The tissue mask of label-image kind ``kind`` (``png`` or ``ome-tiff``)."""
        return self.file(f"_tissue{'.png' if kind == 'png' else '.ome.tif'}")


@dataclass
class WsiResult:
    """The run's summary (as written to ``<name>_summary.json``) and the files written."""

    summary: dict
    files: list[Path] = field(default_factory=list)
    resumed_rows: int = 0
    finished_earlier: bool = False  # the same slide, models and settings: its outputs were already there


# --------------------------------------------------------------------------- level and region (pure)


def choose_level(downsamples: tuple[float, ...], slide_mpp: tuple[float, float] | None,
                 level: int | None = None, mpp: float | None = None,
                 tolerance: float = MPP_TOLERANCE, what: str = "--mpp") -> tuple[int, float]:
    """``(level, scale)``: the level to read and the factor its pixels are resized by (1, or < 1).

    ``level`` is taken as it is. For ``mpp`` (µm per pixel wanted), the coarsest level not coarser
    than ``mpp`` (within ``tolerance``) is read and shrunk to ``mpp``, unless it is within
    ``tolerance`` of it already. Neither: level 0. ``what`` names ``mpp`` in messages.
    """
    if level is not None:
        if not 0 <= level < len(downsamples):
            raise WsssError(f"--level {level}: the slide has levels 0 to {len(downsamples) - 1}")
        return level, 1.0
    if mpp is None:
        return 0, 1.0
    if slide_mpp is None:
        raise WsssError("--mpp needs the slide's microns per pixel, which it does not record; use --level")
    base = (slide_mpp[0] + slide_mpp[1]) / 2
    level_mpp = [base * d for d in downsamples]
    fine_enough = [i for i, m in enumerate(level_mpp) if m <= mpp * (1 + tolerance)]
    if not fine_enough:
        raise WsssError(f"{what} {mpp:g} is finer than the slide's level 0 ({level_mpp[0]:.4g} µm/px)")
    best = max(fine_enough, key=lambda i: level_mpp[i])
    scale = 1.0 if level_mpp[best] >= mpp / (1 + tolerance) else level_mpp[best] / mpp
    return best, scale


@dataclass(frozen=True)
class Grid:
    """The label image's pixels: level ``level`` (``level_downsample`` level-0 px per level px), its
    pixels ``box`` = ``(x0, y0, x1, y1)`` resized to ``size`` = ``(width, height)``."""

    level: int
    level_downsample: float
    box: tuple[int, int, int, int]
    size: tuple[int, int]

    @property
    def scale(self) -> tuple[float, float]:
        """Label pixels per level pixel, ``(x, y)``."""
        x0, y0, x1, y1 = self.box
        return self.size[0] / (x1 - x0), self.size[1] / (y1 - y0)

    @property
    def downsample(self) -> tuple[float, float]:
        """Level-0 pixels per label pixel, ``(x, y)``."""
        return self.level_downsample / self.scale[0], self.level_downsample / self.scale[1]

    @property
    def origin(self) -> tuple[float, float]:
        """Level-0 position of the label image's top-left corner."""
        return self.box[0] * self.level_downsample, self.box[1] * self.level_downsample

    @property
    def box0(self) -> tuple[float, float, float, float]:
        """The processed region in level-0 pixels ``(x0, y0, x1, y1)``."""
        ds = self.level_downsample
        return tuple(v * ds for v in self.box)

    def rows_box(self, top: int, bottom: int) -> tuple[float, float, float, float]:
        """Label rows ``[top, bottom)``, full width, as a level box (fractions when resized)."""
        x0, y0, x1, _ = self.box
        sy = self.scale[1]
        return x0, y0 + top / sy, x1, y0 + bottom / sy

    def to_level0(self, xy: np.ndarray) -> np.ndarray:
        """Label-image positions ``(N, 2)`` ``(x, y)`` → level-0 pixel coordinates."""
        return np.asarray(self.origin) + xy * np.asarray(self.downsample)

    def mpp(self, slide_mpp: tuple[float, float] | None) -> tuple[float, float] | None:
        """Microns per label pixel ``(x, y)``, None when the slide does not record them."""
        if slide_mpp is None:
            return None
        return slide_mpp[0] * self.downsample[0], slide_mpp[1] * self.downsample[1]

    def placement(self, slide_mpp: tuple[float, float] | None,
                  qupath_offset: tuple[float, float] = (0, 0)) -> Placement:
        """Where the label image lies on the slide (``qupath_offset``: where QuPath's picture starts)."""
        return Placement(self.origin, self.downsample, self.mpp(slide_mpp), tuple(qupath_offset))


def plan_grid(dimensions: tuple[tuple[int, int], ...], downsamples: tuple[float, ...], level: int,
              scale: float, roi: tuple[int, int, int, int] | None) -> Grid:
    """The label grid of ``roi`` (level-0 ``x, y, w, h``; None: the whole slide) at ``level``,
    widened to whole level pixels and resized by ``scale``."""
    w0, h0 = dimensions[0]
    x, y, w, h = roi if roi is not None else (0, 0, w0, h0)
    if x + w > w0 or y + h > h0:
        raise WsssError(f"--roi {x},{y},{w},{h} reaches beyond the slide ({w0}×{h0} px at level 0)")
    ds = downsamples[level]
    lw, lh = dimensions[level]
    box = (math.floor(x / ds), math.floor(y / ds), min(lw, math.ceil((x + w) / ds)), min(lh, math.ceil((y + h) / ds)))
    size = (max(1, round((box[2] - box[0]) * scale)), max(1, round((box[3] - box[1]) * scale)))
    return Grid(level, ds, box, size)


def replay_start(ys: list[int], th: int, start: int) -> int:
    """First window row to run when resuming at row ``start``: the earliest whose windows still
    reach row ``ys[start]``, so the blend of the rows below is rebuilt exactly."""
    if start >= len(ys):
        return start
    return min((r for r in range(start) if ys[r] + th > ys[start]), default=start)


# --------------------------------------------------------------------------- resumable label image


class BandProgress:
    """The label image being written (``labels.npy``, memory-mapped) and its :class:`~wsss.runs.journal.Journal`
    ``state.json``: the window rows finished and the tiles segmented and skipped so far, under the
    run's ``fingerprint``. With ``--save-probs`` and ``--save-tissue-mask`` also ``probs.npy``
    ``(C, H, W)`` and ``tissue.npy`` ``(H, W)``, filled and flushed with the labels (the fingerprint
    says which are kept)."""

    def __init__(self, folder: Path, labels: np.ndarray, journal: Journal,
                 layers: dict[str, np.ndarray] | None = None) -> None:
        self.folder, self.labels, self.journal = folder, labels, journal
        layers = layers or {}
        self.probs: np.ndarray | None = layers.get("probs")
        self.tissue: np.ndarray | None = layers.get("tissue")
        self._since = time.monotonic()

    @property
    def state(self) -> dict:
        return self.journal.state

    def elapsed(self) -> float:
        """Seconds spent on this slide: by earlier, interrupted runs and by this one so far."""
        return float(self.state.get("seconds", 0.0)) + time.monotonic() - self._since

    @classmethod
    def open(cls, folder: Path, fingerprint: dict, shape: tuple[int, int],
             layers: dict[str, tuple[int, ...]] | None = None) -> BandProgress:
        """Continue the unfinished run in ``folder`` when it has the same fingerprint, else start anew.
        ``layers``: the shapes of the other uint8 arrays kept beside the labels (``probs``, ``tissue``)."""
        shapes = {"labels": tuple(shape), **{k: tuple(v) for k, v in (layers or {}).items()}}
        paths = {name: folder / f"{name}.npy" for name in shapes}
        start = {"rows_done": 0, "segmented": 0, "skipped": 0, "seconds": 0.0}
        journal = Journal.open(folder / "state.json", fingerprint, on_change="restart", upgrade=upgrade_settings,
                               state=start)
        if journal.state.get("rows_done") and paths["labels"].is_file():
            try:
                arrays = {name: np.lib.format.open_memmap(path, mode="r+") for name, path in paths.items()}
            except (OSError, ValueError):
                arrays = None
            if arrays is not None and all(arrays[name].shape == shapes[name] for name in shapes):
                return cls(folder, arrays.pop("labels"), journal, arrays)
            log.info("%s holds unfinished rows that cannot be read back; starting over", folder)
        journal.steps, journal.state = {}, dict(start)
        folder.mkdir(parents=True, exist_ok=True)
        arrays = {}
        for name, path in paths.items():
            try:
                arrays[name] = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=shapes[name])
                _reserve(path)
            except OSError as exc:
                path.unlink(missing_ok=True)
                raise WsssError(f"cannot write {path}: {exc.strerror or exc}") from None
        progress = cls(folder, arrays.pop("labels"), journal, arrays)
        journal.save()
        return progress

    @property
    def rows_done(self) -> int:
        return int(self.state["rows_done"])

    def finish_row(self, segmented: int, skipped: int) -> None:
        """One more window row is in ``labels`` (and the other layers): flush them, then record it."""
        for array in (self.labels, self.probs, self.tissue):
            if array is not None:
                array.flush()
        self.state["rows_done"] += 1
        self.state["segmented"] += segmented
        self.state["skipped"] += skipped
        self.state["seconds"] = self.elapsed()
        self._since = time.monotonic()
        self.journal.save()
        note_saved(f"{self.rows_done} window rows saved in {self.folder} (the same command continues from there)")

    def remove(self) -> None:
        del self.labels, self.probs, self.tissue
        shutil.rmtree(self.folder, ignore_errors=True)


def _reserve(path: Path) -> None:
    """Allocate a memory-mapped file's blocks now: on a full disk a write into a sparse mapping kills
    the process (SIGBUS) instead of raising an error."""
    if not hasattr(os, "posix_fallocate"):
        return
    with open(path, "r+b") as f:
        try:
            os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                return  # the file system cannot preallocate: nothing to gain
            raise


def _file_id(path: Path | None) -> list | None:
    if path is None:
        return None
    stat = Path(path).stat()
    return [str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns]


def labels_fingerprint(cfg: WsiConfig, job: SlideJob, spec: DatasetSpec) -> dict:
    """What the label image depends on, known before the slide is opened."""
    return {
        "slide": _file_id(job.path), "slide_mpp": job.mpp or cfg.slide_mpp, "roi": job.roi or cfg.roi,
        "reader": cfg.reader,
        "checkpoint": _file_id(cfg.checkpoint),
        "gate": [_file_id(cfg.stage1_checkpoint), cfg.gate_threshold, cfg.gate_mode] if cfg.gate else None,
        "dataset": [spec.name, list(spec.classes)], "level": cfg.level, "mpp": cfg.target_mpp[0], "tile": cfg.tile,
        "overlap": cfg.overlap, "min_tissue": cfg.min_tissue, "precision": run_precision(cfg),
        "batch_size": cfg.batch_size,
        "tta": cfg.tta,
    }


def finished_summary(job: SlideJob, fingerprint: dict, grid: Grid | None = None) -> dict | None:
    """The slide's summary when it records ``fingerprint`` and its files are there as wsss wrote them
    (the folder's manifest), else None: a finished slide is not segmented again, alone or in a
    cohort; one whose file was replaced or edited is (its ownership check comes first). ``grid``
    (known once the slide is open): the summary's level, region and size must be its own too, so
    that a slide whose µm/px is read otherwise now is segmented again."""
    try:
        summary = json.loads(job.summary.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if upgrade_settings(summary.get("fingerprint") or {}) != fingerprint:
        return None
    if grid is not None and [summary.get(k) for k in ("level", "region", "size")] != \
            [grid.level, [round(v, 3) for v in grid.box0], list(grid.size)]:
        return None
    names = [summary.get(k) for k in ("mask", "overlay", "geojson", "probs", "tissue_mask") if summary.get(k)]
    files = [job.summary, *(job.out / str(n) for n in names)]
    manifest = Manifest.read(job.out)
    return summary if all(manifest_record(manifest, job.out, f) is not None for f in files) else None


def finished_slide(job: SlideJob, cfg: WsiConfig, spec: DatasetSpec) -> dict | None:
    """:func:`finished_summary` of a slide, its grid included: the slide is opened (only when its
    summary is otherwise that of a finished slide) to see which level and region these options read
    now; a slide that cannot be opened is not finished (segmenting it says why)."""
    fingerprint = job_fingerprint(cfg, job, spec)
    if finished_summary(job, fingerprint) is None:
        return None
    try:
        with open_job(job, cfg.reader, cfg.slide_mpp) as slide:
            grid = slide_grid(slide, job, cfg)
    except WsssError:
        return None
    return finished_summary(job, fingerprint, grid)


def job_fingerprint(cfg: WsiConfig, job: SlideJob, spec: DatasetSpec) -> dict:
    """What every output of a slide depends on: a finished slide whose summary records the same
    fingerprint is not segmented again."""
    outputs = {"mask_format": cfg.mask_format, "geojson": cfg.geojson}
    outputs.update({k: True for k in ("save_probs", "save_tissue_mask") if getattr(cfg, k)})
    if cfg.geojson:
        outputs.update(geojson_mode=cfg.geojson_mode, object_type=cfg.object_type, min_area=cfg.min_area,
                       simplify=cfg.simplify, bounds_offset=cfg.bounds_offset)
    return json.loads(json.dumps({**labels_fingerprint(cfg, job, spec), "outputs": outputs}))


def band_fingerprint(cfg: WsiConfig, job: SlideJob, spec: DatasetSpec, slide: Slide, grid: Grid,
                     threshold: int) -> dict:
    """What the label image depends on; an unfinished slide resumes only when all of it is unchanged."""
    layers = {k: True for k in ("save_probs", "save_tissue_mask") if getattr(cfg, k)}
    return {**labels_fingerprint(cfg, job, spec), "reader": slide.reader, "grid": [grid.level, grid.box, grid.size],
            "tissue_threshold": threshold, **layers}


# --------------------------------------------------------------------------- segmentation


def band_labels(blended: tuple[torch.Tensor, torch.Tensor] | None, band: np.ndarray, rows: int,
                spec: DatasetSpec) -> np.ndarray:
    """Class indices ``(rows, W)`` of the first ``rows`` rows of a window row's ``band`` ``(th, W, 3)``:
    the argmax of the blended probabilities; background where no segmented window reached and,
    for datasets whose white is background, on white pixels.

    The white test sees the band's ``th`` rows, not the whole level, so a white speck under 50 px
    cut by a band's top edge may count as background."""
    labels = np.full((rows, band.shape[1]), spec.background_index, dtype=np.uint8)
    if blended is not None:
        probs, wsum = blended
        covered = (wsum > 0).cpu().numpy()
        labels[covered] = probs.max(dim=0).indices.to("cpu", torch.uint8).numpy()[covered]
    if spec.white_is_background:
        labels[white_background(band)[:rows]] = spec.background_index
    return labels


def band_probs(blended: tuple[torch.Tensor, torch.Tensor] | None, rows: int, width: int,
               classes: int) -> np.ndarray:
    """Class probabilities ``(C, rows, W)`` uint8 of the first ``rows`` rows of a window row
    (:func:`wsss.probabilities.quantise`: their argmax is :func:`band_labels`' class wherever a
    window was segmented); 0 where none was."""
    if blended is None:
        return np.zeros((classes, rows, width), dtype=np.uint8)
    probs, wsum = blended
    return quantise(to_float16(probs), winners(probs), (wsum > 0).cpu().numpy())


def segment_slide(slide: Slide, grid: Grid, predictor: Predictor, spec: DatasetSpec, threshold: int,
                  cfg: WsiConfig, state: BandProgress, progress: bool = False) -> None:
    """Fill ``state.labels`` window row by window row, from the first unfinished one.

    Each window row's pixels are read whole (``tile × width``); windows with less than
    ``cfg.min_tissue`` tissue are skipped; the others are predicted in batches (across the rows of
    a :func:`~wsss.tiling.rows_per_group` group) and blended, the next group read and prepared in a
    background thread meanwhile. When resuming, the group holding the first row whose windows reach
    into the first unfinished one is run again (and not written), which rebuilds its blend from the
    same batches as an uninterrupted run.
    """
    predictor = as_predictor(predictor)
    width, height = grid.size
    windows = WindowGrid(height, width, cfg.tile, cfg.overlap)
    group = rows_per_group(cfg.batch_size, len(windows.xs))
    start = state.rows_done
    first = group_start(replay_start(windows.ys, windows.th, start), group) if start < len(windows.ys) else start

    def read_row(r: int) -> WindowRow:
        y0 = windows.ys[r]
        band = read_resampled(slide, grid.level, grid.rows_box(y0, y0 + windows.th), (width, windows.th))
        tissue = saturation(band) > threshold
        fractions = tissue_fractions(tissue, windows.xs, windows.tw)
        return WindowRow(r, y0, band, [x0 for x0, f in zip(windows.xs, fractions) if f >= cfg.min_tissue])

    per_row = len(windows.xs)
    groups = row_groups(read_row, range(first, len(windows.ys)), group, windows.tw, predictor.prepare)
    with closing(prefetch(groups)) as groups, \
            progress_bar(None, progress, total=windows.count, initial=min(start, len(windows.ys)) * per_row,
                      desc="tiles") as bar:
        for row, blended in blend_groups(groups, predictor, windows, cfg.batch_size):
            if row.index < start:
                continue  # run again only to rebuild the blend of the rows below
            rows = final_rows(windows.ys, row.index, windows.th)
            state.labels[row.top : row.top + rows] = band_labels(blended, row.band, rows, spec)
            if state.probs is not None:
                state.probs[:, row.top : row.top + rows] = band_probs(blended, rows, width, spec.num_classes)
            if state.tissue is not None:
                state.tissue[row.top : row.top + rows] = (saturation(row.band[:rows]) > threshold) * np.uint8(255)
            state.finish_row(len(row.starts), per_row - len(row.starts))
            bar.update(per_row)


# --------------------------------------------------------------------------- outputs


def slide_colour(slide: Slide, grid: Grid, threshold: int, cfg: WsiConfig) -> stain.SetColour:
    """``reinhard-set``: a slide's colour over its windows that reach ``--min-tissue`` (and are stained),
    of at most four times :data:`~wsss.data.stain.FIT_PATCHES` windows read, evenly spaced over the
    window grid, each read as :func:`segment_slide` reads it."""
    width, height = grid.size
    windows = WindowGrid(height, width, cfg.tile, cfg.overlap)
    (x0, y0, _, _), (sx, sy) = grid.box, grid.scale
    corners = [(y, x) for y in windows.ys for x in windows.xs]

    def tissue_windows():
        for y, x in stain.spaced(corners, 4 * stain.FIT_PATCHES):
            box = (x0 + x / sx, y0 + y / sy, x0 + (x + windows.tw) / sx, y0 + (y + windows.th) / sy)
            window = read_resampled(slide, grid.level, box, (windows.tw, windows.th))
            if (saturation(window) > threshold).mean() >= cfg.min_tissue:
                yield window

    return stain.measure_set(tissue_windows())


def sample_labels(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``labels`` ``(H, W)`` shrunk to ``size`` = ``(w, h)`` by taking the pixel under each centre."""
    height, width = labels.shape
    w, h = size
    rows = ((np.arange(h) + 0.5) * height / h).astype(np.int64)
    cols = ((np.arange(w) + 0.5) * width / w).astype(np.int64)
    out = np.empty((h, w), dtype=np.uint8)
    for block in row_blocks(h, width):
        out[block] = np.asarray(labels[rows[block]])[:, cols]
    return out


def slide_placement(grid: Grid, slide: Slide, cfg: WsiConfig) -> Placement:
    """Where the label image lies on the slide, QuPath's offset as the GeoJSON takes it."""
    return grid.placement(slide.mpp, slide.qupath_offset if cfg.bounds_offset else (0, 0))


def write_layers(job: SlideJob, cfg: WsiConfig, grid: Grid, spec: DatasetSpec, state: BandProgress,
                 placement: Placement, mpp: tuple[float, float] | None, summary: dict) -> list[Path]:
    """The probability and tissue images asked for (named in ``summary``); those of an earlier run
    that this one does not write are removed (only files wsss wrote)."""
    files = []
    kind = label_kind(cfg.mask_format, grid.size[0] * grid.size[1])
    if state.probs is not None:
        files.append(write_probability_image(job.probs, state.probs, spec, mpp, placement))
        summary["probs"] = job.probs.name
    else:
        remove_ours(job.probs)
    if state.tissue is not None:
        tissue = job.tissue(kind)
        files.append(write_tissue_png(tissue, state.tissue) if kind == "png"
                     else write_tissue_image(tissue, state.tissue, mpp, placement))
        summary["tissue_mask"] = tissue.name
    for other in ("png", "ome-tiff"):
        if state.tissue is None or other != kind:
            remove_ours(job.tissue(other))
    return files


def write_overlay(path: Path, slide: Slide, grid: Grid, labels: np.ndarray, spec: DatasetSpec,
                  max_side: int = OVERLAY_SIDE) -> None:
    """The processed region at most ``max_side`` px a side, the classes blended in, the legend below."""
    size = fit_size(*grid.size, max_side)
    image = read_thumbnail(slide, grid.box0, size)
    write_rgb(path, overlay_with_legend(image, sample_labels(labels, size), spec))


def geojson_transform(grid: Grid, step: int, offset: tuple[float, float]):
    """Label-pixel corners ``(N, 2)`` of a label image traced on every ``step``-th pixel → level-0
    pixels, less ``offset`` (where QuPath's picture of the slide starts)."""
    limit = np.asarray(grid.size, dtype=np.float64)
    shift = np.asarray(offset, dtype=np.float64)

    def transform(xy: np.ndarray) -> np.ndarray:
        return grid.to_level0(np.minimum(xy * step, limit)) - shift

    return transform


def write_regions(path: Path, labels: np.ndarray, spec: DatasetSpec, grid: Grid, slide: Slide, cfg: WsiConfig,
                  max_pixels: int = GEOJSON_MAX_PIXELS) -> int:
    """The GeoJSON of ``labels``' regions in QuPath's coordinates; returns the number of features."""
    step = max(1, math.ceil(math.sqrt(labels.size / max_pixels)))
    if step > 1:
        log.info("tracing regions on every %d-th label pixel (%d×%d px)", step, *grid.size)
    offset = slide.qupath_offset if cfg.bounds_offset else (0, 0)
    mpp = grid.mpp(slide.mpp)
    um2 = mpp[0] * mpp[1] * step * step if mpp is not None else None
    px2 = grid.downsample[0] * grid.downsample[1] * step * step
    features = class_features(np.asarray(labels[::step, ::step]), spec, geojson_transform(grid, step, offset),
                              cfg.geojson_options, um2, px2)
    write_geojson(path, features)
    return len(features)


def summarise(job: SlideJob, cfg: WsiConfig, slide: Slide, grid: Grid, spec: DatasetSpec, labels: np.ndarray,
              threshold: int, state: BandProgress) -> dict:
    """The summary: what was processed, at which resolution, and how much of each class was found."""
    mpp = grid.mpp(slide.mpp)
    counts = class_counts(labels, max(spec.num_classes, spec.background_index) + 1)
    names = [*spec.classes, BACKGROUND_NAME]
    indices = [*range(spec.num_classes), spec.background_index]
    classes = {}
    for name, i in zip(names, indices):
        entry = {"pixels": int(counts[i]), "fraction": float(counts[i] / max(labels.size, 1))}
        if mpp is not None:
            entry["area_um2"] = float(counts[i] * mpp[0] * mpp[1])
        classes[name] = entry
    return {
        "slide": str(job.path), "reader": slide.reader, "dataset": spec.name,
        "level": grid.level, "level_downsample": grid.level_downsample, "scale": list(grid.scale),
        "downsample": list(grid.downsample), "mpp": list(mpp) if mpp else None,
        "region": [round(v, 3) for v in grid.box0], "size": list(grid.size),
        "placement": slide_placement(grid, slide, cfg).to_json(),
        "tile": cfg.tile, "overlap": cfg.overlap, "tta": cfg.tta,
        "tiles": {"total": state.state["segmented"] + state.state["skipped"],
                  "segmented": state.state["segmented"], "skipped": state.state["skipped"]},
        "tissue_threshold": threshold, "min_tissue": cfg.min_tissue,
        "classes": classes,
    }


def write_outputs(job: SlideJob, cfg: WsiConfig, slide: Slide, grid: Grid, spec: DatasetSpec, threshold: int,
                  state: BandProgress) -> WsiResult:
    """Mask, overlay, GeoJSON (when asked) and the summary naming them, each written atomically;
    the summary last, so that it exists only when everything else does."""
    labels = state.labels
    summary = summarise(job, cfg, slide, grid, spec, labels, threshold, state)
    mpp, placement = grid.mpp(slide.mpp), slide_placement(grid, slide, cfg)
    mask = write_label_image(job.stem, labels, spec, mpp, cfg.mask_format, placement=placement)
    write_overlay(job.overlay, slide, grid, labels, spec)
    files = [mask, job.overlay]
    summary["mask"], summary["overlay"] = mask.name, job.overlay.name
    files += write_layers(job, cfg, grid, spec, state, placement, mpp, summary)
    regions = job.geojson
    if cfg.geojson:
        summary["geojson"], summary["regions"] = regions.name, write_regions(regions, labels, spec, grid, slide, cfg)
        summary["geojson_offset"] = list(slide.qupath_offset if cfg.bounds_offset else (0, 0))
        files.append(regions)
    else:
        remove_ours(regions)  # an earlier run's, with other options; never a file of the user's
    summary["fingerprint"] = job_fingerprint(cfg, job, spec)
    summary["seconds"] = round(state.elapsed(), 3)
    write_json(job.summary, summary)
    return WsiResult(summary, [*files, job.summary])


# --------------------------------------------------------------------------- the run


def open_job(job: SlideJob, reader: str, slide_mpp: float | None = None) -> Slide:
    """The job's slide, with the manifest's µm/px in place of the file's when given; ``slide_mpp``
    (``--slide-mpp``) only for a file that records none (one that records another is warned about)."""
    slide = open_slide(job.path, reader)
    if job.mpp is not None:
        slide.mpp = (job.mpp, job.mpp)
    elif slide_mpp is not None and slide.mpp is None:
        slide.mpp = (slide_mpp, slide_mpp)
    elif slide_mpp is not None and not all(math.isclose(v, slide_mpp, rel_tol=MPP_TOLERANCE) for v in slide.mpp):
        warn_once(log, f"warning: {job.path} records {'×'.join(f'{v:g}' for v in dict.fromkeys(slide.mpp))} µm/px; "
                       f"--slide-mpp {slide_mpp:g} is for slides that record none, so the recorded value is used "
                       "(a manifest's mpp column overrides it)")
    return slide


def slide_threshold(slide: Slide) -> int:
    """The tissue threshold of the whole-slide thumbnail; a thumbnail without any pixel above it
    is a slide without tissue, a user error."""
    w0, h0 = slide.dimensions[0]
    thumbnail = read_thumbnail(slide, (0, 0, w0, h0), fit_size(w0, h0, THUMBNAIL_SIDE))
    check_colour(thumbnail, slide.path)
    threshold = tissue_threshold(thumbnail)
    if not (saturation(thumbnail) > threshold).any():
        raise WsssError(f"{slide.path}: no tissue (no pixel of its thumbnail has a saturation above {threshold})")
    return threshold


def slide_grid(slide: Slide, job: SlideJob, cfg: WsiConfig) -> Grid:
    """The label grid of the job's region at the level ``--level``, ``--mpp`` or the model's µm/px picks."""
    mpp, what = cfg.target_mpp
    if mpp is not None and slide.mpp is None:
        raise WsssError(f"{slide.path} does not record its µm/px, which reading it at {what} ({mpp:g}) needs: pass "
                        "--slide-mpp (its level-0 µm/px), or --level to read a level as it is")
    level, scale = choose_level(slide.downsamples, slide.mpp, cfg.level, mpp, what=what or "--mpp")
    return plan_grid(slide.dimensions, slide.downsamples, level, scale, job.roi or cfg.roi)


def output_files(job: SlideJob, cfg: WsiConfig, grid: Grid) -> list[Path]:
    """The files a run writes for ``job``, claimed before anything is computed."""
    pixels = grid.size[0] * grid.size[1]
    mask = label_image_path(job.stem, cfg.mask_format, pixels)
    layers = ([job.probs] if cfg.save_probs else []) + \
        ([job.tissue(label_kind(cfg.mask_format, pixels))] if cfg.save_tissue_mask else [])
    return [mask, job.overlay, *layers, *([job.geojson] if cfg.geojson else []), job.summary]


@contextmanager
def owned_slide(job: SlideJob, cfg: WsiConfig) -> Iterator[Owner]:
    """Hold the job's output folder for this slide (:func:`wsss.runs.owner.owned_folder`): its lock
    ``<out>/.wsss-lock.<name>`` (runs on other slides may share the folder; a slide locked by another
    live process is a :class:`~wsss.runs.lock.LockHeld`), and the manifest of what wsss wrote there."""
    with owned_folder(job.out, "predict-wsi", key=f"predict-wsi {job.name}", force=cfg.force, scope=job.name,
                      read_from=[job.path.parent]) as owner:
        yield owner


def run_inputs(cfg: WsiConfig) -> dict:
    """The checkpoints' sha256, recorded with each run in the manifest."""
    return {"checkpoint": file_sha256(cfg.checkpoint),
            "stage1_checkpoint": file_sha256(cfg.stage1_checkpoint) if cfg.gate and cfg.stage1_checkpoint else None}


def run_slide(job: SlideJob, cfg: WsiConfig, predictor: Predictor, spec: DatasetSpec, owner: Owner,
              progress: bool = True) -> WsiResult:
    """Segment one slide (continuing an interrupted run of it) and write its outputs, in a folder
    ``owner`` holds (:func:`owned_slide`). Files there that wsss did not write are refused before
    anything is computed (unless ``--force``). A slide that cannot be read, has no tissue, or lacks
    the µm/px ``--mpp`` needs is a :class:`WsssError`."""
    with open_job(job, cfg.reader, cfg.slide_mpp) as slide:
        grid = slide_grid(slide, job, cfg)
        owner.claim(output_files(job, cfg, grid))
        owner.begin(job_fingerprint(cfg, job, spec), run_inputs(cfg))
        threshold = slide_threshold(slide)
        state = BandProgress.open(job.partial, band_fingerprint(cfg, job, spec, slide, grid, threshold),
                                  grid.size[::-1], layer_shapes(cfg, grid, spec))
        resumed = state.rows_done
        if resumed:
            log.info("continuing %s from window row %d", job.path, resumed + 1)
        if isinstance(predictor, TilePredictor):  # reinhard-set: the slide is the set
            predictor = predictor.for_set(lambda: slide_colour(slide, grid, threshold, cfg), job.path.name)
        segment_slide(slide, grid, predictor, spec, threshold, cfg, state, progress)
        stain.log_counts(windows_counted(predictor, f"windows of {job.path.name}"))
        if state.state["segmented"] == 0:
            state.remove()
            raise WsssError(f"{job.path}: no tissue (no window reaches --min-tissue {cfg.min_tissue:g} of "
                            f"pixels with a saturation above {threshold})")
        result = write_outputs(job, cfg, slide, grid, spec, threshold, state)
    state.remove()
    result.resumed_rows = resumed
    return result


def layer_shapes(cfg: WsiConfig, grid: Grid, spec: DatasetSpec) -> dict[str, tuple[int, ...]]:
    """The arrays kept beside the labels while a slide is segmented: probabilities, tissue."""
    width, height = grid.size
    return {**({"probs": (spec.num_classes, height, width)} if cfg.save_probs else {}),
            **({"tissue": (height, width)} if cfg.save_tissue_mask else {})}


def run(cfg: WsiConfig, progress: bool = True,
        models: tuple[Predictor, DatasetSpec] | None = None) -> WsiResult:
    """``wsss predict-wsi SLIDE``: one slide, outputs directly in ``--out``, which is held for this
    slide (:func:`owned_slide`). ``models``: the predictor and spec :func:`load_models` gives for
    ``cfg``, already loaded (the Python API's :meth:`wsss.api.Segmenter.predict_slide`)."""
    check_output_folder(cfg.out)
    path = cfg.inputs[0]
    job = SlideJob(path, cfg.out, output_stem(path))
    with open_job(job, cfg.reader, cfg.slide_mpp) as slide:  # a slide that cannot be used fails before the models load
        cfg = with_model_scale(cfg)
        grid = slide_grid(slide, job, cfg)
    with owned_slide(job, cfg) as owner:
        owner.claim(output_files(job, cfg, grid))  # before the models load (run_slide claims them too)
        predictor, spec = models if models is not None else load_models(cfg)
        if (summary := finished_summary(job, job_fingerprint(cfg, job, spec), grid)) is not None:
            log.debug("%s: finished earlier with these models and settings, not segmented again", job.path)
            return WsiResult(summary, output_files(job, cfg, grid), finished_earlier=True)
        return run_slide(job, cfg, predictor, spec, owner, progress)


def check_colour(thumbnail: np.ndarray, path: Path, spread: int = 2) -> None:
    """Refuse a slide without colour: a greyscale scan (which OpenSlide returns as RGB) has no
    saturated pixel, so no window would ever count as tissue and the output would be all background."""
    rgb = thumbnail.astype(np.int16)
    if int((rgb.max(axis=-1) - rgb.min(axis=-1)).max(initial=0)) <= spread:
        raise WsssError(f"{path} has no colour (a greyscale image, or empty glass): predict-wsi segments RGB H&E "
                        "slides")
