"""Sliding windows: where windows go, how their class probabilities are batched, predicted and
blended. Shared by ``wsss predict`` (images) and ``wsss predict-wsi`` (slides, one or a cohort).

An image is cut into ``tile`` × ``tile`` windows (stride ``tile - overlap``, the last window flush with
the border). Each window's class probabilities are blended with a tapered weight, so no seam shows
where windows meet. Only the rows still overlapped by the next window row are kept as
probabilities: memory grows with ``tile × width``, never with ``classes × height × width``.

Batches: consecutive window rows are taken in fixed groups of :func:`rows_per_group` rows (enough
windows for one full batch), and a group's windows are predicted in batches of ``batch_size``, so a
narrow image or a slide row with little tissue still fills a GPU batch. Groups start at multiples of
the group size from row 0: a run resumed at some row rebuilds exactly the batches of an uninterrupted
run. Reading the pixels of the next group and turning them into model inputs (resize, normalise)
happens in a background thread (:func:`prefetch`) while the model runs on the current one.
"""

from __future__ import annotations

import abc
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from wsss.runtime import progress_bar

PREFETCH_GROUPS = 2
"""Groups of window rows read and prepared ahead of the model (0: no background thread)."""


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


@dataclass(frozen=True)
class WindowGrid:
    """The windows of a ``height × width`` image: ``th × tw`` windows (the tile, clipped to the image)
    at rows ``ys`` and columns ``xs``."""

    height: int
    width: int
    tile: int
    overlap: int
    th: int = field(init=False)
    tw: int = field(init=False)
    ys: list[int] = field(init=False)
    xs: list[int] = field(init=False)

    def __post_init__(self) -> None:
        th, tw = min(self.tile, self.height), min(self.tile, self.width)
        object.__setattr__(self, "th", th)
        object.__setattr__(self, "tw", tw)
        object.__setattr__(self, "ys", tile_starts(self.height, th, self.overlap))
        object.__setattr__(self, "xs", tile_starts(self.width, tw, self.overlap))

    @property
    def count(self) -> int:
        return len(self.ys) * len(self.xs)


def tiles_of(height: int, width: int, tile: int, overlap: int) -> int:
    """How many windows cover an image of ``height × width``."""
    return WindowGrid(height, width, tile, overlap).count


