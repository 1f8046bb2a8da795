"""``wsss predict``: a stage-2 segmenter (optionally gated by the stage-1 classifier) on the user's own
images, of any size.

Outputs, for every input image ``<name>.<ext>``::

    OUT/<name>_mask.png      palette PNG of class indices (the dataset's palette; 4 = white background)
    OUT/<name>_overlay.png   the image blended with the class colours, a legend underneath
    OUT/summary.csv          one row per processed image: size and area fraction of every class

An image is cut into ``tile`` × ``tile`` windows (stride ``tile - overlap``, the last window flush with
the border). Each window is resized by ``image_size / tile`` when the checkpoint records the input
size it was trained at, so tissue appears at the scale the model learned; its softmax probabilities
come back at window size and are blended with a tapered weight, so no seam shows where windows meet.
Windows are processed one row at a time and only the rows still overlapped by the next window row
are kept as probabilities: memory grows with ``tile × width``, never with ``classes × height × width``.
"""

from __future__ import annotations

import csv
import io
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from scipy import ndimage

from wsss.data.background import to_grey
from wsss.data.datasets import InputNorm, resize_rgb, to_tensor
from wsss.data.png import check_rgb_mode, write_mask, write_rgb
from wsss.data.specs import DatasetSpec, get_spec
from wsss.errors import WsssError
from wsss.models.deeplab import read_checkpoint
from wsss.ownership import Owner, check_output_folder, differences, file_sha256, owned_folder
from wsss.runtime import atomic_path, note_saved, resolve_device
from wsss.stages.stage1 import LoadedClassifier, _progress, load_classifier
from wsss.gate import check_gate_options, gate_logits
from wsss.stages.stage2 import LoadedSegmenter, class_probs, load_segmenter, segment
from wsss.viz import legend, overlay

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
SUMMARY_NAME = "summary.csv"

MAX_PIXELS = 1_000_000_000
"""Largest image read (3 GB as RGB); PIL's own decompression-bomb limit (89 Mpx) is lifted up to this."""

BLOCK_PIXELS = 2**20
"""Pixels handled at once by the whole-image pixel operations (background, overlay, counts), whose
temporaries take 10 to 30 bytes a pixel."""

_FOUR_CONNECTED = np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], dtype=bool)


@dataclass(frozen=True)
class PredictConfig:
    """``wsss predict``: which images, which models, where to write, how to tile and run."""

    inputs: tuple[Path, ...]
    checkpoint: Path
    out: Path
    dataset: str | None = None  # None: the one recorded in the checkpoint
    gate: bool = False
    stage1_checkpoint: Path | None = None
    gate_threshold: float = 0.1
    gate_mode: str = "mask"
    tile: int = 224
    overlap: int = 32
    batch_size: int = 8
    device: str = "auto"
    amp: bool = False
    force: bool = False  # replace files in OUT that wsss did not write, and predictions of other settings

    def __post_init__(self) -> None:
        check_window_options(self.tile, self.overlap, self.batch_size, self.gate, self.stage1_checkpoint)
        check_gate_options(self.gate_mode, self.gate_threshold)


def check_window_options(tile: int, overlap: int, batch_size: int, gate: bool, stage1_checkpoint: Path | None) -> None:
    """The sliding-window and gate options every predict command shares; a bad one is a user error."""
    if tile < 16:
        raise WsssError(f"--tile must be at least 16 px, not {tile}")
    if not 0 <= overlap < tile:
        raise WsssError(f"--overlap must be at least 0 and smaller than --tile ({tile}), not {overlap}")
    if batch_size < 1:
        raise WsssError(f"--batch-size must be at least 1, not {batch_size}")
    if gate and stage1_checkpoint is None:
        raise WsssError("--gate needs --stage1-checkpoint")


class ModelOptions(Protocol):
    """What :func:`load_models` reads from a config (:class:`PredictConfig` and the whole-slide one)."""

    checkpoint: Path
    dataset: str | None
    gate: bool
    stage1_checkpoint: Path | None
    gate_threshold: float
    gate_mode: str
    tile: int
    device: str
    amp: bool


@dataclass
class PredictResult:
    """What a run did: one summary row per processed image, one message per image that failed."""

    rows: list[dict]
    failures: list[str]
    total: int
    summary: Path | None


