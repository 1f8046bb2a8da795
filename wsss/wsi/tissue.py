"""Which windows hold tissue: Otsu's threshold on the saturation of a slide thumbnail.

Glass is white or light grey and the unscanned border black: both have low saturation, while
H&E-stained tissue (pink eosin, purple haematoxylin) is saturated. Otsu's method picks the
saturation that best separates the two populations of the whole-slide thumbnail, where glass is
always present; the threshold is then applied to the pixels of each window at the processed
resolution, and a window whose tissue fraction is below ``--min-tissue`` is not segmented.
"""

from __future__ import annotations

import numpy as np

MIN_SATURATION = 20
"""Lowest threshold used (of 255): a thumbnail with no tissue at all would otherwise have its
glass noise split in two by Otsu's method."""


def saturation(image: np.ndarray) -> np.ndarray:
    """HSV saturation ``(H, W)`` uint8 of an ``(H, W, 3)`` uint8 image: ``255 · (max - min) / max``
    over the channels, 0 for black."""
    hi = image.max(axis=-1).astype(np.uint16)
    lo = image.min(axis=-1).astype(np.uint16)
    return ((hi - lo) * 255 // np.maximum(hi, 1)).astype(np.uint8)


def otsu_threshold(values: np.ndarray) -> int:
    """Otsu's threshold of uint8 ``values``: the ``t`` maximising the between-class variance of
    ``values <= t`` and ``values > t`` (the smallest such ``t``); 0 when all values are equal."""
    hist = np.bincount(np.asarray(values, dtype=np.uint8).ravel(), minlength=256).astype(np.float64)
    levels = np.arange(256, dtype=np.float64)
    w0 = np.cumsum(hist)  # pixels at or below t
    w1 = w0[-1] - w0
    s0 = np.cumsum(hist * levels)
    with np.errstate(divide="ignore", invalid="ignore"):
        between = w0 * w1 * (s0 / w0 - (s0[-1] - s0) / w1) ** 2
    between = np.nan_to_num(between, nan=0.0, posinf=0.0)
    return int(np.argmax(between))


def tissue_threshold(thumbnail: np.ndarray, floor: int = MIN_SATURATION) -> int:
    """Saturation above which a pixel is tissue: Otsu's threshold of the thumbnail, at least ``floor``."""
    return max(otsu_threshold(saturation(thumbnail)), floor)


def tissue_fractions(tissue: np.ndarray, starts: list[int], width: int) -> list[float]:
    """Fraction of tissue pixels in each window ``tissue[:, x0 : x0 + width]`` of a boolean band."""
    return [float(tissue[:, x0 : x0 + width].mean()) for x0 in starts]


def image_tissue(image: np.ndarray, side: int = 1024, block_rows: int = 1024) -> tuple[np.ndarray, int]:
    """Tissue pixels ``(H, W)`` bool of a whole ``(H, W, 3)`` uint8 image and the threshold used: as
    for a slide, Otsu's threshold of a thumbnail's saturation (every n-th pixel, at most ``side`` a
    side), applied to every pixel, ``block_rows`` rows at a time."""
    step = max(1, -(-max(image.shape[:2]) // side))
    threshold = tissue_threshold(image[::step, ::step])
    tissue = np.empty(image.shape[:2], dtype=bool)
    for top in range(0, image.shape[0], block_rows):
        tissue[top : top + block_rows] = saturation(image[top : top + block_rows]) > threshold
    return tissue, threshold
