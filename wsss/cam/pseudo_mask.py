"""The pseudo-mask core: how a patch's multi-layer Grad-CAMs become its pseudo-masks (the method
shared by ``wsss generate-pm``, ``reproduce`` and the figures; DESIGN.md, "Pseudo-masks")."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from wsss.cam.cam import check_tie_rule
from wsss.cam.gradcam import averaged_gradcam, check_layers, fuse_pseudo_mask
from wsss.data.background import WHITE_RULES, white_mask
from wsss.data.datasets import InputNorm, resize_rgb, to_tensor
from wsss.data.specs import DatasetSpec
from wsss.errors import WsssError
from wsss.models.resnet38 import ResNet38Classifier
from wsss.runtime import memory_format


@dataclass(frozen=True)
class PmMethod:
    """How a patch's Grad-CAMs become its pseudo-masks (shared by generate-pm and the figures)."""

    tie_rule: str = "reference"
    scales: tuple[float, ...] = (1.0,)
    flip: bool = False
    white_rule: str = "grey"

    def __post_init__(self) -> None:
        check_tie_rule(self.tie_rule)
        if not self.scales or any(not 0.25 <= s <= 4.0 for s in self.scales):
            raise WsssError(f"--scales must be between 0.25 and 4, not {','.join(f'{s:g}' for s in self.scales)}")
        if self.white_rule not in WHITE_RULES:
            raise WsssError(f"--white-rule must be one of {', '.join(WHITE_RULES)}, not {self.white_rule!r}")


def parse_layers(text: str | Sequence[str]) -> tuple[str, ...]:
    """``"b4_5,b5_2,bn7"`` (or a sequence) → layer names in forward order; unknown names are a user error."""
    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text) if n.strip()]
    try:
        return check_layers(names)
    except ValueError as exc:
        raise WsssError(f"--layers: {exc}") from None


def patch_item(image: np.ndarray, label: Sequence[int], spec: DatasetSpec, norm: InputNorm,
               model_size: int | None, white_rule: str = "grey") -> dict:
    """What :func:`pseudo_masks` needs of one patch ``(H, W, 3)`` uint8 with multi-hot ``label``:
    ``x`` model input, ``label`` bool, ``size`` (H, W), ``white`` background mask or None."""
    return {
        "x": to_tensor(resize_rgb(image, model_size), norm),
        "label": torch.tensor(label, dtype=torch.bool),
        "size": tuple(image.shape[:2]),
        "white": torch.from_numpy(white_mask(image, rule=white_rule)) if spec.white_is_background else None,
    }


def pseudo_masks(model: ResNet38Classifier, items: Sequence[dict], layers: Sequence[str], spec: DatasetSpec,
                 device: torch.device, method: PmMethod = PmMethod(), precision: str = "fp32") -> dict[str, torch.Tensor]:
    """``{layer: (B, H, W) uint8}`` pseudo-masks of a group of same-size items (dataset items), the
    classifier's passes in ``precision`` (resolved)."""
    x = torch.stack([item["x"] for item in items]).to(device)
    x = x.contiguous(memory_format=memory_format(device, precision))
    labels = torch.stack([item["label"] for item in items]).to(device)
    white = None
    if items[0]["white"] is not None:
        white = torch.stack([item["white"] for item in items]).to(device)
    cams = averaged_gradcam(model, x, layers, tuple(items[0]["size"]), method.scales, method.flip,
                            precision=precision)
    return {layer: fuse_pseudo_mask(cams.pop(layer), labels, white, spec.background_index,
                                    method.tie_rule).to(torch.uint8).cpu()
            for layer in layers}
