"""A toy window predictor and the plain sliding-window blend it is compared with.

The blend sums whole-image (C, H, W) arrays one window at a time, with none of the row
bands, batching across rows or prefetching of ``wsss.tiling``; it only borrows the 1-D blend
ramp and window starts, which tests/cli/test_predict.py checks by hand.
"""

from __future__ import annotations

import numpy as np
import torch

from wsss import tiling as TL


def content_predictor(tiles):
    """Probabilities that depend on the pixels and on the position inside the window (like the
    padding effects of a CNN): (B, 3, h, w)."""
    x = torch.from_numpy(np.stack(tiles)).float().permute(0, 3, 1, 2) / 255.0
    h, w = x.shape[-2:]
    ramp = torch.linspace(-1.0, 1.0, h)[:, None] * torch.linspace(1.0, -1.0, w)[None, :]
    return torch.stack([x[:, 0] * 3, x[:, 1] * 2 + ramp, x[:, 2] - ramp], dim=1).softmax(dim=1)


def full_blend(image, predict, tile, overlap):
    """The straightforward sliding window over an (H, W, 3) image: (C, H, W) probabilities."""
    height, width = image.shape[:2]
    th, tw = min(tile, height), min(tile, width)
    weight = torch.from_numpy(np.outer(TL.blend_window(th, overlap), TL.blend_window(tw, overlap)))
    acc, wsum = torch.zeros(3, height, width), torch.zeros(height, width)
    for y0 in TL.tile_starts(height, th, overlap):
        for x0 in TL.tile_starts(width, tw, overlap):
            acc[:, y0 : y0 + th, x0 : x0 + tw] += predict([image[y0 : y0 + th, x0 : x0 + tw]])[0] * weight
            wsum[y0 : y0 + th, x0 : x0 + tw] += weight
    return acc / wsum
