"""Image I/O: RGB patches and palette ("P" mode) masks holding class indices."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from wsss.errors import WsssError
from wsss.runtime import atomic_path


# Single-channel modes, with or without alpha; every "I;16…" variant too.
_GREY_MODES = ("1", "L", "LA", "La", "I", "F")
_ALPHA_MODES = ("RGBA", "RGBa", "PA")


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
        with Image.open(path) as img:
            check_rgb_mode(img, path)
    except WsssError as exc:
        return str(exc)
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as exc:
        return f"cannot read image {path}: {exc}"
    return None


def read_rgb(path: str | Path) -> np.ndarray:
    """Read an image as ``(H, W, 3)`` uint8 RGB. Raises :class:`WsssError` when unreadable or not
    an RGB image (:func:`check_rgb_mode`)."""
    try:
        with Image.open(path) as img:
            check_rgb_mode(img, path)
            img.load()
            if img.mode != "RGB":
                img = img.convert("RGB")
            return np.asarray(img, dtype=np.uint8).copy()
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as exc:
        raise WsssError(f"cannot read image {path}: {exc}") from None


def read_mask(path: str | Path) -> np.ndarray:
    """Read a class-index mask as ``(H, W)`` uint8.

    Palette and greyscale PNGs hold the indices directly; an RGB mask is refused because its
    colours would have to be mapped back to classes.
    """
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode not in ("P", "L"):
                raise WsssError(f"mask {path} is mode {img.mode}, expected a palette ('P') PNG")
            return np.asarray(img, dtype=np.uint8).copy()
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as exc:
        raise WsssError(f"cannot read mask {path}: {exc}") from None


def image_size(path: str | Path) -> tuple[int, int]:
    """``(width, height)`` from the header alone; raises :class:`WsssError` when unreadable."""
    try:
        with Image.open(path) as img:
            return img.size
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as exc:
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
