"""Class activation maps: computing, resizing, normalising and turning them into segmentations.

Pure tensor functions; no model or file access.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

DEFAULT_CAM_THRESHOLD = 0.25
"""Classes whose sigmoid probability is at most this are dropped before the CAM argmax (reference)."""


def cams_from_features(features: Tensor, weight: Tensor) -> Tensor:
    """relu(conv(features, weight)): features (B, K, h, w), weight (C, K) or (C, K, 1, 1) → (B, C, h, w)."""
    if weight.dim() == 2:
        weight = weight[:, :, None, None]
    return F.relu(F.conv2d(features, weight))


def upsample_cams(cams: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize (align_corners=False, as the reference): (B, C, h, w) → (B, C, H, W)."""
    return F.interpolate(cams, size=tuple(size), mode="bilinear", align_corners=False)


def minmax_normalise(maps: Tensor) -> Tensor:
    """Joint min-max normalisation over all channels and pixels of each image: (B, C, H, W) → same.

    One affine map per image keeps the classes comparable. An image whose maps are constant
    (e.g. all zero) becomes all zero instead of NaN.
    """
    flat = maps.flatten(1)
    low = flat.amin(dim=1).view(-1, 1, 1, 1)
    span = (flat.amax(dim=1).view(-1, 1, 1, 1) - low)
    safe_span = torch.where(span > 0, span, torch.ones_like(span))
    return torch.where(span > 0, (maps - low) / safe_span, torch.zeros_like(maps))


TIE_RULES: tuple[str, ...] = ("ours", "reference")
"""How pixels where every kept class scores 0 are decided (``--tie-rule``): see :func:`cam_to_segmentation`."""


def check_tie_rule(rule: str) -> str:
    if rule not in TIE_RULES:
        from wsss.errors import WsssError

        raise WsssError(f"--tie-rule must be one of {', '.join(TIE_RULES)}, not {rule!r}")
    return rule


def cam_to_segmentation(cams: Tensor, probs: Tensor, threshold: float = DEFAULT_CAM_THRESHOLD,
                        tie_rule: str = "ours") -> Tensor:
    """CAMs (B, C, H, W) and class probabilities (B, C) → class-index map (B, H, W), long.

    As the reference's CAM evaluation: classes with ``prob <= threshold`` are zeroed, the maps are
    min-max normalised jointly over all classes, and each pixel takes the argmax.

    ``tie_rule="ours"`` fixes two things: a zeroed class can never win a pixel, and an image where
    no class passes the threshold (the reference crashed) is labelled entirely with its most
    probable class. Ties among kept classes go to the lowest class index.

    ``tie_rule="reference"`` is the reference's arithmetic: zeroed classes stay in the argmax with
    score 0, so where every kept class is 0 (common: CAMs are ReLU'd) the lowest class index wins,
    kept or not; with no class kept every pixel is class 0.
    """
    keep = probs > threshold
    gated = cams * keep[:, :, None, None].to(cams.dtype)
    if check_tie_rule(tie_rule) == "reference":
        return (minmax_normalise(gated) * keep[:, :, None, None].to(cams.dtype)).argmax(dim=1)
    scores = minmax_normalise(gated).masked_fill(~keep[:, :, None, None], float("-inf"))
    segmentation = scores.argmax(dim=1)
    none_kept = ~keep.any(dim=1)
    if none_kept.any():
        fallback = probs.argmax(dim=1)[:, None, None].expand_as(segmentation)
        segmentation = torch.where(none_kept[:, None, None], fallback, segmentation)
    return segmentation
