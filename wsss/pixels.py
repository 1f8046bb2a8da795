"""Whole-image pixel work done a block of rows at a time: the white background mask, class counts and
the overlay picture. Used by ``wsss predict`` and ``wsss predict-wsi``; the blocks keep temporaries
(10 to 30 bytes a pixel) from growing with the image."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from scipy import ndimage

from wsss.data.background import WHITE_GREY, to_grey
from wsss.data.specs import DatasetSpec
from wsss.viz import legend, overlay

BLOCK_PIXELS = 2**20
"""Pixels handled at once by the whole-image pixel operations (background, overlay, counts), whose
temporaries take 10 to 30 bytes a pixel."""

_FOUR_CONNECTED = np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], dtype=bool)


def row_blocks(height: int, width: int, block_pixels: int = BLOCK_PIXELS) -> Iterator[slice]:
    """Row ranges of about ``block_pixels`` pixels covering ``height`` rows of ``width`` pixels."""
    step = max(1, block_pixels // max(width, 1))
    for top in range(0, height, step):
        yield slice(top, min(top + step, height))


def white_background(image: np.ndarray, threshold: int = WHITE_GREY, min_size: int = 50,
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
