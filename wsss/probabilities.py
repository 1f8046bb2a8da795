"""Class probabilities as they leave wsss: float16 in memory (the Python API), uint8 in files.

The blended probabilities of :mod:`wsss.tiling` are float32. What a caller gets is their float16
rounding (half the bytes, three significant digits); files hold ``round(255 · p)`` of that float16
value, so the API's and the command line's 8-bit maps are the same to the bit.

An 8-bit map rounds near-ties together: two classes at 0.4009 and 0.4012 both become 102, and the
argmax of the file would pick the lower class index where the label image (the argmax of the float32
probabilities) has the other. So the winning class is raised to one step above the best other class
where rounding tied or reversed them (it gains at most 1/255): the argmax of the 8-bit channels is
the label image's class wherever a window was segmented.
"""

from __future__ import annotations

import numpy as np
import torch


def to_float16(probs: torch.Tensor) -> np.ndarray:
    """Probabilities ``(C, ...)`` float32 (any device) → float16 numpy on the CPU."""
    return probs.to("cpu", torch.float16).numpy()


def winners(probs: torch.Tensor) -> np.ndarray:
    """The class of every pixel of ``(C, ...)`` probabilities: the first maximum, uint8 on the CPU,
    exactly as the label images are made (:func:`wsss.tiling.predict_mask`)."""
    return probs.max(dim=0).indices.to("cpu", torch.uint8).numpy()


def quantise(probs16: np.ndarray, winner: np.ndarray, covered: np.ndarray | None = None) -> np.ndarray:
    """``(C, ...)`` float16 probabilities → uint8 ``round(255 · p)``, the class ``winner`` ``(...)``
    a strict maximum of every pixel; pixels not ``covered`` (no window reached them) are all 0."""
    q = np.rint(probs16.astype(np.float32) * 255.0).clip(0, 255).astype(np.uint8)
    win = winner.astype(np.intp)[None]
    best = np.take_along_axis(q, win, axis=0)[0]
    others = q.copy()
    np.put_along_axis(others, win, 0, axis=0)
    rival = others.max(axis=0)
    raise_to = np.minimum(rival.astype(np.int16) + 1, 255).astype(np.uint8)
    lifted = np.where(rival >= best, raise_to, best)
    np.put_along_axis(q, win, lifted[None], axis=0)
    if covered is not None:
        q[:, ~covered] = 0
    return q
