"""ResNet38 ("Wider or Deeper", Wu et al. 2016) as used by PSA and WSSS-Tissue, plus the stage-1 head.

Module and parameter names follow PSA's ``network/resnet38d.py`` exactly (``conv1a``, ``b4_5``,
``bn_branch2a``, ``conv_branch1``, ``bn7``, head ``fc8``), so the published WSSS-Tissue stage-1
checkpoints and PSA's converted ImageNet weights load without renaming. A ``width`` multiplier
builds a thin copy with the same names for CPU runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from wsss.cam.cam import cams_from_features
from wsss.cam.pda import pda_attention
from wsss.errors import WsssError

FEATURE_NAMES = ("b4_5", "b5_2", "bn7")
"""Named feature maps returned by :meth:`ResNet38.forward_features` (the Grad-CAM layers)."""

# Reference channel counts at width 1.0.
_B4_CHANNELS = 512
_B5_CHANNELS = 1024
_B7_CHANNELS = 4096

# Blocks the reference keeps fixed when it starts from ImageNet weights.
_PRETRAINED_FROZEN = ("conv1a", "b2", "b2_1", "b2_2")

_HEAD_PREFIX = "fc8."


def scaled(channels: int, width: float) -> int:
    """``channels * width`` rounded to a multiple of 8, at least 8 (width 1.0 keeps the count)."""
    return max(8, int(round(channels * width / 8)) * 8)


@dataclass(frozen=True)
class FeatureInfo:
    """Metadata of one named feature map: channel count and stride relative to the input."""

    name: str
    channels: int
    stride: int


class ResBlock(nn.Module):
    """Pre-activation basic block: BN→ReLU, then 3×3 conv → BN → ReLU → 3×3 conv, plus a shortcut.

    The shortcut is the raw input when shapes agree, else a 1×1 projection of the *activated*
    input (as in PSA). ``first_dilation`` applies to the first 3×3 conv only.
    """

    def __init__(
        self,
        in_channels: int,
        mid_channels: int,
        out_channels: int,
        stride: int = 1,
        dilation: int = 1,
        first_dilation: int | None = None,
    ) -> None:
        super().__init__()
        first_dilation = dilation if first_dilation is None else first_dilation
        self.same_shape = in_channels == out_channels and stride == 1
        self.bn_branch2a = nn.BatchNorm2d(in_channels)
        self.conv_branch2a = nn.Conv2d(
            in_channels, mid_channels, 3, stride, padding=first_dilation, dilation=first_dilation, bias=False
        )
        self.bn_branch2b1 = nn.BatchNorm2d(mid_channels)
        self.conv_branch2b1 = nn.Conv2d(
            mid_channels, out_channels, 3, padding=dilation, dilation=dilation, bias=False
        )
        if not self.same_shape:
            self.conv_branch1 = nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C_in, H, W) → (B, C_out, H/stride, W/stride)."""
        activated = F.relu(self.bn_branch2a(x))
        shortcut = x if self.same_shape else self.conv_branch1(activated)
        branch = self.conv_branch2a(activated)
        branch = self.conv_branch2b1(F.relu(self.bn_branch2b1(branch)))
        return shortcut + branch


