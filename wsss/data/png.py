"""Image I/O: RGB patches and palette ("P" mode) masks holding class indices."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from wsss.errors import WsssError
from wsss.runtime import atomic_path


def read_rgb(path: str | Path) -> np.ndarray:
    """Read an image as ``(H, W, 3)`` uint8 RGB. Raises :class:`WsssError` when unreadable."""
    try:
        with Image.open(path) as img:
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
