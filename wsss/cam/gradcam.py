"""Batched multi-layer Grad-CAM of the stage-1 classifier, and pseudo-masks from it.

For class ``c`` and layer ``L`` with feature map ``A`` (K channels), Grad-CAM is
``cam_c = Σ_k α_k A_k`` with ``α_k = mean_xy ∂logit_c/∂A_k`` (no ReLU, as the reference). The
reference computes it for one image, one class and one layer per forward and backward pass
(12 passes per patch for 3 layers × 4 classes). Here one forward pass per batch gives every
layer, and all classes come from that one graph:

* ``bn7`` feeds global average pooling and the linear head, so ``logit_c = Σ_k W_ck mean_xy A_k``
  and ``∂logit_c/∂A_k(x, y) = W_ck / (h·w)`` everywhere: ``α = fc8.weight / (h·w)``, no gradient pass.
* ``b4_5`` and ``b5_2`` need input gradients only. Autograd records the forward from the earliest
  of them on (earlier blocks run without a graph) and parameters are frozen, so no weight gradient
  is ever computed; each class's ``autograd.grad`` call takes both layers, sharing the backward
  through ``b6``/``b7``.

Pure tensor functions; no file access.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

from wsss.cam.cam import minmax_normalise, upsample_cams
from wsss.models.resnet38 import FEATURE_NAMES, ResNet38Classifier
from wsss.runtime import autocast, full_precision

GRADCAM_LAYERS: tuple[str, ...] = FEATURE_NAMES
"""Layers Grad-CAM can be taken at, in forward order: ``b4_5``, ``b5_2``, ``bn7``."""

HEAD_LAYER = "bn7"
"""The layer directly before pooling and the head: its Grad-CAM weights are ``fc8.weight / (h·w)``."""

BACKGROUND_SCORE = 1.000001
"""Background channel value on white pixels (reference): beats any normalised CAM, which is <= 1."""


def check_layers(layers: Sequence[str]) -> tuple[str, ...]:
    """``layers`` de-duplicated in forward order; ValueError naming an unknown layer."""
    unknown = [name for name in layers if name not in GRADCAM_LAYERS]
    if unknown or not layers:
        raise ValueError(f"unknown Grad-CAM layer {unknown[0] if unknown else '(none)'!r}; "
                         f"choose from {', '.join(GRADCAM_LAYERS)}")
    return tuple(name for name in GRADCAM_LAYERS if name in layers)


@contextlib.contextmanager
def frozen_parameters(model: nn.Module) -> Iterator[None]:
    """Within the block no parameter requires grad (no weight gradients); flags restored afterwards."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


@contextlib.contextmanager
def graph_from(module: nn.Module) -> Iterator[None]:
    """Within the block ``module``'s output is a fresh leaf that requires grad.

    With frozen parameters, autograd then records only the part of the forward after ``module``:
    the early high-resolution blocks keep no saved tensors.
    """
    handle = module.register_forward_hook(lambda _m, _inp, out: out.detach().requires_grad_(True))
    try:
        yield
    finally:
        handle.remove()


def class_weights(logits: Tensor, features: Sequence[Tensor], batched: bool = False) -> list[Tensor]:
    """Grad-CAM weights ``α`` of every class at each of ``features``.

    ``logits`` (B, C) must be differentiable w.r.t. each feature map (B, K_i, h, w). Returns one
    (C, B, K_i) tensor per feature map. By default one ``autograd.grad`` call per class on the
    retained graph; ``batched`` does all classes in one call (``is_grads_batched``, vmap over the
    backward). Both do the same arithmetic; on 2 CPU cores the per-class calls measured as fast or
    slightly faster (width 0.25, 16 patches: 1.6 s vs 1.9 s; full width: equal) and never hold C
    gradient maps at once, hence the default.
    """
    # In eval mode (BatchNorm on running statistics, dropout off) image b's logits depend only on
    # image b's features, so ∂(Σ_b logit[b, c])/∂A[b] = ∂logit[b, c]/∂A[b]: one backward pass per
    # class serves the whole batch.
    num_classes = logits.shape[1]
    if batched:
        one_hot = torch.eye(num_classes, dtype=logits.dtype, device=logits.device)
        grad_outputs = one_hot[:, None, :].expand(num_classes, *logits.shape).contiguous()
        grads = torch.autograd.grad(logits, list(features), grad_outputs, is_grads_batched=True)
        return [g.mean(dim=(-2, -1)) for g in grads]
    per_class: list[list[Tensor]] = []
    for c in range(num_classes):
        grads = torch.autograd.grad(logits[:, c].sum(), list(features), retain_graph=c < num_classes - 1)
        per_class.append([g.mean(dim=(-2, -1)) for g in grads])
    return [torch.stack(alphas) for alphas in zip(*per_class)]


