"""Progressive dropout attention (PDA, Han et al. 2022) and its γ schedule.

Each class's CAM has its strongest responses (above ``γ · max``) dropped, so the classifier is pushed
to find evidence outside the most discriminative region; γ shrinks over the epochs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from wsss.cam.cam import cams_from_features
from wsss.errors import WsssError


PDA_NORMS = ("none", "max")


def pda_attention(features: Tensor, weight: Tensor, gamma: float, norm: str = "none") -> Tensor:
    """Attention map of PDA: features (B, K, h, w), classifier weight (C, K[, 1, 1]) → (B, 1, h, w).

    ``cams = relu(conv(features, weight))``; per image and class, values strictly above
    ``gamma · max(cam_c)`` are set to 0; the attention is the mean of the dropped maps over the C
    classes (the reference divides by a hard-coded 4, which equals C for both datasets). The
    caller multiplies: ``features · attention``. Gradients flow through the attention, as in the
    reference.

    A class whose CAM is zero everywhere (max 0) has nothing above its threshold and contributes
    zeros, so no division or NaN arises. With ``gamma >= 1`` nothing is dropped.

    ``norm="none"`` is the reference: the attention carries the CAMs' magnitude, so it rescales the
    logits too. That is harmless from ImageNet weights, but from a random initialisation we saw it
    blow the loss up and kill every ReLU (loss stuck at log 2) within an epoch of PDA switching on.
    ``norm="max"`` divides each image's attention by its spatial maximum, keeping PDA's spatial
    re-weighting (in [0, 1]) without the change of scale.
    """
    if norm not in PDA_NORMS:
        raise WsssError(f"unknown PDA normalisation {norm!r}; use {' or '.join(PDA_NORMS)}")
    cams = cams_from_features(features, weight)
    peak = cams.amax(dim=(2, 3), keepdim=True)
    kept = cams.masked_fill(cams > gamma * peak, 0.0)
    attention = kept.mean(dim=1, keepdim=True)
    if norm == "max":
        top = attention.amax(dim=(2, 3), keepdim=True)
        attention = attention / torch.where(top > 0, top, torch.ones_like(top))
    return attention


@dataclass(frozen=True)
class PdaSchedule:
    """γ per epoch: PDA is off before ``first_epoch`` (0-based), then uses the decayed γ.

    γ starts at ``start``; after every epoch, while γ > ``floor``, γ ← ``decay`` · γ. Decay counts
    from epoch 0, not from ``first_epoch``: WSSS-Tissue's ``1_train_stage1.py`` runs
    ``if model.gama > 0.65: model.gama = model.gama*0.98`` at the end of every epoch, including the
    epochs 0-2 in which PDA (``ep > 2``) is still disabled. So epoch 3 uses 0.98³ ≈ 0.9412. The
    check happens before multiplying, so γ may end one step below ``floor`` (0.98²² ≈ 0.641).
    The paper's text says 0.985; the reference code uses 0.98, our default.
    """

    start: float = 1.0
    decay: float = 0.98
    floor: float = 0.65
    first_epoch: int = 3

    def __post_init__(self) -> None:
        if not 0 < self.decay <= 1:
            raise WsssError(f"PDA decay must be in (0, 1], got {self.decay}")
        if self.start <= 0 or self.floor < 0:
            raise WsssError(
                f"PDA start must be > 0 and floor >= 0, got start={self.start}, floor={self.floor}"
            )
        if self.first_epoch < 0:
            raise WsssError(f"PDA first epoch must be >= 0, got {self.first_epoch}")

    def gamma_at(self, epoch: int) -> float | None:
        """γ used during 0-based ``epoch``, or None when PDA is not applied yet."""
        if epoch < self.first_epoch:
            return None
        return self.decayed(epoch)

    def decayed(self, epoch: int) -> float:
        """γ after ``epoch`` end-of-epoch updates, whether or not PDA is active."""
        gamma = self.start
        for _ in range(epoch):
            if gamma <= self.floor:
                break
            gamma *= self.decay
        return gamma
