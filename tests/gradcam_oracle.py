"""Grad-CAM and the pseudo-mask fusion from their definitions, for the tests (nothing here calls
wsss's Grad-CAM): a thin random classifier with non-trivial BatchNorm statistics, Grad-CAM one image,
class and layer at a time, and the reference's fusion rule."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from wsss.models.resnet38 import ResNet38Classifier

BG = 4


def make_classifier(seed: int = 0, width: float = 0.125) -> ResNet38Classifier:
    """A thin random classifier in eval mode with non-trivial BatchNorm statistics (not identity)."""
    torch.manual_seed(seed)
    model = ResNet38Classifier(4, width=width)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
    return model.eval()


def slow_gradcam(model: ResNet38Classifier, x: torch.Tensor, layer: str, cls: int, size) -> torch.Tensor:
    """Grad-CAM straight from the definition, as the reference runs it: one image (1, 3, S, S), one
    class, one layer, a full forward and a backward pass. Returns (H, W) at ``size``."""
    features = model.forward_features(x)
    logit = model.forward_head(features["bn7"])[0, cls]
    (grad,) = torch.autograd.grad(logit, features[layer])
    alpha = grad[0].mean(dim=(1, 2))  # α_k = mean_xy ∂logit/∂A_k
    cam = (alpha[:, None, None] * features[layer][0]).sum(dim=0)  # Σ_k α_k A_k, no ReLU
    return F.interpolate(cam[None, None].detach(), size=size, mode="bilinear", align_corners=False)[0, 0]


def slow_normalised(model, x: torch.Tensor, layer: str, size) -> np.ndarray:
    """(C, H, W) float64: the classes of one image, jointly min-max normalised, the slow way."""
    cams = np.stack([slow_gradcam(model, x, layer, c, size).double().numpy() for c in range(model.num_classes)])
    return (cams - cams.min()) / (cams.max() - cams.min())


def reference_fusion(scores: np.ndarray, label, white: np.ndarray | None) -> np.ndarray:
    """(C, H, W) normalised maps → (H, W) indices: argmax over the labelled classes and (LUAD) a
    background channel 1.000001 on white, 0 elsewhere; first maximum wins."""
    channels = [scores[c] if label[c] else np.full(scores.shape[1:], -np.inf) for c in range(len(label))]
    channels.append(np.where(white, 1.000001, 0.0) if white is not None else np.full(scores.shape[1:], -np.inf))
    winner = np.argmax(np.stack(channels), axis=0)
    return np.where(winner == len(label), BG, winner).astype(np.uint8)