def weighted_maps(alpha: Tensor, features: Tensor) -> Tensor:
    """``cam[b, c] = Σ_k α[c, b, k] A[b, k]``: α (C, B, K) or (C, K), A (B, K, h, w) → (B, C, h, w)."""
    if alpha.dim() == 2:
        return torch.einsum("ck,bkhw->bchw", alpha, features)
    return torch.einsum("cbk,bkhw->bchw", alpha, features)


def multi_layer_gradcam(
    model: ResNet38Classifier,
    x: Tensor,
    layers: Sequence[str] = GRADCAM_LAYERS,
    size: tuple[int, int] | None = None,
    batched: bool = False,
    precision: str = "fp32",
) -> dict[str, Tensor]:
    """Raw Grad-CAMs (no ReLU, not normalised) of every class at each layer, from one forward pass.

    ``x`` (B, 3, S, S) is the normalised model input; the model must be in eval mode. Returns
    ``{layer: (B, C, H, W)}`` (float32, or float64 for a float64 model) with ``(H, W) = size`` (bilinear, ``align_corners=False``), or
    at the feature resolution (B, C, S/8, S/8) when ``size`` is None. Parameters' ``requires_grad``
    flags are left as they were; no graph outlives the call. ``precision`` (resolved) is that of the
    forward and gradient passes; the weighted sums, the upsampling (and later the normalisation)
    are float32 whatever it is: a Grad-CAM (no ReLU) sums K products of both signs, whose
    cancellation an 8-bit mantissa would not resolve.
    """
    if model.training:
        raise ValueError("Grad-CAM needs the model in eval mode (dropout off, BatchNorm statistics fixed)")
    layers = check_layers(layers)
    grad_layers = [name for name in layers if name != HEAD_LAYER]
    with contextlib.ExitStack() as stack:
        stack.enter_context(frozen_parameters(model))
        if grad_layers:
            stack.enter_context(torch.enable_grad())
            stack.enter_context(graph_from(getattr(model, grad_layers[0])))
        else:
            stack.enter_context(torch.no_grad())
        alphas: dict[str, Tensor] = {}
        with autocast(x.device, precision):
            features = model.forward_features(x)
            if grad_layers:
                logits = model.forward_head(features["bn7"])
                alphas.update(zip(grad_layers, class_weights(logits, [features[n] for n in grad_layers], batched)))
                del logits
        if HEAD_LAYER in layers:
            head = features[HEAD_LAYER]
            alphas[HEAD_LAYER] = model.fc8.weight.flatten(1) / (head.shape[-2] * head.shape[-1])
        with torch.no_grad():
            cams = {name: weighted_maps(full_precision(alphas[name]), full_precision(features[name].detach()))
                    for name in layers}
        del features, alphas
    if size is not None:
        cams = {name: upsample_cams(cam, size) for name, cam in cams.items()}
    return cams


def averaged_gradcam(
    model: ResNet38Classifier,
    x: Tensor,
    layers: Sequence[str],
    size: tuple[int, int],
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    gradcam=None,
    precision: str = "fp32",
) -> dict[str, Tensor]:
    """Grad-CAMs ``{layer: (B, C, H, W)}`` at ``size``, each view jointly min-max normalised over
    classes, averaged over input scales and flips.

    Each view is ``x`` (B, 3, S, S) bilinearly resized by a factor of ``scales[i]`` (and, with
    ``flip``, also mirrored left-right); its Grad-CAMs are resized to ``size``, un-mirrored,
    normalised per image as the fusion does (:func:`minmax_normalise`) and averaged with the other
    views (multi-scale CAM inference as in PSA/IRN). Normalising first matters: a Grad-CAM's scale
    goes as 1/(h·w) of the view through the global pooling, so raw maps of a larger view would
    count less. With one view this is ``minmax_normalise`` of :func:`multi_layer_gradcam`, whose
    fusion is bit-identical to that of the raw maps. ``gradcam(model, x, layers, size)`` replaces
    :func:`multi_layer_gradcam` (tests use a toy map). ``precision``: of the model's passes
    (:func:`multi_layer_gradcam`); the normalisation and the mean are float32.
    """
    gradcam = gradcam or functools.partial(multi_layer_gradcam, precision=precision)
    total: dict[str, Tensor] = {}
    views = 0
    for scale in scales:
        xs = x
        if scale != 1.0:
            side = [max(8, round(s * scale)) for s in x.shape[-2:]]
            xs = torch.nn.functional.interpolate(x, size=side, mode="bilinear", align_corners=False)
        for mirrored in ((False, True) if flip else (False,)):
            cams = gradcam(model, xs.flip(-1) if mirrored else xs, layers, size=size)
            for name, cam in cams.items():
                cam = minmax_normalise(full_precision(cam.flip(-1) if mirrored else cam))
                total[name] = cam if name not in total else total[name] + cam
            views += 1
    return {name: cam / views for name, cam in total.items()}


