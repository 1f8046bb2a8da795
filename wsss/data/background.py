"""The white-background mask used for LUAD pseudo-masks.

Two rules (``--white-rule``): ``grey`` is the reference's (grey value > 200, 4-connected blobs under
50 px dropped); ``glass`` also asks for a nearly colourless pixel (max − min of R, G, B at most
:data:`GLASS_MAX_CHROMA`), because glass is white or grey while pale tissue (necrosis, loose stroma,
oedema) stays pink or purple however bright it gets, and the grey rule calls it background.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

# 4-connectivity: a white pixel touches its left/right/up/down neighbours only.
_FOUR_CONNECTED = np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], dtype=bool)


def to_grey(image: np.ndarray) -> np.ndarray:
    """Grey value of an ``(H, W, 3)`` uint8 RGB image as the reference computes it.

    WSSS-Tissue's ``gen_bg_mask`` uses ``cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)``: ITU-R 601 luma in
    14-bit fixed point, ``(4899 R + 9617 G + 1868 B + 2^13) >> 14``. Other roundings of the same
    weights (PIL's ``convert("L")``, or ``/ 1000``) put a few hundred RGB triples on the other side
    of the 200 threshold. Returns ``(H, W)`` uint8.
    """
    rgb = image.astype(np.uint32)
    return ((rgb[..., 0] * 4899 + rgb[..., 1] * 9617 + rgb[..., 2] * 1868 + 8192) >> 14).astype(np.uint8)


WHITE_RULES = ("grey", "glass")
WHITE_GREY = 200
"""A pixel brighter than this grey value is white (the reference's threshold)."""
GLASS_MAX_CHROMA = 16
"""Largest max − min over R, G, B (of 255) of a glass pixel under the ``glass`` rule."""


def chroma(image: np.ndarray) -> np.ndarray:
    """``max(R, G, B) − min(R, G, B)`` of an ``(H, W, 3)`` uint8 image, ``(H, W)`` uint8."""
    return (image.max(axis=-1).astype(np.int16) - image.min(axis=-1)).astype(np.uint8)


def glass_pixels(image: np.ndarray, threshold: int = WHITE_GREY) -> np.ndarray:
    """``(H, W)`` bool: bright (grey above ``threshold``) and nearly colourless pixels, each on its own."""
    return (to_grey(image) > threshold) & (chroma(image) <= GLASS_MAX_CHROMA)


def white_mask(image: np.ndarray, threshold: int = WHITE_GREY, min_size: int = 50, rule: str = "grey") -> np.ndarray:
    """Boolean ``(H, W)`` mask of white background in an ``(H, W, 3)`` uint8 image.

    A pixel is white when its grey value exceeds ``threshold`` (and, for ``rule="glass"``, its
    chroma is at most :data:`GLASS_MAX_CHROMA`); 4-connected white blobs smaller than ``min_size``
    pixels are dropped, since small bright specks inside tissue are not background.
    """
    if rule not in WHITE_RULES:
        raise ValueError(f"unknown white rule {rule!r}")
    white = glass_pixels(image, threshold) if rule == "glass" else to_grey(image) > threshold
    labels, n = ndimage.label(white, structure=_FOUR_CONNECTED)
    if n == 0:
        return white
    sizes = np.bincount(labels.ravel())
    keep = sizes >= min_size
    keep[0] = False
    return keep[labels]
