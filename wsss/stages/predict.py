"""``wsss predict``: a stage-2 segmenter (optionally gated by the stage-1 classifier) on the user's own
images, of any size.

Outputs, for every input image ``<name>.<ext>``::

    OUT/<name>_mask.png      palette PNG of class indices (the spec's palette; its background index = white
                             background, for specs whose white is background)
    OUT/<name>_overlay.png   the image blended with the class colours, a legend underneath
    OUT/summary.csv          one row per processed image: size and area fraction of every class

Each image is segmented by the sliding window of :mod:`wsss.tiling` with the tile predictor of
:mod:`wsss.inference`; each window is resized by ``image_size / tile`` when the checkpoint records
the input size it was trained at, so tissue appears at the scale the model learned.
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from wsss.data.png import write_mask, write_rgb
from wsss.data.specs import DatasetSpec
from wsss.errors import WsssError
from wsss.gate import check_gate_options
from wsss.inference import TilePredictor, check_tta, check_window_options, load_models
from wsss.pixels import class_fractions, overlay_with_legend, row_blocks, white_background
from wsss.runtime import atomic_path
from wsss.stages.stage1 import _progress
from wsss.tiling import predict_mask

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
OUTPUT_SUFFIXES = ("_mask.png", "_overlay.png")
SUMMARY_NAME = "summary.csv"

MAX_PIXELS = 1_000_000_000
"""Largest image read (3 GB as RGB); PIL's own decompression-bomb limit (89 Mpx) is lifted up to this."""

# Single-channel modes, with or without alpha; every "I;16…" variant too.
_GREY_MODES = ("1", "L", "LA", "La", "I", "F")
_ALPHA_MODES = ("RGBA", "RGBa", "PA")


@dataclass(frozen=True)
class PredictConfig:
    """``wsss predict``: which images, which models, where to write, how to tile and run."""

    inputs: tuple[Path, ...]
    checkpoint: Path
    out: Path
    dataset: str | None = None  # None: the spec recorded in the checkpoint
    gate: bool = False
    stage1_checkpoint: Path | None = None
    gate_threshold: float = 0.1
    gate_mode: str = "mask"
    tile: int = 224
    overlap: int = 32
    batch_size: int = 8
    device: str = "auto"
    amp: bool = False
    tta: str = "none"

    def __post_init__(self) -> None:
        check_window_options(self.tile, self.overlap, self.batch_size, self.gate, self.stage1_checkpoint)
        check_gate_options(self.gate_mode, self.gate_threshold)
        check_tta(self.tta)


@dataclass
class PredictResult:
    """What a run did: one summary row per processed image, one message per image that failed."""

    rows: list[dict]
    failures: list[str]
    total: int
    summary: Path | None


# --------------------------------------------------------------------------- inputs


def collect_images(inputs: Sequence[Path], out: Path | None = None) -> list[Path]:
    """Image files named directly or found (not recursively) in folders, in order, without repeats.

    A folder contributes its ``.png/.jpg/.jpeg/.tif/.tiff`` files; when it is the output folder, not
    the ``_mask.png`` / ``_overlay.png`` files an earlier run wrote. A path that does not exist or a
    folder holding no image is a user error (nothing is processed).
    """
    images: list[Path] = []
    seen: set[Path] = set()
    for path in map(Path, inputs):
        if path.is_dir():
            found = _folder_images(path, out)
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


def _folder_images(folder: Path, out: Path | None) -> list[Path]:
    is_out = out is not None and Path(out).resolve() == folder.resolve()
    return sorted(
        p for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES
        and not (is_out and p.name.endswith(OUTPUT_SUFFIXES))
    )


def _check_output_names(images: Sequence[Path]) -> None:
    """Two inputs with the same name stem would write the same output files."""
    by_stem: dict[str, Path] = {}
    for image in images:
        other = by_stem.setdefault(image.stem, image)
        if other != image:
            raise WsssError(f"{other} and {image} would both be written as {image.stem}_mask.png; rename one")


def check_mode(mode: str, path: Path) -> None:
    """Refuse single-channel and transparent images: the models were trained on RGB H&E."""
    if mode in _GREY_MODES or mode.startswith("I;"):
        raise WsssError(f"{path} is grayscale (mode {mode}); an RGB image is needed")
    if mode in _ALPHA_MODES:
        raise WsssError(f"{path} has an alpha channel (mode {mode}); an RGB image is needed (drop the alpha first)")


def read_image(path: Path, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """An input image as ``(H, W, 3)`` uint8; raises :class:`WsssError` when it cannot be
    read, is not RGB (palette and CMYK images are converted) or has more than ``max_pixels``."""
    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # our own limit below, with a clearer message
    try:
        with Image.open(path) as img:
            check_mode(img.mode, path)
            if img.width * img.height > max_pixels:
                raise WsssError(f"{path} is {img.width}×{img.height} px; at most {max_pixels:,} pixels are read")
            if img.mode == "P" and "transparency" in img.info:
                raise WsssError(f"{path} has transparency; an RGB image is needed")
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


# --------------------------------------------------------------------------- one image, the run


def output_paths(out: Path, image: Path) -> tuple[Path, Path]:
    """``(OUT/<name>_mask.png, OUT/<name>_overlay.png)``."""
    return out / f"{image.stem}_mask.png", out / f"{image.stem}_overlay.png"


def predict_image(path: Path, predictor: TilePredictor, spec: DatasetSpec, cfg: PredictConfig,
                  progress: bool = False) -> dict:
    """Segment one image and write its mask and overlay; returns its summary row."""
    image = read_image(path)
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


def run(cfg: PredictConfig, progress: bool = True) -> PredictResult:
    """Predict every input image; an image that cannot be read is listed in ``failures`` and the
    others still go on. ``summary.csv`` lists the processed images (none: not written)."""
    if cfg.out.exists() and not cfg.out.is_dir():
        raise WsssError(f"--out {cfg.out} is a file; a folder is needed")
    images = collect_images(cfg.inputs, cfg.out)
    predictor, spec = load_models(cfg)
    rows, failures = [], []
    for path in _progress(images, progress and len(images) > 1, desc="predict"):
        try:
            rows.append(predict_image(path, predictor, spec, cfg, progress))
        except WsssError as exc:
            failures.append(str(exc))
            log.debug("skipping %s: %s", path, exc)
    summary = None
    if rows:
        summary = cfg.out / SUMMARY_NAME
        write_summary(summary, rows, spec)
    return PredictResult(rows, failures, len(images), summary)