class ResBlockBottleneck(nn.Module):
    """Pre-activation bottleneck with dropout, ``out`` output channels.

    BN→ReLU → 1×1 (out/4) → BN→ReLU→dropout → 3×3 (out/2) → BN→ReLU→dropout → 1×1 (out).

    Always has a 1×1 projection shortcut from the activated input (the reference builds one even
    if shapes agreed; in ResNet38 they never do).
    """

    def __init__(
        self, in_channels: int, out_channels: int, width: float, dilation: int = 1, dropout: float = 0.0
    ) -> None:
        super().__init__()
        # Reference counts are out/4 and out/2; scale them from the nominal width-1.0 values so a
        # thin copy keeps every count a multiple of 8.
        quarter = scaled(out_channels // 4, width)
        half = scaled(out_channels // 2, width)
        out = scaled(out_channels, width)
        self.bn_branch2a = nn.BatchNorm2d(in_channels)
        self.conv_branch2a = nn.Conv2d(in_channels, quarter, 1, bias=False)
        self.bn_branch2b1 = nn.BatchNorm2d(quarter)
        self.dropout_2b1 = nn.Dropout2d(dropout)
        self.conv_branch2b1 = nn.Conv2d(quarter, half, 3, padding=dilation, dilation=dilation, bias=False)
        self.bn_branch2b2 = nn.BatchNorm2d(half)
        self.dropout_2b2 = nn.Dropout2d(dropout)
        self.conv_branch2b2 = nn.Conv2d(half, out, 1, bias=False)
        self.conv_branch1 = nn.Conv2d(in_channels, out, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C_in, H, W) → (B, C_out, H, W)."""
        activated = F.relu(self.bn_branch2a(x))
        shortcut = self.conv_branch1(activated)
        branch = self.conv_branch2a(activated)
        branch = self.conv_branch2b1(self.dropout_2b1(F.relu(self.bn_branch2b1(branch))))
        branch = self.conv_branch2b2(self.dropout_2b2(F.relu(self.bn_branch2b2(branch))))
        return shortcut + branch


class ResNet38(nn.Module):
    """ResNet38 backbone with output stride 8 (224 px → 28 px).

    Stages: ``conv1a`` (64) · ``b2..b2_2`` (128, stride 2) · ``b3..b3_2`` (256, stride 2) ·
    ``b4..b4_5`` (512, stride 2) · ``b5..b5_2`` (512 → 1024, dilation 2; ``b5`` first dilation 1) ·
    ``b6`` bottleneck (2048, dilation 4, dropout 0.3) · ``b7`` bottleneck (4096, dilation 4,
    dropout 0.5) · ``bn7``. Every channel count is scaled by ``width``.
    """

    def __init__(self, width: float = 1.0) -> None:
        super().__init__()
        if width <= 0:
            raise WsssError(f"model width must be positive, got {width}")
        self.width = width

        def ch(c: int) -> int:
            return scaled(c, width)

        self.conv1a = nn.Conv2d(3, ch(64), 3, padding=1, bias=False)

        self.b2 = ResBlock(ch(64), ch(128), ch(128), stride=2)
        self.b2_1 = ResBlock(ch(128), ch(128), ch(128))
        self.b2_2 = ResBlock(ch(128), ch(128), ch(128))

        self.b3 = ResBlock(ch(128), ch(256), ch(256), stride=2)
        self.b3_1 = ResBlock(ch(256), ch(256), ch(256))
        self.b3_2 = ResBlock(ch(256), ch(256), ch(256))

        self.b4 = ResBlock(ch(256), ch(512), ch(512), stride=2)
        self.b4_1 = ResBlock(ch(512), ch(512), ch(512))
        self.b4_2 = ResBlock(ch(512), ch(512), ch(512))
        self.b4_3 = ResBlock(ch(512), ch(512), ch(512))
        self.b4_4 = ResBlock(ch(512), ch(512), ch(512))
        self.b4_5 = ResBlock(ch(512), ch(512), ch(512))

        self.b5 = ResBlock(ch(512), ch(512), ch(1024), dilation=2, first_dilation=1)
        self.b5_1 = ResBlock(ch(1024), ch(512), ch(1024), dilation=2)
        self.b5_2 = ResBlock(ch(1024), ch(512), ch(1024), dilation=2)

        self.b6 = ResBlockBottleneck(ch(1024), 2048, width, dilation=4, dropout=0.3)
        self.b7 = ResBlockBottleneck(ch(2048), 4096, width, dilation=4, dropout=0.5)
        self.bn7 = nn.BatchNorm2d(ch(_B7_CHANNELS))

        self.feature_info: tuple[FeatureInfo, ...] = (
            FeatureInfo("b4_5", ch(_B4_CHANNELS), 8),
            FeatureInfo("b5_2", ch(_B5_CHANNELS), 8),
            FeatureInfo("bn7", ch(_B7_CHANNELS), 8),
        )
        self._frozen_pretrained = False

    @property
    def num_features(self) -> int:
        """Channels of the final ``bn7`` feature map (4096 at width 1.0)."""
        return self.feature_info[-1].channels

    def forward_features(self, x: Tensor) -> dict[str, Tensor]:
        """Image (B, 3, H, W) → ``{"b4_5": (B, 512w, H/8, W/8), "b5_2": (B, 1024w, ..),
        "bn7": relu(bn7(b7 out)) (B, 4096w, ..)}``.

        ``b4_5`` and ``b5_2`` are block outputs (before the next block's BN), the layers the
        reference's Grad-CAM hooks read.
        """
        x = self.conv1a(x)
        for name in ("b2", "b2_1", "b2_2", "b3", "b3_1", "b3_2", "b4", "b4_1", "b4_2", "b4_3", "b4_4"):
            x = getattr(self, name)(x)
        b4_5 = self.b4_5(x)
        x = self.b5_1(self.b5(b4_5))
        b5_2 = self.b5_2(x)
        x = self.b7(self.b6(b5_2))
        return {"b4_5": b4_5, "b5_2": b5_2, "bn7": F.relu(self.bn7(x))}

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """Same as :meth:`forward_features`."""
        return self.forward_features(x)

    def freeze_pretrained(self) -> None:
        """Freeze as the reference does after loading ImageNet weights.

        Every BatchNorm goes to eval mode with ``requires_grad=False``, and ``conv1a, b2, b2_1,
        b2_2`` stop learning. The BN eval mode survives later ``.train()`` calls. Call this before
        building the optimizer's parameter groups. Never call it for a randomly initialised model:
        frozen random BN statistics and stem would cripple training.
        """
        self._frozen_pretrained = True
        for name in _PRETRAINED_FROZEN:
            getattr(self, name).requires_grad_(False)
        for module in self.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.requires_grad_(False)
        self.train(self.training)

    @property
    def is_frozen_pretrained(self) -> bool:
        """Whether :meth:`freeze_pretrained` was applied."""
        return self._frozen_pretrained

    def train(self, mode: bool = True) -> ResNet38:
        """Set train/eval mode; with the pretrained freeze, BatchNorm stays in eval mode."""
        super().train(mode)
        if self._frozen_pretrained:
            for module in self.modules():
                if isinstance(module, nn.BatchNorm2d):
                    module.eval()
        return self


class ResNet38Classifier(ResNet38):
    """ResNet38 + multi-label head: Dropout2d(0.5) → global average pool → ``fc8`` (1×1 conv, no bias).

    Parameter names are flat (``conv1a.weight``, ``fc8.weight``) like WSSS-Tissue's
    ``resnet38_cls.Net``, so its checkpoints load with ``strict=True`` at width 1.0.
    """

    def __init__(self, num_classes: int, width: float = 1.0) -> None:
        super().__init__(width)
        self.num_classes = num_classes
        self.dropout7 = nn.Dropout2d(0.5)
        self.fc8 = nn.Conv2d(self.num_features, num_classes, 1, bias=False)
        nn.init.xavier_uniform_(self.fc8.weight)

    def scale_dropout(self, scale: float) -> None:
        """Multiply the reference's dropout rates (``b6`` 0.3, ``b7`` 0.5, head 0.5) by ``scale`` (0: no
        dropout). Only training sees it."""
        if not 0.0 <= scale <= 2.0:
            raise WsssError(f"--dropout must be in [0, 2] (a multiple of the reference's rates), not {scale:g}")
        for module, rate in ((self.b6.dropout_2b1, 0.3), (self.b6.dropout_2b2, 0.3), (self.b7.dropout_2b1, 0.5),
                             (self.b7.dropout_2b2, 0.5), (self.dropout7, 0.5)):
            module.p = min(rate * scale, 0.95)

    def forward_head(self, features: Tensor, attention: Tensor | None = None) -> Tensor:
        """``bn7`` features (B, K, h, w), optional attention (B, 1, h, w) → logits (B, C)."""
        if attention is not None:
            features = features * attention
        pooled = self.dropout7(features).mean(dim=(2, 3), keepdim=True)
        return self.fc8(pooled).flatten(1)

    def forward(self, x: Tensor, pda_gamma: float | None = None, pda_norm: str = "none") -> Tensor:  # type: ignore[override]
        """Image (B, 3, H, W) → logits (B, C); with ``pda_gamma`` the PDA attention is applied first
        (``pda_norm``: see :func:`wsss.cam.pda.pda_attention`)."""
        features = self.forward_features(x)["bn7"]
        attention = None
        if pda_gamma is not None:
            attention = pda_attention(features, self.fc8.weight, pda_gamma, pda_norm)
        return self.forward_head(features, attention)

    def cams(self, x: Tensor) -> Tensor:
        """Class activation maps relu(conv(bn7 features, fc8.weight)): (B, 3, H, W) → (B, C, H/8, W/8)."""
        return cams_from_features(self.forward_features(x)["bn7"], self.fc8.weight)

    def cams_and_logits(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """One forward pass: CAMs (B, C, H/8, W/8) and logits (B, C), as the reference's ``forward_cam``.

        Meant for eval mode; in train mode the logits see ``dropout7``, the CAMs do not.
        """
        features = self.forward_features(x)["bn7"]
        return cams_from_features(features, self.fc8.weight), self.forward_head(features)

    def param_groups(self, lr: float, weight_decay: float, head_mult: float = 10.0) -> list[dict]:
        """The four SGD groups of the reference, trainable parameters only.

        backbone weights (Conv and BN) 1×lr with decay · backbone biases (BN) 2×lr, no decay ·
        head weights ``head_mult``×lr (10 in the reference) with decay · head biases
        2·``head_mult``×lr, no decay (empty: ``fc8`` has no bias).
        Each group carries ``name`` and ``lr_mult`` so a scheduler can rescale from ``lr``.
        """
        spec = (
            ("backbone_weight", 1.0, weight_decay),
            ("backbone_bias", 2.0, 0.0),
            ("head_weight", head_mult, weight_decay),
            ("head_bias", 2.0 * head_mult, 0.0),
        )
        buckets: dict[str, list[nn.Parameter]] = {name: [] for name, _, _ in spec}
        for name, param in self.named_parameters():
            if param.requires_grad:
                buckets[_group_of(name)].append(param)
        return [
            {"name": name, "params": buckets[name], "lr": lr * mult, "lr_mult": mult, "weight_decay": decay}
            for name, mult, decay in spec
        ]


def _group_of(param_name: str) -> str:
    part = "head" if param_name.startswith(_HEAD_PREFIX) else "backbone"
    kind = "bias" if param_name.endswith(".bias") else "weight"
    return f"{part}_{kind}"


__all__ = [
    "FEATURE_NAMES",
    "FeatureInfo",
    "ResBlock",
    "ResBlockBottleneck",
    "ResNet38",
    "ResNet38Classifier",
    "scaled",
]
