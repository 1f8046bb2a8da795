"""ResNet38 backbone and stage-1 classifier: PSA names and shapes, features, CAMs, groups, freezing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from wsss.cam.pda import pda_attention
from wsss.models.resnet38 import FEATURE_NAMES, ResNet38Classifier, scaled

NUM_CLASSES = 4

# PSA's network/resnet38d.py, written out by hand: block -> (in, mid, out, has 1x1 projection).
_BASIC = {
    "b2": (64, 128, 128, True), "b2_1": (128, 128, 128, False), "b2_2": (128, 128, 128, False),
    "b3": (128, 256, 256, True), "b3_1": (256, 256, 256, False), "b3_2": (256, 256, 256, False),
    "b4": (256, 512, 512, True),
    **{f"b4_{i}": (512, 512, 512, False) for i in range(1, 6)},
    "b5": (512, 512, 1024, True), "b5_1": (1024, 512, 1024, False), "b5_2": (1024, 512, 1024, False),
}
# bottleneck -> (in, out): 1x1 in->out/4, 3x3 out/4->out/2, 1x1 out/2->out, projection in->out.
_BOTTLENECK = {"b6": (1024, 2048), "b7": (2048, 4096)}


def _bn(prefix: str, channels: int) -> dict[str, tuple[int, ...]]:
    return {
        f"{prefix}.weight": (channels,),
        f"{prefix}.bias": (channels,),
        f"{prefix}.running_mean": (channels,),
        f"{prefix}.running_var": (channels,),
        f"{prefix}.num_batches_tracked": (),
    }


def psa_state_shapes(num_classes: int) -> dict[str, tuple[int, ...]]:
    """Every state-dict entry of WSSS-Tissue's resnet38_cls.Net with its shape."""
    shapes: dict[str, tuple[int, ...]] = {"conv1a.weight": (64, 3, 3, 3)}
    for name, (cin, mid, cout, projection) in _BASIC.items():
        shapes |= _bn(f"{name}.bn_branch2a", cin)
        shapes[f"{name}.conv_branch2a.weight"] = (mid, cin, 3, 3)
        shapes |= _bn(f"{name}.bn_branch2b1", mid)
        shapes[f"{name}.conv_branch2b1.weight"] = (cout, mid, 3, 3)
        if projection:
            shapes[f"{name}.conv_branch1.weight"] = (cout, cin, 1, 1)
    for name, (cin, cout) in _BOTTLENECK.items():
        shapes |= _bn(f"{name}.bn_branch2a", cin)
        shapes[f"{name}.conv_branch2a.weight"] = (cout // 4, cin, 1, 1)
        shapes |= _bn(f"{name}.bn_branch2b1", cout // 4)
        shapes[f"{name}.conv_branch2b1.weight"] = (cout // 2, cout // 4, 3, 3)
        shapes |= _bn(f"{name}.bn_branch2b2", cout // 2)
        shapes[f"{name}.conv_branch2b2.weight"] = (cout, cout // 2, 1, 1)
        shapes[f"{name}.conv_branch1.weight"] = (cout, cin, 1, 1)
    shapes |= _bn("bn7", 4096)
    shapes["fc8.weight"] = (num_classes, 4096, 1, 1)
    return shapes


@pytest.fixture(scope="module")
def full_width_meta() -> ResNet38Classifier:
    # The meta device allocates nothing, so checking the 105M-parameter model costs milliseconds.
    with torch.device("meta"):
        return ResNet38Classifier(NUM_CLASSES)


@pytest.fixture
def thin() -> ResNet38Classifier:
    torch.manual_seed(0)
    return ResNet38Classifier(NUM_CLASSES, width=0.125)


def test_full_width_names_and_shapes_match_psa(full_width_meta):
    got = {k: tuple(v.shape) for k, v in full_width_meta.state_dict().items()}
    assert got == psa_state_shapes(NUM_CLASSES)


@pytest.mark.parametrize(
    ("name", "shape"),
    [
        ("b4_5.conv_branch2a.weight", (512, 512, 3, 3)),
        ("b5.conv_branch1.weight", (1024, 512, 1, 1)),
        ("b6.conv_branch2a.weight", (512, 1024, 1, 1)),
        ("b7.conv_branch2b2.weight", (4096, 2048, 1, 1)),
        ("bn7.weight", (4096,)),
        ("fc8.weight", (NUM_CLASSES, 4096, 1, 1)),
    ],
)
def test_full_width_spot_shapes(full_width_meta, name, shape):
    assert tuple(full_width_meta.state_dict()[name].shape) == shape


def test_dilations_and_strides_follow_psa(full_width_meta):
    m = full_width_meta
    assert m.b2.conv_branch2a.stride == (2, 2) and m.b4.conv_branch2a.stride == (2, 2)
    assert m.b5.conv_branch2a.dilation == (1, 1) and m.b5.conv_branch2b1.dilation == (2, 2)
    assert m.b5_2.conv_branch2a.dilation == (2, 2)
    assert m.b6.conv_branch2b1.dilation == (4, 4) and m.b7.conv_branch2b1.dilation == (4, 4)
    assert m.b6.dropout_2b1.p == 0.3 and m.b7.dropout_2b2.p == 0.5 and m.dropout7.p == 0.5
    assert m.fc8.bias is None


def test_thin_copy_keeps_names(full_width_meta, thin):
    assert list(thin.state_dict()) == list(full_width_meta.state_dict())
    assert thin.fc8.weight.shape == (NUM_CLASSES, 512, 1, 1)


@pytest.mark.parametrize(
    ("channels", "width", "expected"), [(64, 1.0, 64), (64, 0.125, 8), (64, 0.01, 8), (512, 0.3, 152)]
)
def test_scaled_rounds_to_multiple_of_8(channels, width, expected):
    assert scaled(channels, width) == expected


def test_features_have_stride_8_and_declared_channels(thin):
    x = torch.rand(2, 3, 64, 48)
    feats = thin.eval().forward_features(x)
    assert tuple(feats) == FEATURE_NAMES
    for info in thin.feature_info:
        assert feats[info.name].shape == (2, info.channels, 64 // info.stride, 48 // info.stride)
    assert [i.channels for i in thin.feature_info] == [64, 128, 512]
    assert (feats["bn7"] >= 0).all()


def test_cams_equal_relu_conv_with_fc8(thin):
    x = torch.rand(1, 3, 64, 64)
    thin.eval()
    with torch.no_grad():
        expected = F.relu(F.conv2d(thin.forward_features(x)["bn7"], thin.fc8.weight))
        assert torch.allclose(thin.cams(x), expected)
        cams, logits = thin.cams_and_logits(x)
        assert torch.allclose(cams, expected) and torch.allclose(logits, thin(x))


def test_forward_is_head_of_features_with_and_without_pda(thin):
    x = torch.rand(2, 3, 64, 64)
    thin.eval()
    with torch.no_grad():
        bn7 = thin.forward_features(x)["bn7"]
        pooled_logits = F.conv2d(bn7.mean(dim=(2, 3), keepdim=True), thin.fc8.weight).flatten(1)
        assert torch.allclose(thin(x), pooled_logits, atol=1e-5)
        attention = pda_attention(bn7, thin.fc8.weight, 0.8)
        assert torch.allclose(thin(x, pda_gamma=0.8), thin.forward_head(bn7, attention), atol=1e-5)
        assert not torch.allclose(thin(x, pda_gamma=0.8), thin(x))


def _group(groups: list[dict], name: str) -> dict:
    return next(g for g in groups if g["name"] == name)


def test_param_groups_cover_every_trainable_parameter_once(thin):
    groups = thin.param_groups(lr=0.01, weight_decay=5e-4)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in thin.parameters() if p.requires_grad}
    assert [(g["name"], g["lr"], g["weight_decay"]) for g in groups] == [
        ("backbone_weight", pytest.approx(0.01), 5e-4),
        ("backbone_bias", pytest.approx(0.02), 0.0),
        ("head_weight", pytest.approx(0.1), 5e-4),
        ("head_bias", pytest.approx(0.2), 0.0),
    ]
    names = {id(p): n for n, p in thin.named_parameters()}
    assert [names[id(p)] for p in _group(groups, "head_weight")["params"]] == ["fc8.weight"]
    assert _group(groups, "head_bias")["params"] == []
    backbone_bias = {names[id(p)] for p in _group(groups, "backbone_bias")["params"]}
    assert "bn7.bias" in backbone_bias and all(n.endswith(".bias") for n in backbone_bias)
    assert "b3.bn_branch2a.weight" in {names[id(p)] for p in _group(groups, "backbone_weight")["params"]}
    torch.optim.SGD(groups, lr=0.01, momentum=0.9)  # accepts the groups, the empty one included
    # the cpu preset trains the head at the trunk's rate (random init: nothing to fine-tune)
    same = thin.param_groups(lr=0.01, weight_decay=5e-4, head_mult=1.0)
    assert [g["lr"] for g in same] == pytest.approx([0.01, 0.02, 0.01, 0.02])


def test_random_init_freezes_nothing(thin):
    thin.train()
    assert all(p.requires_grad for p in thin.parameters())
    assert all(m.training for m in thin.modules())
    assert not thin.is_frozen_pretrained


def test_freeze_pretrained_policy(thin):
    thin.freeze_pretrained()
    thin.train()
    for name, param in thin.named_parameters():
        in_stem = name.split(".")[0] in {"conv1a", "b2", "b2_1", "b2_2"}
        frozen = in_stem or ".bn" in name or name.startswith("bn7")
        assert param.requires_grad is not frozen, name
    for module in thin.modules():
        if isinstance(module, nn.BatchNorm2d):
            assert not module.training
    assert thin.dropout7.training and thin.b7.dropout_2b1.training
    groups = thin.param_groups(lr=0.01, weight_decay=5e-4)
    assert all(p.requires_grad for g in groups for p in g["params"])
    assert _group(groups, "backbone_bias")["params"] == []  # only BN had biases


def test_frozen_batchnorm_statistics_stay_fixed_in_training(thin):
    thin.freeze_pretrained()
    thin.train()
    before = thin.b4.bn_branch2a.running_mean.clone()
    thin(torch.rand(2, 3, 32, 32))
    assert torch.equal(thin.b4.bn_branch2a.running_mean, before)