def fuse_pseudo_mask(
    cams: Tensor, labels: Tensor, white: Tensor | None, background_index: int, tie_rule: str = "ours"
) -> Tensor:
    """Class-index pseudo-mask from one layer's Grad-CAMs.

    ``cams`` (B, C, H, W) raw Grad-CAMs at the patch size; ``labels`` (B, C) bool, the classes of
    each patch; ``white`` (B, H, W) bool white-background pixels, or None where white is tissue
    (BCSS). Returns (B, H, W) long in ``0..C-1`` or ``background_index``.

    The maps are min-max normalised jointly over all classes (values in [0, 1]); a background
    channel worth :data:`BACKGROUND_SCORE` on white pixels and 0 elsewhere is appended; the argmax
    runs over the labelled classes and the background channel only, ties going to the tissue class
    with the lowest index. Without ``white`` there is no background channel, so white never becomes
    background. A patch with no labelled class (not a valid training name) is all background.

    ``tie_rule="reference"`` is the reference's arithmetic instead: unlabelled classes keep score 0
    (not −∞) and, for BCSS, the background channel is 0 everywhere, so at a pixel where every
    labelled class scores exactly 0 (the joint minimum) the lowest index scoring 0 wins, labelled or
    not. This changes a handful of pixels at most.
    """
    num_classes = cams.shape[1]
    if tie_rule == "reference":
        scores = minmax_normalise(cams) * labels.bool()[:, :, None, None].to(cams.dtype)
        background = torch.zeros_like(scores[:, 0])
        if white is not None:
            background = torch.where(white.bool(), BACKGROUND_SCORE, 0.0).to(scores.dtype)
        winner = first_argmax([*scores.unbind(dim=1), background])
        return torch.where(winner == num_classes, background_index, winner)
    if tie_rule != "ours":
        raise ValueError(f"unknown tie rule {tie_rule!r}")
    scores = minmax_normalise(cams).masked_fill(~labels.bool()[:, :, None, None], float("-inf"))
    no_label = ~labels.bool().any(dim=1)[:, None, None]
    background = torch.full_like(scores[:, 0], float("-inf"))
    if white is not None:
        background = torch.where(white.bool(), BACKGROUND_SCORE, 0.0).to(scores.dtype)
    background = torch.where(no_label, torch.zeros_like(background), background)
    winner = first_argmax([*scores.unbind(dim=1), background])
    return torch.where(winner == num_classes, background_index, winner)


def first_argmax(maps: Sequence[Tensor]) -> Tensor:
    """Index of the first maximum over equally shaped maps, e.g. C × (B, H, W) → (B, H, W) long.

    The same as ``torch.stack(maps, 1).argmax(1)``, but a running maximum over contiguous maps is
    several times faster on CPU than an argmax over the strided channel dimension.
    """
    best = maps[0]
    index = torch.zeros(best.shape, dtype=torch.long, device=best.device)
    for i, candidate in enumerate(maps[1:], start=1):
        index.masked_fill_(candidate > best, i)  # strictly greater: ties keep the earlier map
        best = torch.maximum(best, candidate)
    return index


def class_pixel_counts(masks: Tensor, num_values: int) -> Tensor:
    """Pixel count of each value ``0..num_values-1`` in class-index masks of any shape → (num_values,)."""
    return torch.bincount(masks.reshape(-1).long(), minlength=num_values)[:num_values]


__all__ = [
    "BACKGROUND_SCORE",
    "GRADCAM_LAYERS",
    "HEAD_LAYER",
    "check_layers",
    "class_pixel_counts",
    "class_weights",
    "first_argmax",
    "frozen_parameters",
    "averaged_gradcam",
    "fuse_pseudo_mask",
    "graph_from",
    "multi_layer_gradcam",
    "weighted_maps",
]
