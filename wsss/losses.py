"""Segmentation losses for stage 2 (pure functions of logits and class-index targets).

Every loss takes logits ``(B, C, H, W)`` and a target ``(B, H, W)`` of class indices, where pixels
equal to ``ignore_index`` (the dataset spec's background index) contribute nothing — neither to the value nor to
the gradient. A batch in which every pixel is ignored gives 0 (with a zero gradient), not NaN.

* ``ce`` — cross-entropy averaged over the evaluated pixels (the reference's loss).
* ``focal`` — per-pixel focal loss ``-(1 - p_t)^γ log p_t`` (Lin et al. 2017), γ = 2, averaged over
  evaluated pixels. (The reference's ``FocalLoss`` applies the focusing term to the batch-mean
  cross-entropy instead of per pixel.)
* ``dice`` — soft multi-class Dice, ``1 - mean_c (2 Σ p_c g_c + ε) / (Σ p_c + Σ g_c + ε)`` over the
  batch's evaluated pixels, ε = 1.
* ``ce+dice`` — their sum.
* ``lovasz`` — multi-class Lovász-softmax (Berman et al. 2018) over the batch's evaluated pixels,
  averaged over the classes present in the target.

:func:`multi_mask_loss` combines one loss over several pseudo-masks: ``Σ_l w_l · L(logits, PM_l)``.

Two reductions of the multi-mask loss (``--loss-reduction``):

* ``mean`` (ours) — the losses above: background pixels of each mask are ignored, the loss is a mean
  over the pixels that mask labels as tissue.
* ``reference`` — what WSSS-Tissue's ``3_train_stage2.py`` computes
  (:func:`reference_multi_mask_loss`): an extra logit is appended to the C class logits, worth 100
  where the *first* mask (PM_bn7) is background and 0 elsewhere; each mask's background value is
  that extra class; cross-entropy over all C+1 logits ignores only 255 and is averaged over all
  pixels, then divided by the batch size again (``SegmentationLosses(batch_average=True)``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from wsss.errors import WsssError

LossFn = Callable[[Tensor, Tensor], Tensor]
FOCAL_GAMMA = 2.0
DICE_SMOOTH = 1.0


def _valid(target: Tensor, ignore_index: int) -> Tensor:
    return target != ignore_index


def _masked_mean(per_pixel: Tensor, valid: Tensor) -> Tensor:
    """Mean over valid pixels; 0 (still attached to the graph) when there are none."""
    return (per_pixel * valid).sum() / valid.sum().clamp(min=1)


def _pixel_ce(logits: Tensor, target: Tensor, ignore_index: int) -> Tensor:
    """Per-pixel cross-entropy (B, H, W), 0 at ignored pixels."""
    return F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="none")


def cross_entropy(logits: Tensor, target: Tensor, ignore_index: int) -> Tensor:
    return _masked_mean(_pixel_ce(logits, target, ignore_index), _valid(target, ignore_index))


def focal(logits: Tensor, target: Tensor, ignore_index: int, gamma: float = FOCAL_GAMMA) -> Tensor:
    ce = _pixel_ce(logits, target, ignore_index)
    pt = torch.exp(-ce)
    return _masked_mean((1 - pt).pow(gamma) * ce, _valid(target, ignore_index))


def _flat_probs(logits: Tensor, target: Tensor, ignore_index: int) -> tuple[Tensor, Tensor]:
    """Softmax probabilities (N, C) and labels (N,) of the evaluated pixels only."""
    c = logits.shape[1]
    probs = logits.softmax(dim=1).permute(0, 2, 3, 1).reshape(-1, c)
    labels = target.reshape(-1)
    keep = labels != ignore_index
    return probs[keep], labels[keep]


def dice(logits: Tensor, target: Tensor, ignore_index: int, smooth: float = DICE_SMOOTH) -> Tensor:
    probs, labels = _flat_probs(logits, target, ignore_index)
    if labels.numel() == 0:
        return logits.sum() * 0.0
    onehot = F.one_hot(labels, logits.shape[1]).to(probs.dtype)
    inter = (probs * onehot).sum(dim=0)
    total = probs.sum(dim=0) + onehot.sum(dim=0)
    return 1.0 - ((2 * inter + smooth) / (total + smooth)).mean()


def ce_dice(logits: Tensor, target: Tensor, ignore_index: int) -> Tensor:
    return cross_entropy(logits, target, ignore_index) + dice(logits, target, ignore_index)


def _lovasz_grad(sorted_fg: Tensor) -> Tensor:
    """Gradient of the Lovász extension of the Jaccard loss w.r.t. errors sorted in decreasing order."""
    gts = sorted_fg.sum()
    intersection = gts - sorted_fg.cumsum(0)
    union = gts + (1 - sorted_fg).cumsum(0)
    jaccard = 1.0 - intersection / union
    if sorted_fg.numel() > 1:
        jaccard[1:] = jaccard[1:] - jaccard[:-1]
    return jaccard


def lovasz_softmax(logits: Tensor, target: Tensor, ignore_index: int) -> Tensor:
    probs, labels = _flat_probs(logits, target, ignore_index)
    losses = []
    for c in range(logits.shape[1]):
        fg = (labels == c).to(probs.dtype)
        if fg.sum() == 0:  # "present" classes only, as Berman et al.'s default
            continue
        errors = (fg - probs[:, c]).abs()
        errors_sorted, order = torch.sort(errors, descending=True)
        losses.append(torch.dot(errors_sorted, _lovasz_grad(fg[order])))
    if not losses:
        return logits.sum() * 0.0
    return torch.stack(losses).mean()


REFERENCE_IGNORE_INDEX = 255
REFERENCE_BACKGROUND_LOGIT = 100.0
LOSS_REDUCTIONS: tuple[str, ...] = ("reference", "mean")


def reference_multi_mask_loss(logits: Tensor, targets: Tensor, weights: Sequence[float],
                              background_index: int) -> Tensor:
    """WSSS-Tissue's stage-2 loss: logits (B, C, H, W), masks (B, L, H, W) → scalar.

    ``targets[:, 0]`` is the reference's ``target`` (PM_bn7): where it equals ``background_index``
    an appended logit is 100, elsewhere 0, and that one extra logit serves every mask. In each mask
    ``background_index`` names the extra class; 255 is ignored. Per mask:
    ``CE = mean over non-ignored pixels of -log softmax(logits ⊕ extra)[target]``, divided by B;
    the total is ``Σ_l w_l · CE_l``. Where a later mask calls a pixel background but PM_bn7 does not
    (or the reverse) that pixel is trained, towards or against an extra logit of 0 or 100, as in
    the reference.
    """
    if targets.shape[1] != len(weights):
        raise ValueError(f"{targets.shape[1]} target masks but {len(weights)} weights")
    batch, num_classes = logits.shape[:2]
    extra = REFERENCE_BACKGROUND_LOGIT * (targets[:, :1] == background_index).to(logits.dtype)
    full = torch.cat([logits, extra], dim=1)
    total = logits.sum() * 0.0
    for layer, weight in enumerate(weights):
        if weight == 0:
            continue
        target = targets[:, layer].long()
        target = torch.where(target == background_index, torch.full_like(target, num_classes), target)
        ce = cross_entropy(full, target, REFERENCE_IGNORE_INDEX)
        total = total + weight * (ce / batch)
    return total


def check_loss_options(name: str, reduction: str) -> None:
    """A bad ``--loss`` / ``--loss-reduction`` combination is a user error."""
    if reduction not in LOSS_REDUCTIONS:
        raise WsssError(f"--loss-reduction must be one of {', '.join(LOSS_REDUCTIONS)}, not {reduction!r}")
    if reduction == "reference" and name != "ce":
        raise WsssError(f"--loss-reduction reference is the reference's cross-entropy; use it with --loss ce "
                        f"(not {name!r}) or choose --loss-reduction mean")


def build_multi_mask_loss(name: str, reduction: str, weights: Sequence[float],
                          background_index: int) -> Callable[[Tensor, Tensor], Tensor]:
    """Stage 2's training loss ``fn(logits (B, C, H, W), masks (B, L, H, W)) -> scalar``; pixels of value
    ``background_index`` (the spec's) are background."""
    check_loss_options(name, reduction)
    weights = tuple(weights)
    if reduction == "reference":
        return lambda logits, masks: reference_multi_mask_loss(logits, masks, weights, background_index)
    loss = get_loss(name, background_index)
    return lambda logits, masks: multi_mask_loss(logits, masks, weights, loss)


LOSSES: dict[str, Callable[..., Tensor]] = {
    "ce": cross_entropy,
    "focal": focal,
    "dice": dice,
    "ce+dice": ce_dice,
    "lovasz": lovasz_softmax,
}


def get_loss(name: str, ignore_index: int) -> LossFn:
    """The loss called ``name`` with ``ignore_index`` bound: ``fn(logits, target) -> scalar``."""
    try:
        fn = LOSSES[name]
    except KeyError:
        raise WsssError(f"unknown loss {name!r}; choose one of {', '.join(LOSSES)}") from None
    return lambda logits, target: fn(logits, target, ignore_index)


def multi_mask_loss(logits: Tensor, targets: Tensor, weights: Sequence[float], loss: LossFn) -> Tensor:
    """``Σ_l w_l · loss(logits, targets[:, l])`` for logits (B, C, H, W) and targets (B, L, H, W).

    Layers of weight 0 are skipped, so they cannot affect the value or the gradient.
    """
    if targets.shape[1] != len(weights):
        raise ValueError(f"{targets.shape[1]} target masks but {len(weights)} weights")
    total = logits.sum() * 0.0
    for layer, weight in enumerate(weights):
        if weight != 0:
            total = total + weight * loss(logits, targets[:, layer])
    return total
