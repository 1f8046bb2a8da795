"""DeepLab v3+ for stage 2, assembled from torchvision pieces, and loading of its weights.

The network (Chen et al. 2018) as WSSS-Tissue uses it (``network/deeplab.py``)::

    backbone ──layer1 (stride 4)──────────────────────────▶ 1×1 → 48 ch, BN, ReLU ─┐
       └─────layer4 (stride 16 or 8)──▶ ASPP (1×1, three 3×3 atrous, image pool)    │
                                          → 1×1 256, BN, ReLU, dropout 0.5          │
                                          → bilinear ×4 ──────────────── concat ◀──┘
                                          → 3×3 256 BN ReLU dropout 0.5 → 3×3 256 BN ReLU dropout 0.1
                                          → 1×1 → C → bilinear to the input size

The backbone is torchvision's ResNet (or MobileNetV3) wrapped in ``IntermediateLayerGetter``, the
ASPP is torchvision's. At output stride 16 the reference's layer4 has stride 1 and "multi-grid"
dilations 2·(1, 2, 4) = (2, 4, 8); at output stride 8 layer3 has dilation 2 in every block and
layer4 4·(1, 2, 4). torchvision's ``replace_stride_with_dilation`` gives the first block of a
dilated stage the previous dilation instead, so the dilations are set block by block here: with the
same weights our network computes what the reference's does, and its checkpoints load through
:func:`map_reference_keys`. Upsampling uses ``align_corners=True`` like the reference.

Weights (``--init-weights``, :func:`load_deeplab_weights`): the reference's ``deeplab-resnet.pth.tar``
and published ``stage2_checkpoint_trained_on_*.pth`` (``{"state_dict": ...}``), a torchvision
ImageNet backbone state_dict (``conv1.weight``, ``layer1.0...``; ``fc.*`` dropped), a plain state
dict of this model, or one of our stage-2 checkpoints. Nothing is ever downloaded.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.segmentation.deeplabv3 import ASPP

from wsss.errors import WsssError
from wsss.models.weights import LoadReport, _load_matching
from wsss.runtime import full_precision

BACKBONES = ("resnet101", "resnet50", "resnet18", "mobilenet_v3_large")
OUT_STRIDES = (16, 8)
MULTI_GRID = (1, 2, 4)
ASPP_RATES = {16: (6, 12, 18), 8: (12, 24, 36)}
LOW_LEVEL_CHANNELS = 48

# The classifier's parameters: dropped from a weights file whose class count differs.
HEAD_PREFIX = "decoder.classifier."


@dataclass(frozen=True)
class DeepLabArch:
    """What is needed to rebuild the network; stored as ``arch`` in every stage-2 checkpoint.

    ``head_channels`` is the width of the ASPP and decoder convolutions (256 in the paper); CPU runs
    use fewer, since at 256 the decoder's two 3×3 convolutions at stride 4 cost more than a ResNet-18.
    """

    backbone: str = "resnet101"
    out_stride: int = 16
    num_classes: int = 4
    head_channels: int = 256

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONES:
            raise WsssError(f"unknown backbone {self.backbone!r}; choose one of {', '.join(BACKBONES)}")
        if self.out_stride not in OUT_STRIDES:
            raise WsssError(f"output stride must be 16 or 8, not {self.out_stride}")
        if self.backbone.startswith("mobilenet") and self.out_stride != 16:
            raise WsssError("mobilenet_v3_large supports output stride 16 only (torchvision's dilated variant)")
        if self.num_classes < 1 or self.head_channels < 1:
            raise WsssError("class count and head channels must be positive")

    def to_dict(self) -> dict:
        return {"name": "deeplabv3plus", **asdict(self)}

    @classmethod
    def from_dict(cls, d: Mapping) -> "DeepLabArch":
        return cls(d["backbone"], int(d["out_stride"]), int(d["num_classes"]), int(d.get("head_channels", 256)))


# --------------------------------------------------------------------------- backbones


def _set_dilations(layer: nn.Sequential, dilations: tuple[int, ...]) -> None:
    """Stride 1 for a ResNet stage and dilation ``dilations[i]`` in every 3×3 conv of block ``i``."""
    first = layer[0]
    if first.downsample is not None:
        first.downsample[0].stride = (1, 1)
    for block, dilation in zip(layer, dilations, strict=True):
        for conv in (m for m in block.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)):
            conv.stride = (1, 1)
            conv.dilation = (dilation, dilation)
            conv.padding = (dilation, dilation)


def _resnet(name: str, out_stride: int) -> tuple[nn.Module, int, int]:
    """(backbone returning ``low_level``/``out``, low-level channels, high-level channels)."""
    bottleneck = name != "resnet18"
    # BasicBlock refuses replace_stride_with_dilation; _set_dilations does the same job for it.
    replace = [False, out_stride == 8, True] if bottleneck else None
    net = getattr(torchvision.models, name)(weights=None, replace_stride_with_dilation=replace)
    if out_stride == 8:
        _set_dilations(net.layer3, (2,) * len(net.layer3))
    base = 2 if out_stride == 16 else 4
    _set_dilations(net.layer4, tuple(base * g for g in MULTI_GRID[: len(net.layer4)]))
    expansion = 4 if bottleneck else 1
    backbone = IntermediateLayerGetter(net, return_layers={"layer1": "low_level", "layer4": "out"})
    return backbone, 64 * expansion, 512 * expansion


def _mobilenet(out_stride: int) -> tuple[nn.Module, int, int]:
    """MobileNetV3-Large with its last stage dilated (output stride 16).

    Low-level features: the last block at stride 4 (24 channels, as the reference's MobileNetV2
    decoder input); high-level: the final 1×1 conv (960 channels), as torchvision's DeepLabV3.
    """
    features = torchvision.models.mobilenet_v3_large(weights=None, dilated=True).features
    # Blocks flagged _is_cn open a new stage (stride 2); index 0 is the stride-2 stem.
    stage_starts = [i for i, block in enumerate(features) if getattr(block, "_is_cn", False)]
    low = stage_starts[1] - 1  # last block before the stride-8 stage
    high = len(features) - 1
    backbone = IntermediateLayerGetter(features, return_layers={str(low): "low_level", str(high): "out"})
    return backbone, features[low].out_channels, features[high].out_channels


def build_backbone(name: str, out_stride: int) -> tuple[nn.Module, int, int]:
    if name == "mobilenet_v3_large":
        return _mobilenet(out_stride)
    return _resnet(name, out_stride)


# --------------------------------------------------------------------------- head


class Decoder(nn.Module):
    """DeepLab v3+ decoder: ASPP output (B, A, h, w) + low-level (B, L, 4h, 4w) → logits (B, C, 4h, 4w).

    The concatenation order (ASPP first) and the layer indices inside ``fuse`` follow the reference
    so that its ``decoder.last_conv.{0,1,4,5,8}`` weights map one to one.
    """

    def __init__(self, low_channels: int, aspp_channels: int, num_classes: int, channels: int = 256) -> None:
        super().__init__()
        self.reduce = nn.Sequential(
            nn.Conv2d(low_channels, LOW_LEVEL_CHANNELS, 1, bias=False),
            nn.BatchNorm2d(LOW_LEVEL_CHANNELS),
            nn.ReLU(),
        )
        self.fuse = nn.Sequential(
            nn.Conv2d(aspp_channels + LOW_LEVEL_CHANNELS, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            nn.Dropout(0.5),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            nn.Dropout(0.1),
        )
        self.classifier = nn.Conv2d(channels, num_classes, 1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, high: Tensor, low: Tensor) -> Tensor:
        low = self.reduce(low)
        high = F.interpolate(high, size=low.shape[-2:], mode="bilinear", align_corners=True)
        return self.classifier(self.fuse(torch.cat([high, low], dim=1)))


class DeepLabV3Plus(nn.Module):
    """DeepLab v3+ (see the module docstring). ``forward`` returns ``{"out": logits}``."""

    def __init__(self, arch: DeepLabArch) -> None:
        super().__init__()
        self.arch = arch
        self.backbone, low_channels, high_channels = build_backbone(arch.backbone, arch.out_stride)
        self.aspp = ASPP(high_channels, ASPP_RATES[arch.out_stride], arch.head_channels)
        for m in self.aspp.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
        self.decoder = Decoder(low_channels, arch.head_channels, arch.num_classes, arch.head_channels)

    @property
    def num_classes(self) -> int:
        return self.arch.num_classes

    def forward_features(self, x: Tensor) -> dict[str, Tensor]:
        """Image (B, 3, H, W) → ``low_level`` (B, L, H/4, W/4) and ``out`` (B, K, H/s, W/s)."""
        return dict(self.backbone(x))

    def forward(self, x: Tensor, size: tuple[int, int] | None = None) -> dict[str, Tensor]:
        """Image (B, 3, H, W) → ``{"out": logits (B, C, *size)}``; ``size`` defaults to (H, W).

        Asking for the mask's size directly saves a second interpolation when the model runs on
        resized inputs. Under bf16/fp16 autocast the logits are upsampled in float32: the argmax
        and the softmax near class boundaries must not depend on an 8-bit mantissa.
        """
        features = self.forward_features(x)
        logits = self.decoder(self.aspp(features["out"]), features["low_level"])
        size = tuple(x.shape[-2:]) if size is None else tuple(size)
        return {"out": F.interpolate(full_precision(logits), size=size, mode="bilinear", align_corners=True)}

    def param_groups(self, lr: float, head_lr_mult: float = 10.0) -> list[dict]:
        """SGD groups of the reference: backbone at ``lr``, ASPP and decoder at ``head_lr_mult · lr``."""
        backbone = [p for p in self.backbone.parameters() if p.requires_grad]
        head = [p for m in (self.aspp, self.decoder) for p in m.parameters() if p.requires_grad]
        return [{"params": backbone, "lr": lr}, {"params": head, "lr": lr * head_lr_mult}]


# --------------------------------------------------------------------------- reference key map

_REFERENCE_RULES: tuple[tuple[re.Pattern, object], ...] = tuple(
    (re.compile(pattern), rename)
    for pattern, rename in (
        # WSSS-Tissue network/aspp.py: aspp1 is the 1×1 branch, aspp2..4 the atrous ones.
        (r"^aspp\.aspp([1-4])\.atrous_conv\.(.+)$", lambda k, rest: f"aspp.convs.{int(k) - 1}.0.{rest}"),
        (r"^aspp\.aspp([1-4])\.bn\.(.+)$", lambda k, rest: f"aspp.convs.{int(k) - 1}.1.{rest}"),
        # global_avg_pool = (AdaptiveAvgPool2d, Conv2d, BN, ReLU), as torchvision's ASPPPooling.
        (r"^aspp\.global_avg_pool\.([12])\.(.+)$", lambda i, rest: f"aspp.convs.4.{i}.{rest}"),
        (r"^aspp\.conv1\.(.+)$", lambda rest: f"aspp.project.0.{rest}"),
        (r"^aspp\.bn1\.(.+)$", lambda rest: f"aspp.project.1.{rest}"),
        # network/decoder.py
        (r"^decoder\.conv1\.(.+)$", lambda rest: f"decoder.reduce.0.{rest}"),
        (r"^decoder\.bn1\.(.+)$", lambda rest: f"decoder.reduce.1.{rest}"),
        (r"^decoder\.last_conv\.([0145])\.(.+)$", lambda i, rest: f"decoder.fuse.{i}.{rest}"),
        (r"^decoder\.last_conv\.8\.(.+)$", lambda rest: f"decoder.classifier.{rest}"),
    )
)


def _reference_name(name: str) -> str:
    for pattern, rename in _REFERENCE_RULES:
        match = pattern.match(name)
        if match:
            return rename(*match.groups())
    return name


def map_reference_keys(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename a state dict onto :class:`DeepLabV3Plus` names (tensors untouched).

    * WSSS-Tissue / pytorch-deeplab-xception names: ``aspp.aspp1.atrous_conv.weight`` →
      ``aspp.convs.0.0.weight``, ``aspp.aspp2.bn.*`` → ``aspp.convs.1.1.*``,
      ``aspp.global_avg_pool.1.weight`` → ``aspp.convs.4.1.weight``, ``aspp.conv1`` / ``aspp.bn1`` →
      ``aspp.project.0`` / ``.1``, ``decoder.conv1`` / ``decoder.bn1`` → ``decoder.reduce.0`` / ``.1``,
      ``decoder.last_conv.{0,1,4,5}`` → ``decoder.fuse.{0,1,4,5}``, ``decoder.last_conv.8`` →
      ``decoder.classifier``; ``backbone.*`` is already torchvision's ResNet naming.
    * A bare torchvision ImageNet classifier: ``conv1.weight``, ``layer1.0.*`` → ``backbone.*``,
      MobileNetV3's ``features.N.*`` → ``backbone.N.*``; its ``fc.*`` / ``classifier.*`` are dropped.
    * ``module.`` prefixes (DataParallel, DDP) are stripped; our own names pass through unchanged.
    """
    out: dict[str, Tensor] = {}
    for name, tensor in state.items():
        name = name.removeprefix("module.")
        if name.startswith(("aspp.", "decoder.", "backbone.")):
            out[_reference_name(name)] = tensor
        elif name.startswith(("fc.", "classifier.")):
            continue
        elif name.startswith("features."):
            out["backbone." + name.removeprefix("features.")] = tensor
        else:
            out["backbone." + name] = tensor
    return out


