"""The sliding-window pipeline: row groups batched across rows, the prefetch thread, and that any
grouping blends to the same probabilities as the whole-image sum."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from tiling_oracle import content_predictor, full_blend
from wsss import tiling as TL


class _Recorder:
    """A predictor that records the windows (their top-left pixel values) of every batch."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []

    def __call__(self, tiles):
        self.batches.append([int(t[0, 0, 0]) + 256 * int(t[0, 0, 1]) for t in tiles])
        return content_predictor(tiles)


def _numbered_image(grid: TL.WindowGrid) -> np.ndarray:
    """An image whose window ``k`` (row order) has the number ``k`` in its top-left pixel (R + 256 G)."""
    image = np.zeros((grid.height, grid.width, 3), dtype=np.uint8)
    k = 0
    for y0 in grid.ys:
        for x0 in grid.xs:
            image[y0, x0, :2] = (k % 256, k // 256)
            k += 1
    return image


def test_rows_per_group_and_group_start():
    assert TL.rows_per_group(8, 3) == 3  # 9 windows fill a batch of 8
    assert TL.rows_per_group(8, 8) == 1 and TL.rows_per_group(8, 20) == 1
    assert TL.rows_per_group(64, 20) == 4 and TL.rows_per_group(5, 0) == 5
    assert [TL.group_start(r, 3) for r in range(7)] == [0, 0, 0, 3, 3, 3, 6]


def test_batches_span_rows_in_fixed_groups():
    # 150 × 130 px, 40-px windows overlapping by 8: rows at 0, 32, 64, 96, 110; columns at 0, 32, 64, 90
    grid = TL.WindowGrid(150, 130, 40, 8)
    assert (grid.ys, grid.xs, grid.count) == ([0, 32, 64, 96, 110], [0, 32, 64, 90], 20)
    image = _numbered_image(grid)
    recorder = _Recorder()
    list(TL.probability_bands(image, recorder, 40, 8, batch_size=6))
    # 4 windows a row → groups of 2 rows (8 windows): batches of 6 and 2; the last group is row 4 alone
    assert recorder.batches == [[0, 1, 2, 3, 4, 5], [6, 7], [8, 9, 10, 11, 12, 13], [14, 15], [16, 17, 18, 19]]
    recorder = _Recorder()
    list(TL.probability_bands(image, recorder, 40, 8, batch_size=6, group=1, depth=0))  # within rows only
    assert recorder.batches == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15], [16, 17, 18, 19]]


@pytest.mark.parametrize("group,depth,batch", [(1, 0, 3), (2, 1, 3), (3, 2, 5), (None, 2, 16)])
def test_any_grouping_and_prefetch_blends_like_the_whole_image(group, depth, batch):
    image = np.random.default_rng(2).integers(0, 256, (150, 130, 3), dtype=np.uint8)
    bands = list(TL.probability_bands(image, content_predictor, 40, 16, batch, group=group, depth=depth))
    probs = torch.cat([p for _, p in bands], dim=1)
    assert torch.allclose(probs, full_blend(image, content_predictor, 40, 16), atol=1e-6)


def _prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "wsss-prefetch"]


def test_prefetch_keeps_order_raises_the_producers_error_and_stops_its_thread():
    assert list(TL.prefetch(iter(range(10)), depth=2)) == list(range(10))
    assert list(TL.prefetch(iter(range(3)), depth=0)) == [0, 1, 2]

    def failing():
        yield 1
        raise ValueError("unreadable tile")

    with pytest.raises(ValueError, match="unreadable tile"):
        list(TL.prefetch(failing(), depth=2))
    assert not _prefetch_threads()

    produced = []

    def endless():
        k = 0
        while True:
            produced.append(k)
            yield k
            k += 1

    items = TL.prefetch(endless(), depth=2)
    assert [next(items) for _ in range(3)] == [0, 1, 2]
    items.close()  # the consumer stops early (an error, Ctrl-C): the producer is stopped and joined
    assert not _prefetch_threads()
    assert len(produced) <= 3 + 2 + 1  # at most depth items ahead, plus the one being put
