"""Reference networks and helpers for tests/unit/test_oracles.py, written from WSSS-Tissue's code.

Nothing here imports ``wsss``: these are the independent sides of the oracle tests.

* :class:`RefNetCAM` — ResNet38 + head with the module names, registration order and forward of
  the reference's ``network/resnet38d.py`` (``ResBlock``, ``ResBlock_bot``, ``Net``) and
  ``network/resnet38_cls.py`` (``Net_CAM``), every channel count divided by ``divisor``.
* :func:`reference_gradcam` — one image, one class, one layer, as ``tool/gradcam.py``'s
  ``ModelOutputs`` + ``GradCam`` compute it.
* :func:`resize_bilinear` — ``cv2.resize(..., INTER_LINEAR)`` (half-pixel centres) from its definition.
* :func:`reference_deeplab_shapes` / :func:`reference_deeplab_forward` — the state-dict names and
  shapes of the reference's ``DeepLab(backbone='resnet', output_stride=16)`` (``network/deeplab.py``,
  ``aspp.py``, ``decoder.py``, ``backbone/resnet.py``) and its eval-mode forward written with
  ``F.conv2d`` and BatchNorm arithmetic on those named tensors.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

# --------------------------------------------------------------------------- ResNet38 (stage 1)


class RefResBlock(nn.Module):
    def __init__(self, cin, cmid, cout, stride=1, first_dilation=None, dilation=1):
        super().__init__()
        self.same_shape = cin == cout and stride == 1
        first_dilation = dilation if first_dilation is None else first_dilation
        self.bn_branch2a = nn.BatchNorm2d(cin)
        self.conv_branch2a = nn.Conv2d(cin, cmid, 3, stride, padding=first_dilation, dilation=first_dilation,
                                       bias=False)
        self.bn_branch2b1 = nn.BatchNorm2d(cmid)
        self.conv_branch2b1 = nn.Conv2d(cmid, cout, 3, padding=dilation, dilation=dilation, bias=False)
        if not self.same_shape:
            self.conv_branch1 = nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x):
        branch2 = F.relu(self.bn_branch2a(x))
        branch1 = x if self.same_shape else self.conv_branch1(branch2)
        branch2 = self.conv_branch2a(branch2)
        branch2 = self.conv_branch2b1(F.relu(self.bn_branch2b1(branch2)))
        return branch1 + branch2


class RefResBlockBot(nn.Module):
    def __init__(self, cin, cout, stride=1, dilation=1, dropout=0.0):
        super().__init__()
        self.bn_branch2a = nn.BatchNorm2d(cin)
        self.conv_branch2a = nn.Conv2d(cin, cout // 4, 1, stride, bias=False)
        self.bn_branch2b1 = nn.BatchNorm2d(cout // 4)
        self.dropout_2b1 = nn.Dropout2d(dropout)
        self.conv_branch2b1 = nn.Conv2d(cout // 4, cout // 2, 3, padding=dilation, dilation=dilation, bias=False)
        self.bn_branch2b2 = nn.BatchNorm2d(cout // 2)
        self.dropout_2b2 = nn.Dropout2d(dropout)
        self.conv_branch2b2 = nn.Conv2d(cout // 2, cout, 1, bias=False)
        self.conv_branch1 = nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x):
        branch2 = F.relu(self.bn_branch2a(x))
        branch1 = self.conv_branch1(branch2)
        branch2 = self.conv_branch2a(branch2)
        branch2 = self.conv_branch2b1(self.dropout_2b1(F.relu(self.bn_branch2b1(branch2))))
        branch2 = self.conv_branch2b2(self.dropout_2b2(F.relu(self.bn_branch2b2(branch2))))
        return branch1 + branch2


class RefNetCAM(nn.Module):
    """The reference's ``Net_CAM`` with every channel count divided by ``divisor``.

    Modules are registered in the reference's order (``conv1a`` … ``bn7``, ``dropout7``, ``pool``,
    ``fc8``): its Grad-CAM runs them one after the other in that order.
    """

    def __init__(self, n_class: int, divisor: int = 8):
        super().__init__()

        def c(n):
            return n // divisor

        self.conv1a = nn.Conv2d(3, c(64), 3, padding=1, bias=False)
        self.b2 = RefResBlock(c(64), c(128), c(128), stride=2)
        self.b2_1 = RefResBlock(c(128), c(128), c(128))
        self.b2_2 = RefResBlock(c(128), c(128), c(128))
        self.b3 = RefResBlock(c(128), c(256), c(256), stride=2)
        self.b3_1 = RefResBlock(c(256), c(256), c(256))
        self.b3_2 = RefResBlock(c(256), c(256), c(256))
        self.b4 = RefResBlock(c(256), c(512), c(512), stride=2)
        self.b4_1 = RefResBlock(c(512), c(512), c(512))
        self.b4_2 = RefResBlock(c(512), c(512), c(512))
        self.b4_3 = RefResBlock(c(512), c(512), c(512))
        self.b4_4 = RefResBlock(c(512), c(512), c(512))
        self.b4_5 = RefResBlock(c(512), c(512), c(512))
        self.b5 = RefResBlock(c(512), c(512), c(1024), stride=1, first_dilation=1, dilation=2)
        self.b5_1 = RefResBlock(c(1024), c(512), c(1024), dilation=2)
        self.b5_2 = RefResBlock(c(1024), c(512), c(1024), dilation=2)
        self.b6 = RefResBlockBot(c(1024), c(2048), stride=1, dilation=4, dropout=0.3)
        self.b7 = RefResBlockBot(c(2048), c(4096), dilation=4, dropout=0.5)
        self.bn7 = nn.BatchNorm2d(c(4096))
        self.dropout7 = nn.Dropout2d(0.5)
        self.pool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc8 = nn.Conv2d(c(4096), n_class, 1, bias=False)


def reference_gradcam(net: RefNetCAM, image: Tensor, layer: str, cls: int) -> np.ndarray:
    """Grad-CAM of one image (1, 3, H, W) for one class at one layer, as the reference computes it.

    ``ModelOutputs``: run the modules in order; after ``bn7`` apply ReLU; flatten after ``fc8``;
    keep the chosen module's output (for ``bn7``: after the ReLU) and its gradient. ``GradCam``:
    backpropagate ``Σ one_hot · output`` (= logit_cls), ``weights = mean over (h, w)`` of the
    gradient, ``cam = Σ_k weights_k · A_k`` (no ReLU). Returns the (h, w) map, not resized.
    """
    x = image
    target = None
    for name, module in net._modules.items():
        x = module(x)
        if name == "bn7":
            x = F.relu(x)
        if name == "fc8":
            x = x.view(x.size(0), -1)
        if name == layer:
            target = x
            target.retain_grad()
    one_hot = torch.zeros_like(x)
    one_hot[0, cls] = 1
    net.zero_grad()
    torch.sum(one_hot * x).backward()
    grads = target.grad.detach().numpy()[0]
    activations = target.detach().numpy()[0]
    weights = grads.mean(axis=(1, 2))
    cam = np.zeros(activations.shape[1:], dtype=activations.dtype)
    for k, w in enumerate(weights):
        cam += w * activations[k]
    return cam


def resize_bilinear(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(h, w) → (H, W) bilinear with half-pixel centres (cv2.INTER_LINEAR; no antialiasing).

    Output pixel ``d`` samples source position ``(d + 0.5) · in/out − 0.5``, clamped to the first
    and last source pixel.
    """

    def taps(n_in: int, n_out: int):
        pos = np.maximum((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0.0)
        lo = np.minimum(np.floor(pos).astype(int), n_in - 1)
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, pos - lo

    r0, r1, fr = taps(image.shape[0], size[0])
    c0, c1, fc = taps(image.shape[1], size[1])
    rows = image[r0] * (1 - fr)[:, None] + image[r1] * fr[:, None]
    return rows[:, c0] * (1 - fc)[None, :] + rows[:, c1] * fc[None, :]


# --------------------------------------------------------------------------- DeepLab v3+ (stage 2)

BN_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
RESNET101_BLOCKS = (3, 4, 23, 3)
# backbone/resnet.py at output_stride 16: strides [1, 2, 2, 1], dilations [1, 1, 1, 2];
# layer4 is the multi-grid unit: block i has dilation blocks[i] · 2 with blocks = [1, 2, 4].
OS16_STRIDES = (1, 2, 2, 1)
OS16_DILATIONS = ((1, 1, 1), (1, 1, 1, 1), (1,) * 23, (2, 4, 8))
ASPP_DILATIONS = (1, 6, 12, 18)


def _bn_shapes(prefix: str, channels: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.{k}": (() if k == "num_batches_tracked" else (channels,)) for k in BN_KEYS}


def reference_deeplab_shapes(num_classes: int = 4) -> dict[str, tuple[int, ...]]:
    """Every key of the reference ``DeepLab('resnet', 16, num_classes).state_dict()`` and its shape."""
    shapes: dict[str, tuple[int, ...]] = {"backbone.conv1.weight": (64, 3, 7, 7), **_bn_shapes("backbone.bn1", 64)}
    inplanes = 64
    for layer, (planes, blocks) in enumerate(zip((64, 128, 256, 512), RESNET101_BLOCKS), start=1):
        for j in range(blocks):
            p = f"backbone.layer{layer}.{j}"
            shapes[f"{p}.conv1.weight"] = (planes, inplanes, 1, 1)
            shapes.update(_bn_shapes(f"{p}.bn1", planes))
            shapes[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
            shapes.update(_bn_shapes(f"{p}.bn2", planes))
            shapes[f"{p}.conv3.weight"] = (planes * 4, planes, 1, 1)
            shapes.update(_bn_shapes(f"{p}.bn3", planes * 4))
            if j == 0:  # stride != 1 or inplanes != planes * 4 holds for the first block of every layer
                shapes[f"{p}.downsample.0.weight"] = (planes * 4, inplanes, 1, 1)
                shapes.update(_bn_shapes(f"{p}.downsample.1", planes * 4))
            inplanes = planes * 4
    for k, d in enumerate(ASPP_DILATIONS, start=1):
        shapes[f"aspp.aspp{k}.atrous_conv.weight"] = (256, 2048, 1, 1) if d == 1 else (256, 2048, 3, 3)
        shapes.update(_bn_shapes(f"aspp.aspp{k}.bn", 256))
    shapes["aspp.global_avg_pool.1.weight"] = (256, 2048, 1, 1)
    shapes.update(_bn_shapes("aspp.global_avg_pool.2", 256))
    shapes["aspp.conv1.weight"] = (256, 1280, 1, 1)
    shapes.update(_bn_shapes("aspp.bn1", 256))
    shapes["decoder.conv1.weight"] = (48, 256, 1, 1)
    shapes.update(_bn_shapes("decoder.bn1", 48))
    shapes["decoder.last_conv.0.weight"] = (256, 304, 3, 3)
    shapes.update(_bn_shapes("decoder.last_conv.1", 256))
    shapes["decoder.last_conv.4.weight"] = (256, 256, 3, 3)
    shapes.update(_bn_shapes("decoder.last_conv.5", 256))
    shapes["decoder.last_conv.8.weight"] = (num_classes, 256, 1, 1)
    shapes["decoder.last_conv.8.bias"] = (num_classes,)
    return shapes


def random_reference_state(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, Tensor]:
    """Distinct random values for every key: He-scaled conv weights, BatchNorm with non-trivial
    statistics (positive variances) and small residual-branch scales so activations stay finite."""
    g = torch.Generator().manual_seed(seed)
    state: dict[str, Tensor] = {}
    for i, (name, shape) in enumerate(shapes.items()):
        if name.endswith("num_batches_tracked"):
            state[name] = torch.tensor(1000 + i, dtype=torch.long)
        elif name.endswith("running_var"):
            state[name] = torch.rand(shape, generator=g) + 0.5
        elif name.endswith("running_mean"):
            state[name] = torch.randn(shape, generator=g) * 0.1
        elif len(shape) == 4:
            fan_in = shape[1] * shape[2] * shape[3]
            state[name] = torch.randn(shape, generator=g) * (2.0 / fan_in) ** 0.5
        elif name.endswith(".bn3.weight"):
            state[name] = torch.rand(shape, generator=g) * 0.2 + 0.1
        elif name.endswith(".weight"):
            state[name] = torch.rand(shape, generator=g) * 0.5 + 0.75
        else:  # BatchNorm and classifier biases
            state[name] = torch.randn(shape, generator=g) * 0.1
    return state


def _bn(x: Tensor, s: dict, prefix: str, eps: float = 1e-5) -> Tensor:
    """Eval-mode BatchNorm: (x − running_mean) / sqrt(running_var + eps) · weight + bias."""

    def v(k):
        return s[f"{prefix}.{k}"].view(1, -1, 1, 1)

    return (x - v("running_mean")) / torch.sqrt(v("running_var") + eps) * v("weight") + v("bias")


def _bottleneck(x: Tensor, s: dict, p: str, stride: int, dilation: int) -> Tensor:
    out = F.relu(_bn(F.conv2d(x, s[f"{p}.conv1.weight"]), s, f"{p}.bn1"))
    out = F.relu(_bn(F.conv2d(out, s[f"{p}.conv2.weight"], stride=stride, padding=dilation, dilation=dilation),
                     s, f"{p}.bn2"))
    out = _bn(F.conv2d(out, s[f"{p}.conv3.weight"]), s, f"{p}.bn3")
    if f"{p}.downsample.0.weight" in s:
        x = _bn(F.conv2d(x, s[f"{p}.downsample.0.weight"], stride=stride), s, f"{p}.downsample.1")
    return F.relu(out + x)


def reference_deeplab_forward(s: dict[str, Tensor], image: Tensor) -> Tensor:
    """The reference's ``DeepLab.forward`` in eval mode (dropout off), from its named tensors."""
    x = F.relu(_bn(F.conv2d(image, s["backbone.conv1.weight"], stride=2, padding=3), s, "backbone.bn1"))
    x = F.max_pool2d(x, 3, stride=2, padding=1)
    low_level = None
    for layer, (blocks, stride, dilations) in enumerate(zip(RESNET101_BLOCKS, OS16_STRIDES, OS16_DILATIONS), 1):
        for j in range(blocks):
            x = _bottleneck(x, s, f"backbone.layer{layer}.{j}", stride if j == 0 else 1, dilations[j])
        if layer == 1:
            low_level = x
    branches = []
    for k, d in enumerate(ASPP_DILATIONS, start=1):
        conv = F.conv2d(x, s[f"aspp.aspp{k}.atrous_conv.weight"], padding=0 if d == 1 else d, dilation=d)
        branches.append(F.relu(_bn(conv, s, f"aspp.aspp{k}.bn")))
    pooled = F.relu(_bn(F.conv2d(x.mean(dim=(2, 3), keepdim=True), s["aspp.global_avg_pool.1.weight"]),
                        s, "aspp.global_avg_pool.2"))
    branches.append(F.interpolate(pooled, size=x.shape[2:], mode="bilinear", align_corners=True))
    x = F.relu(_bn(F.conv2d(torch.cat(branches, dim=1), s["aspp.conv1.weight"]), s, "aspp.bn1"))
    low = F.relu(_bn(F.conv2d(low_level, s["decoder.conv1.weight"]), s, "decoder.bn1"))
    x = F.interpolate(x, size=low.shape[2:], mode="bilinear", align_corners=True)
    x = torch.cat((x, low), dim=1)
    x = F.relu(_bn(F.conv2d(x, s["decoder.last_conv.0.weight"], padding=1), s, "decoder.last_conv.1"))
    x = F.relu(_bn(F.conv2d(x, s["decoder.last_conv.4.weight"], padding=1), s, "decoder.last_conv.5"))
    x = F.conv2d(x, s["decoder.last_conv.8.weight"], s["decoder.last_conv.8.bias"])
    return F.interpolate(x, size=image.shape[2:], mode="bilinear", align_corners=True)


# The reference's ASPP and decoder names (WSSS-Tissue network/aspp.py, decoder.py) and ours.
BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
REFERENCE_TO_OURS = {
    **{f"aspp.aspp{k}.atrous_conv.weight": f"aspp.convs.{k - 1}.0.weight" for k in (1, 2, 3, 4)},
    **{f"aspp.aspp{k}.bn.{p}": f"aspp.convs.{k - 1}.1.{p}" for k in (1, 2, 3, 4) for p in BN},
    "aspp.global_avg_pool.1.weight": "aspp.convs.4.1.weight",
    **{f"aspp.global_avg_pool.2.{p}": f"aspp.convs.4.2.{p}" for p in BN},
    "aspp.conv1.weight": "aspp.project.0.weight",
    **{f"aspp.bn1.{p}": f"aspp.project.1.{p}" for p in BN},
    "decoder.conv1.weight": "decoder.reduce.0.weight",
    **{f"decoder.bn1.{p}": f"decoder.reduce.1.{p}" for p in BN},
    "decoder.last_conv.0.weight": "decoder.fuse.0.weight",
    **{f"decoder.last_conv.1.{p}": f"decoder.fuse.1.{p}" for p in BN},
    "decoder.last_conv.4.weight": "decoder.fuse.4.weight",
    **{f"decoder.last_conv.5.{p}": f"decoder.fuse.5.{p}" for p in BN},
    "decoder.last_conv.8.weight": "decoder.classifier.weight",
    "decoder.last_conv.8.bias": "decoder.classifier.bias",
}