# --------------------------------------------------------------------------- reading files


def _numpy_globals() -> list:
    """Numpy scalars found in older checkpoints (e.g. ``best_pred``), allowed under weights_only."""
    import numpy as np

    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import scalar
    dtypes = [getattr(np.dtypes, n) for n in ("Float64DType", "Float32DType", "Int64DType") if hasattr(np, "dtypes")]
    return [np.dtype, (scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar"), *dtypes]


def read_checkpoint(path: str | Path) -> dict:
    """:func:`wsss.runtime.load_checkpoint` (``weights_only``) that also accepts numpy scalars."""
    from wsss.runtime import load_checkpoint

    with torch.serialization.safe_globals(_numpy_globals()):
        return load_checkpoint(path)


def state_dict_of(obj: Mapping, path: str | Path) -> dict[str, Tensor]:
    """The model tensors of a loaded file: ours (``model``), the reference's (``state_dict``), or plain."""
    if "stage" in obj and obj["stage"] != 2:
        raise WsssError(f"{path} is a stage-{obj['stage']} checkpoint; a stage-2 checkpoint is needed here")
    for key in ("model", "state_dict"):
        if isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    state = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, Tensor)}
    if not state:
        raise WsssError(f"{path} holds no model tensors")
    return state


def load_deeplab_weights(model: DeepLabV3Plus, path: str | Path) -> LoadReport:
    """Load what fits from ``path`` into ``model`` (see the module docstring) and report the rest.

    A class head of another class count is dropped (listed as a shape mismatch). Raises WsssError
    when the file cannot be read or nothing at all matches.
    """
    path = Path(path)
    if not path.is_file():
        raise WsssError(f"weights file not found: {path}")
    state = map_reference_keys(state_dict_of(read_checkpoint(path), path))
    report = _load_matching(model, state, LoadReport(source=str(path), imagenet=False))
    if not report.loaded:
        raise WsssError(
            f"no tensor in {path} matches the DeepLab model ({len(report.unexpected)} unknown names, "
            f"{len(report.shape_mismatch)} shape mismatches); is it the right file?"
        )
    return report


def infer_arch(state: Mapping[str, Tensor], out_stride: int = 16) -> DeepLabArch:
    """The architecture of a plain (mapped) state dict: backbone from its layers, classes and head
    width from the classifier. The output stride leaves no trace in the weights: ``out_stride``."""
    head = state.get(HEAD_PREFIX + "weight")
    if head is None:
        raise WsssError("not a DeepLab v3+ state dict (no decoder.last_conv.8 / decoder.classifier weights)")
    if "backbone.layer1.0.conv1.weight" in state:
        if "backbone.layer1.0.conv3.weight" not in state:
            backbone = "resnet18"
        else:
            blocks = len({k.split(".")[2] for k in state if k.startswith("backbone.layer3.")})
            backbone = {6: "resnet50", 23: "resnet101"}.get(blocks)
            if backbone is None:
                raise WsssError(f"unsupported ResNet with {blocks} blocks in layer3")
    elif "backbone.0.0.weight" in state:
        backbone = "mobilenet_v3_large"
    else:
        raise WsssError("cannot tell the backbone of this DeepLab state dict")
    return DeepLabArch(backbone, out_stride, head.shape[0], head.shape[1])
