"""``wsss predict-wsi``: segment a whole-slide image tile by tile and export the result.

Outputs, for a slide ``<name>.<ext>``::

    OUT/<name>_mask.png        class indices at the processed level, palette PNG (4 = background) …
    OUT/<name>_mask.tif        … or, above PNG_MAX_PIXELS, a tiled deflate palette TIFF with µm/px tags
    OUT/<name>_overlay.png     thumbnail of the processed region, classes blended in, legend below
    OUT/<name>_summary.json    level, scale, µm per pixel, tiles segmented and skipped, per-class
                               pixels, fractions and (when the slide records µm/px) areas in µm²
    OUT/<name>.geojson         with --geojson: one QuPath annotation per connected region per
                               class, in level-0 pixel coordinates

The processed region (the slide or ``--roi``, in level-0 pixels) is read at ``--level``, or at the
level closest to ``--mpp`` and resized, one row of windows at a time; windows are tiled, predicted
and blended exactly as in ``wsss predict`` (:mod:`wsss.stages.predict`). A window whose tissue
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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from wsss.data.png import write_mask, write_rgb
from wsss.data.specs import DatasetSpec
from wsss.errors import WsssError
from wsss.gate import check_gate_options
from wsss.metrics import write_json
from wsss.ownership import check_output_folder, owned_folder, owner_of
from wsss.runtime import atomic_path, note_saved
from wsss.stages.predict import (
    RowBlender, TilePredictor, check_window_options, class_counts, final_rows, load_models,
    overlay_with_legend, row_blocks, tile_starts, white_background,
)
from wsss.stages.stage1 import _progress
from wsss.wsi.geojson import class_features, write_geojson
from wsss.wsi.slide import READERS, Slide, fit_size, open_slide, read_resampled, read_thumbnail
from wsss.wsi.tissue import saturation, tissue_fractions, tissue_threshold

log = logging.getLogger(__name__)

MPP_TOLERANCE = 0.05
"""A level within 5% of ``--mpp`` is used as it is (a 0.2527 µm/px scan's 4× level for ``--mpp 1``)."""

PNG_MAX_PIXELS = 89_478_485
"""Largest label image written as PNG: PIL's decompression-bomb warning limit, so that
``Image.open`` reads it without complaint. Larger label images are written as tiled TIFF."""

GEOJSON_MAX_PIXELS = 2**26
"""Largest label grid traced for GeoJSON at full resolution (8192²): labelling its regions and
their holes peaks at about 8 bytes a pixel (540 MB measured). A larger label image is traced on
every ``step``-th pixel and row, ``step`` the smallest that fits."""

THUMBNAIL_SIDE = 1024  # the whole-slide thumbnail that sets the tissue threshold
OVERLAY_SIDE = 2048  # longest side of the overlay picture
TIFF_TILE = 256


@dataclass(frozen=True)
class WsiConfig:
    """``wsss predict-wsi``: which slide and models, which level and region, how to tile, where to write."""

    slide: Path
    checkpoint: Path
    out: Path
    dataset: str | None = None  # None: the one recorded in the checkpoint
    gate: bool = False
    stage1_checkpoint: Path | None = None
    gate_threshold: float = 0.1
    gate_mode: str = "mask"
    level: int | None = None  # neither level nor mpp: level 0
    mpp: float | None = None
    roi: tuple[int, int, int, int] | None = None  # x, y, w, h in level-0 pixels
    tile: int = 224
    overlap: int = 32
    batch_size: int = 8
    min_tissue: float = 0.05
    geojson: bool = False
    reader: str = "auto"
    device: str = "auto"
    amp: bool = False
    force: bool = False  # replace files in OUT that wsss did not write

    def __post_init__(self) -> None:
        check_window_options(self.tile, self.overlap, self.batch_size, self.gate, self.stage1_checkpoint)
        check_gate_options(self.gate_mode, self.gate_threshold)
        if self.level is not None and self.mpp is not None:
            raise WsssError("--level and --mpp both pick the level to read; give one of them")
        if self.level is not None and self.level < 0:
            raise WsssError(f"--level must be 0 or more, not {self.level}")
        if self.mpp is not None and not self.mpp > 0:
            raise WsssError(f"--mpp must be positive, not {self.mpp}")
        if self.roi is not None and (len(self.roi) != 4 or min(self.roi[:2]) < 0 or min(self.roi[2:]) < 1):
            raise WsssError(f"--roi needs x,y,w,h with x, y >= 0 and w, h >= 1 (level-0 pixels), not {self.roi}")
        if not 0.0 <= self.min_tissue <= 1.0:
            raise WsssError(f"--min-tissue is a fraction from 0 to 1, not {self.min_tissue}")
        if self.reader not in READERS:
            raise WsssError(f"unknown slide reader {self.reader!r}; use {', '.join(READERS)}")


@dataclass
class WsiResult:
    """The run's summary (as written to ``<name>_summary.json``) and the files written."""

    summary: dict
    files: list[Path] = field(default_factory=list)
    resumed_rows: int = 0


# --------------------------------------------------------------------------- level and region (pure)


def choose_level(downsamples: tuple[float, ...], slide_mpp: tuple[float, float] | None,
                 level: int | None = None, mpp: float | None = None,
                 tolerance: float = MPP_TOLERANCE) -> tuple[int, float]:
    """``(level, scale)``: the level to read and the factor its pixels are resized by (1, or < 1).

    ``level`` is taken as it is. For ``mpp`` (µm per pixel wanted), the coarsest level not coarser
    than ``mpp`` (within ``tolerance``) is read and shrunk to ``mpp``, unless it is within
    ``tolerance`` of it already. Neither: level 0.
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
        raise WsssError(f"--mpp {mpp:g} is finer than the slide's level 0 ({level_mpp[0]:.4g} µm/px)")
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
    """The label image being written (``labels.npy``, memory-mapped) and ``state.json``: the window
    rows finished and the tiles segmented and skipped so far, under the run's ``fingerprint``."""

    def __init__(self, folder: Path, labels: np.ndarray, state: dict) -> None:
        self.folder, self.labels, self.state = folder, labels, state

    @classmethod
    def open(cls, folder: Path, fingerprint: dict, shape: tuple[int, int]) -> BandProgress:
        """Continue the unfinished run in ``folder`` when it has the same fingerprint, else start anew."""
        fingerprint = json.loads(json.dumps(fingerprint))  # tuples → lists, as read back
        state_path, labels_path = folder / "state.json", folder / "labels.npy"
        if state_path.is_file() and labels_path.is_file():
            try:
                state = json.loads(state_path.read_text(encoding="utf-8"))
                labels = np.lib.format.open_memmap(labels_path, mode="r+")
            except (OSError, ValueError):
                state, labels = {}, None
            if state.get("fingerprint") == fingerprint and labels is not None and labels.shape == shape:
                return cls(folder, labels, state)
            log.info("%s holds an unfinished run with other settings; starting over", folder)
        folder.mkdir(parents=True, exist_ok=True)
        try:
            labels = np.lib.format.open_memmap(labels_path, mode="w+", dtype=np.uint8, shape=shape)
            _reserve(labels_path)
        except OSError as exc:
            labels_path.unlink(missing_ok=True)
            raise WsssError(f"cannot write {labels_path}: {exc.strerror or exc}") from None
        progress = cls(folder, labels, {"fingerprint": fingerprint, "rows_done": 0, "segmented": 0, "skipped": 0})
        progress.save()
        return progress

    @property
    def rows_done(self) -> int:
        return int(self.state["rows_done"])

    def finish_row(self, segmented: int, skipped: int) -> None:
        """One more window row is in ``labels``: flush it, then record it."""
        self.labels.flush()
        self.state["rows_done"] += 1
        self.state["segmented"] += segmented
        self.state["skipped"] += skipped
        self.save()
        note_saved(f"{self.rows_done} window rows saved in {self.folder} (the same command continues from there)")

    def save(self) -> None:
        # Scratch, rewritten after every row: not recorded in OUT's manifest (the folder is removed at the end).
        with atomic_path(self.folder / "state.json", owned=False) as tmp:
            tmp.write_text(json.dumps(self.state, indent=2) + "\n", encoding="utf-8")

    def remove(self) -> None:
        del self.labels
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


def fingerprint(cfg: WsiConfig, slide: Slide, grid: Grid, spec: DatasetSpec, threshold: int) -> dict:
    """What the label image depends on; a run resumes only when all of it is unchanged."""
    return {
        "slide": _file_id(cfg.slide), "reader": slide.reader, "checkpoint": _file_id(cfg.checkpoint),
        "gate": [_file_id(cfg.stage1_checkpoint), cfg.gate_threshold, cfg.gate_mode] if cfg.gate else None,
        "dataset": spec.name, "level": grid.level, "box": grid.box, "size": grid.size, "tile": cfg.tile,
        "overlap": cfg.overlap, "min_tissue": cfg.min_tissue, "tissue_threshold": threshold, "amp": cfg.amp,
    }


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


def segment_slide(slide: Slide, grid: Grid, predictor: TilePredictor, spec: DatasetSpec, threshold: int,
                  cfg: WsiConfig, state: BandProgress, progress: bool = False) -> None:
    """Fill ``state.labels`` window row by window row, from the first unfinished one.

    Each window row's pixels are read whole (``tile × width``); windows with less than
    ``cfg.min_tissue`` tissue are skipped; the others are predicted in batches and blended. When
    resuming, the rows whose windows reach into the first unfinished one are run again (and not
    written) to rebuild its blend.
    """
    width, height = grid.size
    th, tw = min(cfg.tile, height), min(cfg.tile, width)
    ys, xs = tile_starts(height, th, cfg.overlap), tile_starts(width, tw, cfg.overlap)
    start = state.rows_done
    blender = RowBlender(width, th, tw, cfg.overlap)
    with _progress(None, progress, total=len(ys) * len(xs), initial=min(start, len(ys)) * len(xs), desc="tiles") as bar:
        for r in range(replay_start(ys, th, start), len(ys)):
            y0 = ys[r]
            band = read_resampled(slide, grid.level, grid.rows_box(y0, y0 + th), (width, th))
            tissue = saturation(band) > threshold
            keep = [x0 for x0, f in zip(xs, tissue_fractions(tissue, xs, tw)) if f >= cfg.min_tissue]
            for b in range(0, len(keep), cfg.batch_size):
                starts = keep[b : b + cfg.batch_size]
                for x0, p in zip(starts, predictor([band[:, x0 : x0 + tw] for x0 in starts])):
                    blender.add(x0, p)
            rows = final_rows(ys, r, th)
            blended = blender.pop(rows)
            if r < start:
                continue  # run again only to rebuild the blend of the rows below
            state.labels[y0 : y0 + rows] = band_labels(blended, band, rows, spec)
            state.finish_row(len(keep), len(xs) - len(keep))
            bar.update(len(xs))


# --------------------------------------------------------------------------- outputs


def write_label_image(stem: Path, labels: np.ndarray, spec: DatasetSpec, mpp: tuple[float, float] | None,
                      png_max_pixels: int = PNG_MAX_PIXELS) -> Path:
    """``<stem>_mask.png`` (palette PNG) up to ``png_max_pixels`` pixels, else ``<stem>_mask.tif``
    (tiled palette TIFF); a file of the other kind left by an earlier run is removed."""
    png, tif = label_image_paths(stem)
    path, other = (png, tif) if labels.size <= png_max_pixels else (tif, png)
    if path == png:
        write_mask(png, np.asarray(labels), spec.flat_palette())
    else:
        write_label_tiff(tif, labels, spec, mpp)
    owner = owner_of(other)
    if owner is not None and other.exists():
        owner.may_write(other)  # only an earlier run's label image of the other kind is removed
    other.unlink(missing_ok=True)
    return path


def label_image_paths(stem: Path) -> tuple[Path, Path]:
    """``(<stem>_mask.png, <stem>_mask.tif)``."""
    return stem.with_name(stem.name + "_mask.png"), stem.with_name(stem.name + "_mask.tif")


def output_files(out: Path, slide: Path) -> list[Path]:
    """Every file a run on ``slide`` may write into ``out``."""
    stem = out / slide.stem
    return [*label_image_paths(stem), *(stem.with_name(stem.name + suffix)
                                        for suffix in ("_overlay.png", "_summary.json", ".geojson"))]


def write_label_tiff(path: Path, labels: np.ndarray, spec: DatasetSpec, mpp: tuple[float, float] | None) -> None:
    """A tiled, deflate-compressed palette TIFF of ``labels`` ``(H, W)``, written tile by tile from
    the (memory-mapped) array, atomically; resolution tags give ``mpp`` when known."""
    import tifffile

    colormap = np.zeros((3, 256), dtype=np.uint16)
    colormap[:, : len(spec.palette)] = np.asarray(spec.palette, dtype=np.uint16).T * 257
    extra = {}
    if mpp is not None:
        extra = {"resolution": (1e4 / mpp[0], 1e4 / mpp[1]), "resolutionunit": "CENTIMETER"}
    with atomic_path(path) as tmp:
        with tifffile.TiffWriter(tmp, bigtiff=labels.size > 2**31) as tif:
            tif.write(_tiles(labels, TIFF_TILE), shape=labels.shape, dtype=np.uint8, tile=(TIFF_TILE, TIFF_TILE),
                      photometric="palette", colormap=colormap, compression="zlib", **extra)


def _tiles(labels: np.ndarray, side: int):
    """``side × side`` tiles of ``labels`` in row order, zero-padded at the right and bottom edges."""
    height, width = labels.shape
    for top in range(0, height, side):
        rows = np.asarray(labels[top : top + side])
        for left in range(0, width, side):
            tile = np.zeros((side, side), dtype=np.uint8)
            block = rows[:, left : left + side]
            tile[: block.shape[0], : block.shape[1]] = block
            yield tile


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


def write_overlay(path: Path, slide: Slide, grid: Grid, labels: np.ndarray, spec: DatasetSpec,
                  max_side: int = OVERLAY_SIDE) -> None:
    """The processed region at most ``max_side`` px a side, the classes blended in, the legend below."""
    size = fit_size(*grid.size, max_side)
    image = read_thumbnail(slide, grid.box0, size)
    write_rgb(path, overlay_with_legend(image, sample_labels(labels, size), spec))


def write_regions(path: Path, labels: np.ndarray, spec: DatasetSpec, grid: Grid,
                  max_pixels: int = GEOJSON_MAX_PIXELS) -> int:
    """The GeoJSON of ``labels``' regions in level-0 coordinates; returns the number of features."""
    step = max(1, math.ceil(math.sqrt(labels.size / max_pixels)))
    if step > 1:
        log.info("tracing regions on every %d-th label pixel (%d×%d px)", step, *grid.size)
    limit = np.asarray(grid.size, dtype=np.float64)

    def transform(xy: np.ndarray) -> np.ndarray:
        return grid.to_level0(np.minimum(xy * step, limit))

    features = class_features(np.asarray(labels[::step, ::step]), spec, transform)
    write_geojson(path, features)
    return len(features)


def summarise(cfg: WsiConfig, slide: Slide, grid: Grid, spec: DatasetSpec, labels: np.ndarray,
              threshold: int, state: BandProgress) -> dict:
    """The summary: what was processed, at which resolution, and how much of each class was found."""
    mpp = grid.mpp(slide.mpp)
    counts = class_counts(labels, max(spec.num_classes, spec.background_index) + 1)
    names = [*spec.classes, "background"]
    indices = [*range(spec.num_classes), spec.background_index]
    classes = {}
    for name, i in zip(names, indices):
        entry = {"pixels": int(counts[i]), "fraction": float(counts[i] / max(labels.size, 1))}
        if mpp is not None:
            entry["area_um2"] = float(counts[i] * mpp[0] * mpp[1])
        classes[name] = entry
    return {
        "slide": str(cfg.slide), "reader": slide.reader, "dataset": spec.name,
        "level": grid.level, "level_downsample": grid.level_downsample, "scale": list(grid.scale),
        "downsample": list(grid.downsample), "mpp": list(mpp) if mpp else None,
        "region": [round(v, 3) for v in grid.box0], "size": list(grid.size),
        "tile": cfg.tile, "overlap": cfg.overlap,
        "tiles": {"total": state.state["segmented"] + state.state["skipped"],
                  "segmented": state.state["segmented"], "skipped": state.state["skipped"]},
        "tissue_threshold": threshold, "min_tissue": cfg.min_tissue,
        "classes": classes,
    }


def write_outputs(cfg: WsiConfig, slide: Slide, grid: Grid, spec: DatasetSpec, threshold: int,
                  state: BandProgress) -> WsiResult:
    """Mask, overlay, GeoJSON (when asked) and the summary naming them, each written atomically."""
    stem = cfg.out / cfg.slide.stem
    labels = state.labels
    summary = summarise(cfg, slide, grid, spec, labels, threshold, state)
    mask = write_label_image(stem, labels, spec, grid.mpp(slide.mpp))
    overlay = stem.with_name(stem.name + "_overlay.png")
    write_overlay(overlay, slide, grid, labels, spec)
    files = [mask, overlay]
    summary["mask"], summary["overlay"] = mask.name, overlay.name
    if cfg.geojson:
        regions = stem.with_name(stem.name + ".geojson")
        summary["geojson"], summary["regions"] = regions.name, write_regions(regions, labels, spec, grid)
        files.append(regions)
    summary_path = stem.with_name(stem.name + "_summary.json")
    write_json(summary_path, summary)
    return WsiResult(summary, [*files, summary_path])


# --------------------------------------------------------------------------- the run


def partial_folder(out: Path, slide: Path) -> Path:
    """Where an unfinished run keeps its label image and progress."""
    return out / f"{slide.stem}_partial"


def run(cfg: WsiConfig, progress: bool = True) -> WsiResult:
    """Segment the slide (continuing an interrupted run) and write its outputs.

    OUT is held for this slide only (a per-slide lock: runs on other slides may share OUT); files
    of this slide's names that wsss did not write are not replaced unless ``cfg.force``."""
    check_output_folder(cfg.out)
    with open_slide(cfg.slide, cfg.reader) as slide:
        level, scale = choose_level(slide.downsamples, slide.mpp, cfg.level, cfg.mpp)
        grid = plan_grid(slide.dimensions, slide.downsamples, level, scale, cfg.roi)
        predictor, spec = load_models(cfg)
        w0, h0 = slide.dimensions[0]
        thumbnail = read_thumbnail(slide, (0, 0, w0, h0), fit_size(w0, h0, THUMBNAIL_SIDE))
        check_colour(thumbnail, cfg.slide)
        threshold = tissue_threshold(thumbnail)
        with owned_folder(cfg.out, "predict-wsi", key=f"predict-wsi {cfg.slide.name}", force=cfg.force,
                          scope=cfg.slide.stem, read_from=[cfg.slide.parent]) as owner:
            owner.begin({"slide": str(cfg.slide)}, {"fingerprint": fingerprint(cfg, slide, grid, spec, threshold)})
            owner.claim(output_files(cfg.out, cfg.slide))
            state = BandProgress.open(partial_folder(cfg.out, cfg.slide),
                                      fingerprint(cfg, slide, grid, spec, threshold), grid.size[::-1])
            resumed = state.rows_done
            if resumed:
                log.info("continuing %s from window row %d", cfg.slide, resumed + 1)
            segment_slide(slide, grid, predictor, spec, threshold, cfg, state, progress)
            result = write_outputs(cfg, slide, grid, spec, threshold, state)
            state.remove()
    if result.summary["tiles"]["segmented"] == 0:
        log.warning("warning: no window of %s reached --min-tissue %g: nothing was segmented, the label image is "
                    "all background", cfg.slide, cfg.min_tissue)
    result.resumed_rows = resumed
    return result


def check_colour(thumbnail: np.ndarray, path: Path, spread: int = 2) -> None:
    """Refuse a slide without colour: a greyscale scan (which OpenSlide returns as RGB) has no
    saturated pixel, so no window would ever count as tissue and the output would be all background."""
    rgb = thumbnail.astype(np.int16)
    if int((rgb.max(axis=-1) - rgb.min(axis=-1)).max(initial=0)) <= spread:
        raise WsssError(f"{path} has no colour (a greyscale image, or empty glass): predict-wsi segments RGB H&E "
                        "slides")
