"""Image I/O: RGB patches and palette ("P" mode) masks holding class indices."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from wsss.data.specs import DatasetSpec
from wsss.errors import WsssError
from wsss.runtime import atomic_path


# Single-channel modes, with or without alpha; every "I;16…" variant too.
_GREY_MODES = ("1", "L", "LA", "La", "I", "F")
_ALPHA_MODES = ("RGBA", "RGBa", "PA")


# What PIL raises for a file it cannot read as an image; an image of more than PIL's
# MAX_IMAGE_PIXELS (a decompression bomb, or just a huge export) is one of them.
READ_ERRORS = (OSError, UnidentifiedImageError, SyntaxError, ValueError, Image.DecompressionBombError)


@contextlib.contextmanager
def open_image(path: str | Path) -> Iterator[Image.Image]:
    """``Image.open(path)`` without PIL's DecompressionBombWarning (printed to stderr above half of
    PIL's pixel limit): an image that large is read, one above the limit is a read error. Only a
    regular file is opened: a folder, a FIFO or a device is a read error (a FIFO would block)."""
    if Path(path).exists() and not Path(path).is_file():
        raise OSError("not a regular file")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(path) as img:
            yield img


def check_rgb_mode(img: Image.Image, path: str | Path) -> None:
    """Refuse what would not be an H&E colour image once converted to 8-bit RGB: single-channel
    (greyscale, 16-bit: PIL's conversion clips 16-bit values, a white patch), transparent images.
    Palette, CMYK and YCbCr images convert faithfully and pass. Reads the header only.

    One rule for every command that reads images (training, evaluation, predict, check-data)."""
    mode = img.mode
    if mode in _GREY_MODES or mode.startswith("I;"):
        raise WsssError(f"{path} is grayscale (mode {mode}); an RGB image is needed")
    if mode in _ALPHA_MODES:
        raise WsssError(f"{path} has an alpha channel (mode {mode}); an RGB image is needed (drop the alpha first)")
    if mode == "P" and "transparency" in img.info:
        raise WsssError(f"{path} has transparency; an RGB image is needed")


def image_problem(path: str | Path) -> str | None:
    """What is wrong with an image file as an RGB patch, from its header alone; None when nothing."""
    try:
        with open_image(path) as img:
            check_rgb_mode(img, path)
    except WsssError as exc:
        return str(exc)
    except READ_ERRORS as exc:
        return f"cannot read image {path}: {exc}"
    return None


def read_rgb(path: str | Path) -> np.ndarray:
    """Read an image as ``(H, W, 3)`` uint8 RGB. Raises :class:`WsssError` when unreadable or not
    an RGB image (:func:`check_rgb_mode`)."""
    try:
        with open_image(path) as img:
            check_rgb_mode(img, path)
            img.load()
            if img.mode != "RGB":
                img = img.convert("RGB")
            return np.asarray(img, dtype=np.uint8).copy()
    except READ_ERRORS as exc:
        raise WsssError(f"cannot read image {path}: {exc}") from None


def read_mask(path: str | Path) -> np.ndarray:
    """Read a class-index mask as ``(H, W)`` uint8.

    Palette and greyscale PNGs hold the indices directly; an RGB mask is refused because its
    colours would have to be mapped back to classes.
    """
    try:
        with open_image(path) as img:
            img.load()
            if img.mode not in ("P", "L"):
                raise WsssError(f"mask {path} is mode {img.mode}, expected a palette ('P') PNG")
            return np.asarray(img, dtype=np.uint8).copy()
    except READ_ERRORS as exc:
        raise WsssError(f"cannot read mask {path}: {exc}") from None


def read_class_mask(path: str | Path, spec: DatasetSpec) -> np.ndarray:
    """A ground-truth mask of a dataset as ``(H, W)`` uint8 values ``0..C-1`` and the background index.

    ``spec.mask_encoding`` ``index``: a palette or greyscale PNG of the values; ``rgb``: any image
    whose colours are the spec's class and background colours. A value (or colour) that is neither a
    class nor the background raises :class:`WsssError` naming the file.
    """
    if spec.mask_encoding == "rgb":
        return _rgb_to_classes(path, read_rgb(path), spec)
    mask = read_mask(path)
    check_mask_values(mask, spec, path)
    return mask


def check_mask_values(mask: np.ndarray, spec: DatasetSpec, path: str | Path) -> None:
    """Raise :class:`WsssError` naming ``path`` when ``mask`` holds a value that is neither a class nor
    the background: such pixels would otherwise be silently dropped from the metrics or the loss."""
    allowed = np.zeros(256, dtype=bool)
    allowed[sorted(spec.mask_values())] = True
    present = np.bincount(np.asarray(mask, dtype=np.uint8).ravel(), minlength=256) > 0
    bad = np.flatnonzero(present & ~allowed)
    if bad.size:
        classes = f"0-{spec.num_classes - 1}" if spec.num_classes > 1 else "0"
        raise WsssError(f"mask {path} holds value{'s' if bad.size > 1 else ''} {', '.join(map(str, bad[:8]))}, "
                        f"neither a class ({classes}) nor the background ({spec.background_index}) of {spec.name}")


def _rgb_to_classes(path: str | Path, rgb: np.ndarray, spec: DatasetSpec) -> np.ndarray:
    """Colours ``(H, W, 3)`` → class values ``(H, W)`` through the spec's colours."""
    key = (rgb[..., 0].astype(np.int32) << 16) | (rgb[..., 1].astype(np.int32) << 8) | rgb[..., 2]
    colours = [*spec.colors, spec.background_color]
    values = [*range(spec.num_classes), spec.background_index]
    codes = np.array([(r << 16) | (g << 8) | b for r, g, b in colours], dtype=np.int32)
    order = np.argsort(codes)
    pos = np.clip(np.searchsorted(codes[order], key), 0, len(codes) - 1)
    known = codes[order][pos] == key
    if not known.all():
        r, g, b = rgb[~known][0]
        raise WsssError(f"mask {path} holds colour [{r}, {g}, {b}], neither a class colour nor the background "
                        f"colour of {spec.name}")
    return np.asarray(values, dtype=np.uint8)[order][pos]


def write_class_mask(path: str | Path, mask: np.ndarray, spec: DatasetSpec) -> None:
    """Write a ground-truth mask in the spec's encoding: a palette PNG of the values, or (``rgb``) an
    RGB PNG of their colours; atomically."""
    if spec.mask_encoding == "rgb":
        write_rgb(path, np.asarray(spec.flat_palette(), dtype=np.uint8).reshape(256, 3)[mask])
    else:
        write_mask(path, mask, spec.flat_palette())


def image_size(path: str | Path) -> tuple[int, int]:
    """``(width, height)`` from the header alone; raises :class:`WsssError` when unreadable."""
    try:
        with open_image(path) as img:
            return img.size
    except READ_ERRORS as exc:
        raise WsssError(f"cannot read image {path}: {exc}") from None


def write_mask(path: str | Path, mask: np.ndarray, flat_palette: list[int]) -> None:
    """Write ``(H, W)`` class indices as a palette PNG, atomically (tmp file + rename)."""
    if mask.ndim != 2:
        raise ValueError(f"mask must be (H, W), got shape {mask.shape}")
    img = Image.fromarray(np.ascontiguousarray(mask, dtype=np.uint8), mode="P")
    img.putpalette(flat_palette)
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")


def write_rgb(path: str | Path, image: np.ndarray) -> None:
    """Write an ``(H, W, 3)`` uint8 image as PNG, atomically."""
    img = Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8), mode="RGB")
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