def rows_per_group(batch_size: int, windows_per_row: int) -> int:
    """Window rows batched together: the fewest whose windows fill one batch."""
    return max(1, -(-batch_size // max(windows_per_row, 1)))


def group_start(row: int, group: int) -> int:
    """First row of the group holding window row ``row`` (groups start at multiples of ``group``)."""
    return row // group * group


@dataclass
class WindowRow:
    """One row of windows: its pixels ``band`` ``(th, width, 3)`` uint8 and the columns of the windows
    to segment (all of them, or only those with tissue)."""

    index: int
    top: int
    band: np.ndarray
    starts: list[int]


@dataclass
class RowGroup:
    """Consecutive window rows and the model inputs of all their windows, in row order."""

    rows: list[WindowRow]
    inputs: Any = None  # what the predictor's ``prepare`` made of the windows; None without windows

    @property
    def windows(self) -> int:
        return sum(len(row.starts) for row in self.rows)


# --------------------------------------------------------------------------- predictors


class Predictor(abc.ABC):
    """Class probabilities of windows in two steps: ``prepare`` (CPU work on the pixels: resize,
    normalise; runs in the prefetch thread) and ``forward`` (the model, on a slice of the prepared
    windows). ``predictor(tiles)`` does both."""

    @abc.abstractmethod
    def prepare(self, tiles: Sequence[np.ndarray]) -> Any:
        """The windows made ready for ``forward`` (resized, normalised)."""

    @abc.abstractmethod
    def forward(self, inputs: Any, start: int, stop: int) -> torch.Tensor:
        """Class probabilities of the prepared windows ``start:stop``."""

    def __call__(self, tiles: Sequence[np.ndarray]) -> torch.Tensor:
        """Windows of one size ``(h, w, 3)`` uint8 → probabilities ``(B, C, h, w)`` float32."""
        return self.forward(self.prepare(tiles), 0, len(tiles))


class CallablePredictor(Predictor):
    """A plain function of a list of windows, as a :class:`Predictor` (no preparation step)."""

    def __init__(self, predict: Callable[[Sequence[np.ndarray]], torch.Tensor]) -> None:
        self.predict = predict

    def prepare(self, tiles: Sequence[np.ndarray]) -> list[np.ndarray]:
        return list(tiles)

    def forward(self, inputs: list[np.ndarray], start: int, stop: int) -> torch.Tensor:
        return self.predict(inputs[start:stop])


def as_predictor(predict) -> Predictor:
    return predict if isinstance(predict, Predictor) else CallablePredictor(predict)


# --------------------------------------------------------------------------- the pipeline


def row_groups(make_row: Callable[[int], WindowRow], rows: range, group: int, tw: int,
               prepare: Callable[[Sequence[np.ndarray]], Any]) -> Iterator[RowGroup]:
    """Groups of ``group`` window rows from ``rows.start`` (a group start) on, their windows prepared."""
    for first in range(rows.start, rows.stop, group):
        members = [make_row(r) for r in range(first, min(first + group, rows.stop))]
        tiles = [row.band[:, x0 : x0 + tw] for row in members for x0 in row.starts]
        yield RowGroup(members, prepare(tiles) if tiles else None)


def window_probs(predictor: Predictor, group: RowGroup, batch_size: int) -> Iterator[torch.Tensor]:
    """The group's windows' probabilities ``(C, h, w)`` one by one, a batch predicted when needed."""
    n = group.windows
    for start in range(0, n, batch_size):
        yield from predictor.forward(group.inputs, start, min(start + batch_size, n))


def blend_groups(groups: Iterable[RowGroup], predictor: Predictor, grid: WindowGrid,
                 batch_size: int) -> Iterator[tuple[WindowRow, tuple[torch.Tensor, torch.Tensor] | None]]:
    """``(row, blended)`` for every window row of ``groups`` in order, as soon as it is final:
    ``blended`` is :meth:`RowBlender.pop`'s ``(probs (C, n, W), weights (n, W))`` for the row's
    :func:`final_rows`, None while no window has been added at all."""
    blender = RowBlender(grid.width, grid.th, grid.tw, grid.overlap)
    for group in groups:
        probs = window_probs(predictor, group, batch_size)
        for row in group.rows:
            for x0 in row.starts:
                blender.add(x0, next(probs))
            yield row, blender.pop(final_rows(grid.ys, row.index, grid.th))


class _Failed:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


_DONE = object()


def prefetch(items: Iterator, depth: int = PREFETCH_GROUPS) -> Iterator:
    """``items`` produced by a background thread, at most ``depth`` ahead of the consumer (0: in
    this thread). An exception in the producer is raised in the consumer; when the consumer stops
    early (an error, Ctrl-C), the producer is stopped and joined before this generator returns."""
    if depth <= 0:
        yield from items
        return
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(_DONE)
        except BaseException as exc:  # handed to the consumer, which raises it
            put(_Failed(exc))

    thread = threading.Thread(target=produce, name="wsss-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is _DONE:
                return
            if isinstance(item, _Failed):
                raise item.exc
            yield item
    finally:
        stop.set()
        thread.join()


def image_row(image: np.ndarray, grid: WindowGrid) -> Callable[[int], WindowRow]:
    """Window row ``r`` of an in-memory image: a view of its pixels, every window segmented."""
    return lambda r: WindowRow(r, grid.ys[r], image[grid.ys[r] : grid.ys[r] + grid.th], grid.xs)


def probability_bands(
    image: np.ndarray,
    predict: Callable[[Sequence[np.ndarray]], torch.Tensor] | Predictor,
    tile: int,
    overlap: int,
    batch_size: int,
    progress: bool = False,
    group: int | None = None,
    depth: int = PREFETCH_GROUPS,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Blended class probabilities of an ``(H, W, 3)`` image, top to bottom.

    Yields ``(top, probs)``: rows ``top .. top + n`` are final, ``probs`` ``(C, n, W)`` float32 (on
    the predictor's device). ``group`` window rows are batched together (default
    :func:`rows_per_group`; 1 batches within a row only) and ``depth`` groups prepared ahead.
    """
    grid = WindowGrid(image.shape[0], image.shape[1], tile, overlap)
    predictor = as_predictor(predict)
    group = group or rows_per_group(batch_size, len(grid.xs))
    groups = prefetch(row_groups(image_row(image, grid), range(len(grid.ys)), group, grid.tw, predictor.prepare), depth)
    with progress_bar(None, progress, total=grid.count, desc="tiles", leave=False) as bar:
        for row, blended in blend_groups(groups, predictor, grid, batch_size):
            bar.update(len(row.starts))
            yield row.top, blended[0]


def predict_mask(
    image: np.ndarray,
    predict: Callable[[Sequence[np.ndarray]], torch.Tensor] | Predictor,
    tile: int,
    overlap: int,
    batch_size: int,
    progress: bool = False,
    group: int | None = None,
    depth: int = PREFETCH_GROUPS,
) -> np.ndarray:
    """Class indices ``(H, W)`` uint8: argmax of the blended probabilities of :func:`probability_bands`."""
    mask = np.empty(image.shape[:2], dtype=np.uint8)
    for top, probs in probability_bands(image, predict, tile, overlap, batch_size, progress, group, depth):
        # max(dim=0) rather than argmax(dim=0): same first-maximum indices, several times faster on CPU.
        mask[top : top + probs.shape[1]] = probs.max(dim=0).indices.to("cpu", torch.uint8).numpy()
    return mask
