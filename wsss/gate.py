"""The classification gate: stage-1 class probabilities decide which classes a segmenter may predict.

Used by ``train-stage2``'s test, ``evaluate``, ``predict`` and ``predict-wsi``. Pure tensor
functions; no model or file access.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from wsss.errors import WsssError

log = logging.getLogger(__name__)

if TYPE_CHECKING:  # the CLI reads the constants below at import, before it needs torch
    from torch import Tensor

GATE_MODES: tuple[str, ...] = ("mask", "reference")
"""``mask``: gated classes get logit −∞ (ours: the cpu and best presets, predict, predict-wsi).
``reference``: logits × (p > threshold), exactly as WSSS-Tissue's ``3_train_stage2.py`` test does (the
paper and cpu-paper presets)."""

DEFAULT_GATE_THRESHOLD = 0.1
"""The reference's gate: a class whose stage-1 probability is not above 0.1 is gated."""


def check_gate_options(mode: str, threshold: float) -> None:
    """A bad ``--gate-mode`` or ``--gate-threshold`` is a user error."""
    if mode not in GATE_MODES:
        raise WsssError(f"--gate-mode must be one of {', '.join(GATE_MODES)}, not {mode!r}")
    if not 0.0 <= threshold < 1.0:
        raise WsssError(f"--gate-threshold is a probability in [0, 1), not {threshold:g}")


def check_gate_checkpoint(gate: bool, stage1_checkpoint: Path | None, warn: bool = True) -> None:
    """``--gate`` needs ``--stage1-checkpoint`` (a user error); the checkpoint without ``--gate`` is
    not used (one warning unless ``warn`` is False), for every command that gates."""
    if gate and stage1_checkpoint is None:
        raise WsssError("--gate needs --stage1-checkpoint")
    if warn and not gate and stage1_checkpoint is not None:
        log.warning("warning: --stage1-checkpoint is used only with --gate; segmenting without the gate")


def gate_logits(logits: Tensor, probs: Tensor, threshold: float, mode: str = "mask") -> Tensor:
    """Gate segmentation logits (B, C, H, W) with stage-1 probabilities ``probs`` (B, C).

    ``mask``: every class whose probability is ``<= threshold`` gets ``-inf``, so it cannot win the
    argmax. When the classifier rejects *every* class of a patch, its most probable class is kept: a
    patch holds at least one tissue, and the classifier's best guess is then the one class it cannot
    rule out (keeping all classes would make the gate a no-op exactly where the classifier disagrees
    most with the segmenter).

    ``reference``: ``logits * (probs > threshold)``, the reference's arithmetic. A rejected class gets
    logit 0 and still wins wherever the kept classes' logits are all negative; when every class is
    rejected all logits are 0 and the argmax (first maximum) is class 0 everywhere.
    """
    import torch

    keep = probs > threshold
    if mode == "reference":
        return logits * keep[:, :, None, None].to(logits.dtype)
    if mode != "mask":
        raise ValueError(f"unknown gate mode {mode!r}")
    rejected_all = ~keep.any(dim=1)
    if rejected_all.any():
        best = probs[rejected_all].argmax(dim=1)
        keep[rejected_all] = torch.nn.functional.one_hot(best, probs.shape[1]).bool()
    return logits.masked_fill(~keep[:, :, None, None], float("-inf"))


__all__ = ["DEFAULT_GATE_THRESHOLD", "GATE_MODES", "check_gate_options", "gate_logits"]