# --------------------------------------------------------------------------- tiling (pure)


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Origins of windows of ``tile`` px covering ``[0, length)`` with stride ``tile - overlap``;
    the last window ends exactly at ``length`` (so it may overlap its neighbour by more)."""
    if length <= tile:
        return [0]
    stride = tile - overlap
    return list(range(0, length - tile, stride)) + [length - tile]


def blend_window(length: int, overlap: int, floor: float = 1e-3) -> np.ndarray:
    """1-D blending weight ``(length,)`` float32: 1 in the middle, rising as ``sin²`` over the first
    and last ``overlap`` pixels.

    Where two windows overlap by exactly ``overlap`` their weights sum to 1 (sin² + cos²), so the
    blend fades from one window to the next instead of jumping. The ``floor`` keeps the image's own
    border pixels, which only one window sees, from a zero weight.
    """
    i = np.arange(length, dtype=np.float64)
    if overlap <= 0:
        return np.ones(length, dtype=np.float32)
    rise = np.sin(0.5 * np.pi * np.minimum((i + 0.5) / overlap, 1.0)) ** 2
    w = np.minimum(rise, rise[::-1])
    return np.maximum(w, floor).astype(np.float32)


def model_size(tile_hw: tuple[int, int], tile: int, image_size: int | None) -> tuple[int, int]:
    """Model input ``(h, w)`` for a window of ``tile_hw`` px: scaled by ``image_size / tile`` (the
    training scale) when the checkpoint records an input size, else the window as it is."""
    if image_size is None:
        return tile_hw
    scale = image_size / tile
    return tuple(max(1, round(side * scale)) for side in tile_hw)


# --------------------------------------------------------------------------- model side


def _batch(tiles: Sequence[np.ndarray], size: tuple[int, int], norm: InputNorm, device: torch.device) -> torch.Tensor:
    """Windows ``(h, w, 3)`` uint8 → normalised model input ``(B, 3, *size)`` on ``device``."""
    return torch.stack([to_tensor(resize_rgb(t, size), norm) for t in tiles]).to(device)


@dataclass
class TilePredictor:
    """Class probabilities of image windows: the segmenter's softmax, with the gate when given.

    ``tile`` is the window side the models' training scale refers to (``--tile``).
    """

    seg: LoadedSegmenter
    tile: int
    device: torch.device
    gate: LoadedClassifier | None = None
    threshold: float = 0.1
    amp: bool = False
    gate_mode: str = "mask"

    def __post_init__(self) -> None:
        self.seg.model.eval().to(self.device)
        if self.gate is not None:
            self.gate.model.eval().to(self.device)

    def __call__(self, tiles: Sequence[np.ndarray]) -> torch.Tensor:
        """Windows of one size ``(h, w, 3)`` uint8 → probabilities ``(B, C, h, w)`` float32.

        With the gate, each window's classes that the classifier rules out get probability 0.
        """
        size = tiles[0].shape[:2]
        x = _batch(tiles, model_size(size, self.tile, self.seg.image_size), self.seg.norm, self.device)
        logits = segment(self.seg.model, x, size, self.amp)
        if self.gate is not None:
            xg = _batch(tiles, model_size(size, self.tile, self.gate.image_size), self.gate.norm, self.device)
            logits = gate_logits(logits, class_probs(self.gate, xg, self.amp), self.threshold, self.gate_mode)
        return logits.softmax(dim=1)


# --------------------------------------------------------------------------- sliding window


class RowBlender:
    """Blended class probabilities of one row of windows at a time, across ``width`` px.

    Windows of ``(th, tw)`` px are added with the tapered weight of :func:`blend_window`;
    :meth:`pop` hands back the first rows, those no later window row reaches, and moves the rest up
    for the next row, which inherits them. Held: ``C × th × width`` weighted sums and ``th × width``
    weight sums, allocated on the device of the first probabilities added.
    """

    def __init__(self, width: int, th: int, tw: int, overlap: int) -> None:
        self.width, self.th, self.tw = width, th, tw
        self.weight = torch.from_numpy(np.outer(blend_window(th, overlap), blend_window(tw, overlap)))
        self.acc: torch.Tensor | None = None  # (C, th, width)
        self.wsum: torch.Tensor | None = None  # (th, width)

    def add(self, x0: int, probs: torch.Tensor) -> None:
        """Add one window's probabilities ``(C, th, tw)`` at column ``x0``."""
        if self.acc is None:
            self.acc = torch.zeros(probs.shape[0], self.th, self.width, device=probs.device)
            self.wsum = torch.zeros(self.th, self.width, device=probs.device)
            self.weight = self.weight.to(probs.device)
        self.acc[:, :, x0 : x0 + self.tw].addcmul_(probs, self.weight)
        self.wsum[:, x0 : x0 + self.tw] += self.weight

    def pop(self, rows: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The blended probabilities ``(C, rows, width)`` and weight sums ``(rows, width)`` of the
        first ``rows`` rows, then shift up; None while no window has been added. A pixel that no
        window covered has weight 0 and probabilities 0."""
        if self.acc is None:
            return None
        wsum = self.wsum[:rows].clone()
        probs = self.acc[:, :rows] / wsum.clamp_min(1e-30)
        _shift_up(self.acc, rows)
        _shift_up(self.wsum, rows)
        return probs, wsum


def _shift_up(sums: torch.Tensor, rows: int) -> None:
    """Move the rows after the first ``rows`` of ``sums`` (..., R, W) to the top and zero the rest, in
    place: what the next window row, starting ``rows`` lower, inherits from those above it."""
    rest = sums.shape[-2] - rows
    sums[..., :rest, :] = sums[..., rows:, :].clone()
    sums[..., rest:, :] = 0


def final_rows(ys: Sequence[int], r: int, th: int) -> int:
    """How many rows from ``ys[r]`` on are final once window row ``r`` is blended: those above the
    next window row, or all ``th`` for the last row."""
    return ys[r + 1] - ys[r] if r + 1 < len(ys) else th


def probability_bands(
    image: np.ndarray,
    predict: Callable[[Sequence[np.ndarray]], torch.Tensor],
    tile: int,
    overlap: int,
    batch_size: int,
    progress: bool = False,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Blended class probabilities of an ``(H, W, 3)`` image, top to bottom.

    Yields ``(top, probs)``: rows ``top .. top + n`` are final, ``probs`` ``(C, n, W)`` float32 (on
    the predictor's device). Only one window row of weighted sums is held at a time, plus the rows
    the next window row still overlaps.
    """
    height, width = image.shape[:2]
    th, tw = min(tile, height), min(tile, width)
    ys, xs = tile_starts(height, th, overlap), tile_starts(width, tw, overlap)
    blender = RowBlender(width, th, tw, overlap)
    with _progress(None, progress, total=len(ys) * len(xs), desc="tiles", leave=False) as bar:
        for r, y0 in enumerate(ys):
            for b in range(0, len(xs), batch_size):
                starts = xs[b : b + batch_size]
                probs = predict([image[y0 : y0 + th, x0 : x0 + tw] for x0 in starts])
                for x0, p in zip(starts, probs):
                    blender.add(x0, p)
                bar.update(len(starts))
            yield y0, blender.pop(final_rows(ys, r, th))[0]


def predict_mask(
    image: np.ndarray,
    predict: Callable[[Sequence[np.ndarray]], torch.Tensor],
    tile: int,
    overlap: int,
    batch_size: int,
    progress: bool = False,
) -> np.ndarray:
    """Class indices ``(H, W)`` uint8: argmax of the blended probabilities of :func:`probability_bands`."""
    mask = np.empty(image.shape[:2], dtype=np.uint8)
    for top, probs in probability_bands(image, predict, tile, overlap, batch_size, progress):
        # max(dim=0) rather than argmax(dim=0): same first-maximum indices, several times faster on CPU.
        mask[top : top + probs.shape[1]] = probs.max(dim=0).indices.to("cpu", torch.uint8).numpy()
    return mask


# --------------------------------------------------------------------------- whole-image pixel work


def row_blocks(height: int, width: int, block_pixels: int = BLOCK_PIXELS) -> Iterator[slice]:
    """Row ranges of about ``block_pixels`` pixels covering ``height`` rows of ``width`` pixels."""
    step = max(1, block_pixels // max(width, 1))
    for top in range(0, height, step):
        yield slice(top, min(top + step, height))


def white_background(image: np.ndarray, threshold: int = 200, min_size: int = 50,
                     block_pixels: int = BLOCK_PIXELS) -> np.ndarray:
    """Boolean ``(H, W)`` white-background mask, equal to :func:`wsss.data.background.white_mask`
    (grey > ``threshold``; 4-connected white blobs under ``min_size`` px are tissue) but computed a
    block of rows at a time: ``white_mask`` widens the whole image to uint32 and labels it in int32,
    16 bytes a pixel, 1.6 GB for a 10,000² image.

    Each block is labelled together with ``min_size`` rows above and below it. That is exact: a
    blob of the block that the margin cuts spans more than ``min_size`` rows, so it has at least
    ``min_size`` pixels inside the margin already and is background either way.
    """
    height = image.shape[0]
    white = np.empty(image.shape[:2], dtype=bool)
    for rows in row_blocks(height, image.shape[1], block_pixels):
        top, bottom = max(0, rows.start - min_size), min(height, rows.stop + min_size)
        window = to_grey(image[top:bottom]) > threshold
        labels, n = ndimage.label(window, structure=_FOUR_CONNECTED)
        keep = np.bincount(labels.ravel(), minlength=n + 1) >= min_size
        keep[0] = False
        white[rows] = keep[labels[rows.start - top : rows.stop - top]]
    return white


def class_counts(mask: np.ndarray, num_labels: int) -> np.ndarray:
    """How many pixels of ``mask`` hold each value ``0 .. num_labels - 1``: ``(num_labels,)`` int64.

    Counted a block of rows at a time: ``np.bincount`` widens its input to int64.
    """
    counts = np.zeros(num_labels, dtype=np.int64)
    for rows in row_blocks(*mask.shape):
        counts += np.bincount(mask[rows].ravel(), minlength=num_labels)[:num_labels]
    return counts


def class_fractions(mask: np.ndarray, num_labels: int) -> np.ndarray:
    """Fraction of the pixels of ``mask`` holding each value ``0 .. num_labels - 1`` ``(num_labels,)``."""
    return class_counts(mask, num_labels) / max(mask.size, 1)


def overlay_with_legend(image: np.ndarray, mask: np.ndarray, spec: DatasetSpec) -> np.ndarray:
    """The :func:`wsss.viz.overlay` of ``mask`` on ``image`` with the class :func:`wsss.viz.legend`
    pasted under it, on white: ``(H + legend height, max(W, legend width), 3)`` uint8.

    Blended a block of rows at a time (``overlay`` works in float32, 12 bytes a pixel)."""
    key = np.asarray(legend(spec, background=spec.white_is_background))
    height, width = mask.shape
    canvas = np.full((height + key.shape[0], max(width, key.shape[1]), 3), 255, dtype=np.uint8)
    for rows in row_blocks(height, width):
        canvas[rows, :width] = overlay(image[rows], mask[rows], spec)
    canvas[height:, : key.shape[1]] = key
    return canvas


# --------------------------------------------------------------------------- inputs


def collect_images(inputs: Sequence[Path]) -> list[Path]:
    """Image files named directly or found (not recursively) in folders, in order, without repeats.

    A folder contributes its ``.png/.jpg/.jpeg/.tif/.tiff`` files. A path that does not exist or a
    folder holding no image is a user error (nothing is processed).
    """
    images: list[Path] = []
    seen: set[Path] = set()
    for path in map(Path, inputs):
        if path.is_dir():
            found = _folder_images(path)
            if not found:
                raise WsssError(f"{path} holds no PNG, JPEG or TIFF images")
        elif path.exists():
            found = [path]
        else:
            raise WsssError(f"input not found: {path}")
        for image in found:
            if image.resolve() not in seen:
                seen.add(image.resolve())
                images.append(image)
    if not images:
        raise WsssError("no input images given")
    _check_output_names(images)
    return images


def _folder_images(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES
    )


def _check_output_names(images: Sequence[Path]) -> None:
    """Two inputs with the same name stem would write the same output files."""
    by_stem: dict[str, Path] = {}
    for image in images:
        other = by_stem.setdefault(image.stem, image)
        if other != image:
            raise WsssError(f"{other} and {image} would both be written as {image.stem}_mask.png; rename one")


def read_image(path: Path, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """An input image as ``(H, W, 3)`` uint8; raises :class:`WsssError` when it cannot be
    read, is not RGB (palette and CMYK images are converted) or has more than ``max_pixels``."""
    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # our own limit below, with a clearer message
    try:
        with Image.open(path) as img:
            check_rgb_mode(img, path)
            if img.width * img.height > max_pixels:
                raise WsssError(f"{path} is {img.width}×{img.height} px; at most {max_pixels:,} pixels are read")
            img.load()
            return _pixels(img if img.mode == "RGB" else img.convert("RGB"))
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise WsssError(f"cannot read image {path}: {exc}") from None
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def _pixels(img: Image.Image) -> np.ndarray:
    """``(H, W, 3)`` uint8 copy of an RGB PIL image, a block of rows at a time: ``np.asarray`` of the
    whole image goes through ``tobytes``, a third copy of a large image while PIL's is still held."""
    out = np.empty((img.height, img.width, 3), dtype=np.uint8)
    for rows in row_blocks(img.height, img.width):
        out[rows] = np.asarray(img.crop((0, rows.start, img.width, rows.stop)))
    return out


# --------------------------------------------------------------------------- models


def resolve_dataset(checkpoint: Path, dataset: str | None) -> DatasetSpec:
    """The dataset spec (classes, palette): ``--dataset`` when given, else the checkpoint's record."""
    if dataset is not None:
        return get_spec(dataset)
    recorded = read_checkpoint(checkpoint).get("dataset")
    if not isinstance(recorded, str):
        raise WsssError(f"{checkpoint} does not record its dataset; pass --dataset (luad or bcss)")
    return get_spec(recorded)


def load_models(cfg: ModelOptions) -> tuple[TilePredictor, DatasetSpec]:
    """The tile predictor and the dataset spec; a wrong checkpoint or class count is a user error."""
    seg = load_segmenter(cfg.checkpoint)
    spec = resolve_dataset(cfg.checkpoint, cfg.dataset)
    if seg.model.num_classes != spec.num_classes:
        raise WsssError(f"{cfg.checkpoint} was trained for {seg.model.num_classes} classes; "
                        f"the {spec.name} dataset has {spec.num_classes}")
    if seg.class_names is not None and tuple(seg.class_names) != spec.classes:
        log.warning("%s was trained on classes %s; naming them %s (--dataset %s)", cfg.checkpoint,
                    ", ".join(seg.class_names), ", ".join(spec.classes), spec.name)
    gate = load_classifier(cfg.stage1_checkpoint, spec.num_classes) if cfg.gate else None
    predictor = TilePredictor(seg, cfg.tile, resolve_device(cfg.device), gate, cfg.gate_threshold, cfg.amp,
                              cfg.gate_mode)
    return predictor, spec


# --------------------------------------------------------------------------- one image, the run


def output_paths(out: Path, image: Path) -> tuple[Path, Path]:
    """``(OUT/<name>_mask.png, OUT/<name>_overlay.png)``."""
    return out / f"{image.stem}_mask.png", out / f"{image.stem}_overlay.png"


MIN_SIDE_OF_TILE = 0.5
"""An image whose shorter side is below this fraction of ``--tile`` is refused: the model would see a
sliver of its training field of view (a 1×1 px image came out as "100 % one class")."""


def check_image_size(path: Path, image: np.ndarray, tile: int) -> None:
    height, width = image.shape[:2]
    need = math.ceil(tile * MIN_SIDE_OF_TILE)
    if min(height, width) < need:
        raise WsssError(f"{path} is {width}×{height} px, far below the {tile} px window (at least {need} px a side "
                        f"is needed; a smaller --tile, e.g. the training patch size, may fit)")


def predict_image(path: Path, predictor: TilePredictor, spec: DatasetSpec, cfg: PredictConfig,
                  progress: bool = False) -> dict:
    """Segment one image and write its mask and overlay; returns its summary row."""
    image = read_image(path)
    check_image_size(path, image, cfg.tile)
    mask = predict_mask(image, predictor, cfg.tile, cfg.overlap, cfg.batch_size, progress)
    if spec.white_is_background:
        mask[white_background(image)] = spec.background_index
    mask_path, overlay_path = output_paths(cfg.out, path)
    write_mask(mask_path, mask, spec.flat_palette())
    canvas = overlay_with_legend(image, mask, spec)
    del image  # the overlay's PNG encoder needs room too
    write_rgb(overlay_path, canvas)
    return summary_row(path, mask, spec)


def summary_row(path: Path, mask: np.ndarray, spec: DatasetSpec) -> dict:
    """``{"image", "width", "height", <class>..., "background"}`` with area fractions per class."""
    fractions = class_fractions(mask, max(spec.num_classes, spec.background_index) + 1)
    row = {"image": str(path), "width": mask.shape[1], "height": mask.shape[0]}
    row.update({name: float(f) for name, f in zip(spec.classes, fractions)})
    row["background"] = float(fractions[spec.background_index])
    return row


def write_summary(path: Path, rows: Sequence[dict], spec: DatasetSpec) -> None:
    """``summary.csv``: one row per image, fractions with 6 decimals; written atomically."""
    fields = ["image", "width", "height", *spec.classes, "background"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: f"{v:.6f}" if isinstance(v, float) else v for k, v in row.items()})
    with atomic_path(path) as tmp:
        tmp.write_text(buffer.getvalue(), encoding="utf-8")


def settings(cfg: PredictConfig, spec: DatasetSpec) -> dict:
    """What a prediction depends on (the models' bytes, classes, tiling, gate); not where or how fast."""
    return {"checkpoint_sha256": file_sha256(cfg.checkpoint), "dataset": spec.name, "tile": cfg.tile,
            "overlap": cfg.overlap, "amp": cfg.amp,
            "gate": [file_sha256(cfg.stage1_checkpoint), cfg.gate_threshold, cfg.gate_mode] if cfg.gate else None}


def input_folders_of(images: Sequence[Path], inputs: Sequence[Path]) -> list[Path]:
    """The folders the images are read from: OUT may not be one of them."""
    return sorted({Path(p) for p in inputs if Path(p).is_dir()} | {Path(p).parent for p in images})


def run(cfg: PredictConfig, progress: bool = True) -> PredictResult:
    """Predict every input image; an image that cannot be read is listed in ``failures`` and the
    others still go on. ``summary.csv`` lists the processed images (none: not written), together with
    those an earlier run with the same settings wrote into OUT.

    OUT is held for the run; it may not be a folder the images are read from, files in it that wsss
    did not write are not replaced, nor predictions made with other settings, unless ``cfg.force``."""
    check_output_folder(cfg.out)
    images = collect_images(cfg.inputs)
    predictor, spec = load_models(cfg)
    now = settings(cfg, spec)
    with owned_folder(cfg.out, "predict", force=cfg.force, read_from=input_folders_of(images, cfg.inputs)) as owner:
        previous = _previous_settings(owner, now, cfg.force)
        owner.begin({"settings": now, "inputs": [str(p) for p in images]}, {"checkpoint": now["checkpoint_sha256"]})
        summary = cfg.out / SUMMARY_NAME
        owner.claim([summary, *(p for image in images for p in output_paths(cfg.out, image))], "outputs")
        earlier = read_summary(summary, spec) if previous and owner.ours(summary) else []
        rows, failures = [], []
        note_saved(f"no image finished yet in {cfg.out}")
        for path in _progress(images, progress and len(images) > 1, desc="predict"):
            try:
                rows.append(predict_image(path, predictor, spec, cfg, progress))
            except WsssError as exc:
                failures.append(str(exc))
                log.debug("skipping %s: %s", path, exc)
            note_saved(f"{len(rows)} of {len(images)} images segmented into {cfg.out} (a rerun does them all again)")
        written = None
        if rows:
            written = summary
            done = {row["image"] for row in rows}
            write_summary(summary, [r for r in earlier if r["image"] not in done] + rows, spec)
    return PredictResult(rows, failures, len(images), written)


def _previous_settings(owner: Owner, now: dict, force: bool) -> bool:
    """True when OUT holds predictions of an earlier run with the same settings (their summary rows
    are kept); a run of other settings stops here unless ``force``: one summary.csv, one model."""
    previous = owner.previous_run()
    if previous is None:
        return False
    then = (previous.get("config") or {}).get("settings") or {}
    diff = differences(then, now)
    if not diff:
        return True
    if force:
        return False
    raise WsssError(f"{owner.folder} holds the predictions of another model or settings ({'; '.join(diff)}): "
                    "pass --force to write these next to them (summary.csv then lists this run only), or choose "
                    "another --out")


def read_summary(path: Path, spec: DatasetSpec) -> list[dict]:
    """The rows of an earlier ``summary.csv`` with the columns :func:`write_summary` writes, or none."""
    fields = ["image", "width", "height", *spec.classes, "background"]
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames != fields:
                return []
            return [{k: (int(v) if k in ("width", "height") else v if k == "image" else float(v))
                     for k, v in row.items()} for row in reader]
    except (OSError, ValueError):
        return []


def tiles_of(height: int, width: int, tile: int, overlap: int) -> int:
    """How many windows :func:`probability_bands` runs on an image of ``height × width``."""
    return len(tile_starts(height, min(tile, height), overlap)) * len(tile_starts(width, min(tile, width), overlap))

