"""The white-background mask used for LUAD pseudo-masks."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

# 4-connectivity: a white pixel touches its left/right/up/down neighbours only.
_FOUR_CONNECTED = np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], dtype=bool)


def to_grey(image: np.ndarray) -> np.ndarray:
    """ITU-R 601-2 luma of an ``(H, W, 3)`` uint8 image, as PIL's ``convert("L")`` computes it.

    Returns ``(H, W)`` uint8.
    """
    rgb = image.astype(np.uint32)
    # PIL rounds (R*299 + G*587 + B*114) / 1000 to nearest.
    return ((rgb[..., 0] * 299 + rgb[..., 1] * 587 + rgb[..., 2] * 114 + 500) // 1000).astype(np.uint8)


def white_mask(image: np.ndarray, threshold: int = 200, min_size: int = 50) -> np.ndarray:
    """Boolean ``(H, W)`` mask of white background in an ``(H, W, 3)`` uint8 image.

    A pixel is white when its grey value exceeds ``threshold``; 4-connected white blobs smaller
    than ``min_size`` pixels are dropped, since small bright specks inside tissue are not
    background.
    """
    white = to_grey(image) > threshold
    labels, n = ndimage.label(white, structure=_FOUR_CONNECTED)
    if n == 0:
        return white
    sizes = np.bincount(labels.ravel())
    keep = sizes >= min_size
    keep[0] = False
    return keep[labels]
