"""Sliding windows: where windows go, how their class probabilities are blended, one row of windows at
a time. Shared by ``wsss predict`` (images) and ``wsss predict-wsi`` (slides, one slide or a cohort).

An image is cut into ``tile`` × ``tile`` windows (stride ``tile - overlap``, the last window flush with
the border). Each window's class probabilities are blended with a tapered weight, so no seam shows
where windows meet. Only the rows still overlapped by the next window row are kept as
probabilities: memory grows with ``tile × width``, never with ``classes × height × width``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch

from wsss.stages.stage1 import _progress


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


def tiles_of(height: int, width: int, tile: int, overlap: int) -> int:
    """How many windows :func:`probability_bands` runs on an image of ``height × width``."""
    return len(tile_starts(height, min(tile, height), overlap)) * len(tile_starts(width, min(tile, width), overlap))
