"""DeepLab v3+: shapes, dilations, and loading of reference / torchvision / our weights."""

import numpy as np
import pytest
import torch
import torchvision

from reference_nets import REFERENCE_TO_OURS
from wsss.errors import WsssError
from wsss.models.deeplab import DeepLabArch, DeepLabV3Plus, infer_arch, load_deeplab_weights, map_reference_keys


def tiny(backbone="resnet18", out_stride=16, classes=4, head=16) -> DeepLabV3Plus:
    torch.manual_seed(0)
    return DeepLabV3Plus(DeepLabArch(backbone, out_stride, classes, head))


@pytest.mark.parametrize("backbone,out_stride,low,high", [
    ("resnet18", 16, 64, 512), ("resnet18", 8, 64, 512), ("mobilenet_v3_large", 16, 24, 960),
])
def test_shapes(backbone, out_stride, low, high):
    model = tiny(backbone, out_stride).eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats["low_level"].shape == (2, low, 16, 16)
        assert feats["out"].shape == (2, high, 64 // out_stride, 64 // out_stride)
        assert model(x)["out"].shape == (2, 4, 64, 64)
        assert model(x, size=(80, 96))["out"].shape == (2, 4, 80, 96)


def dilations(layer):
    return [tuple(m.dilation[0] for m in block.modules()
                  if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)) for block in layer]


def test_multi_grid_dilations_match_the_reference():
    # Reference network/backbone/resnet.py: OS16 layer4 (2, 4, 8) with stride 1;
    # OS8 layer3 dilation 2 in every block, layer4 (4, 8, 16).
    r101 = DeepLabV3Plus(DeepLabArch("resnet101", 16, 4, 16)).backbone
    assert dilations(r101.layer4) == [(2,), (4,), (8,)]
    assert dilations(r101.layer3) == [(1,)] * 23
    assert r101.layer4[0].conv2.stride == (1, 1) and r101.layer4[0].downsample[0].stride == (1, 1)
    assert r101.layer3[0].conv2.stride == (2, 2)
    r50 = DeepLabV3Plus(DeepLabArch("resnet50", 8, 4, 16)).backbone
    assert dilations(r50.layer3) == [(2,)] * 6 and dilations(r50.layer4) == [(4,), (8,), (16,)]
    r18 = tiny().backbone  # BasicBlock: both 3×3 convs of block i use the block's grid dilation
    assert dilations(r18.layer4) == [(2, 2), (4, 4)]
    assert r18.layer4[0].conv1.stride == (1, 1) and r18.layer4[0].downsample[0].stride == (1, 1)


def test_bad_architectures_are_user_errors():
    with pytest.raises(WsssError, match="stride 16 only"):
        DeepLabArch("mobilenet_v3_large", 8)
    with pytest.raises(WsssError, match="unknown backbone"):
        DeepLabArch("vgg16")
    with pytest.raises(WsssError, match="16 or 8"):
        DeepLabArch("resnet18", 32)





def reference_state(model: DeepLabV3Plus, classes: int | None = None) -> tuple[dict, dict]:
    """A state dict with the reference's names and distinct values, and {reference name: our name}.

    The backbone keeps torchvision's names, as the reference's ResNet does. ``classes`` gives the
    head another class count.
    """
    ours = model.state_dict()
    names = {k: k for k in ours if k.startswith("backbone.")}
    names.update(REFERENCE_TO_OURS)
    assert set(names.values()) == set(ours), "the hand-written table covers every tensor of the model"
    state = {}
    for i, (ref, our) in enumerate(names.items()):
        shape = list(ours[our].shape)
        if classes is not None and our.startswith("decoder.classifier."):
            shape[0] = classes
        state[ref] = torch.full(shape, float(i + 1)).to(ours[our].dtype)
    return state, names


def test_reference_keys_land_where_they_should():
    # resnet50 with the reference's 256-channel head: the same shapes as its resnet101 bar depth.
    model = DeepLabV3Plus(DeepLabArch("resnet50", 16, 4, 256))
    state, names = reference_state(model)
    mapped = map_reference_keys({"module." + k: v for k, v in state.items()})
    assert set(mapped) == set(names.values())
    model.load_state_dict(mapped, strict=True)
    loaded = model.state_dict()
    for ref, our in names.items():
        assert torch.equal(loaded[our], state[ref]), (ref, our)


def test_reference_file_with_other_class_count_drops_the_head(tmp_path):
    model = tiny()
    head_before = model.decoder.classifier.weight.detach().clone()
    state, names = reference_state(model, classes=21)
    path = tmp_path / "deeplab-resnet.pth.tar"
    # as pytorch-deeplab-xception saves it: DataParallel names, numpy best_pred
    torch.save({"epoch": 50, "state_dict": {"module." + k: v for k, v in state.items()},
                "optimizer": {}, "best_pred": np.float64(0.78)}, path)
    report = load_deeplab_weights(model, path)
    assert {n for n, _, _ in report.shape_mismatch} == {"decoder.classifier.weight", "decoder.classifier.bias"}
    assert not report.missing and not report.unexpected
    assert torch.equal(model.decoder.classifier.weight, head_before)
    loaded = model.state_dict()
    for ref, our in names.items():
        if not our.startswith("decoder.classifier."):
            assert torch.equal(loaded[our], state[ref]), ref


def test_torchvision_imagenet_backbones_load(tmp_path):
    model = tiny()
    imagenet = torchvision.models.resnet18(weights=None).state_dict()
    torch.save(imagenet, tmp_path / "resnet18.pth")
    report = load_deeplab_weights(model, tmp_path / "resnet18.pth")
    assert not report.unexpected and not report.shape_mismatch  # fc.* dropped
    assert set(report.loaded) == {"backbone." + k for k in imagenet if not k.startswith("fc.")}
    assert all(n.startswith(("aspp.", "decoder.")) for n in report.missing)
    assert torch.equal(model.backbone.layer4[1].conv2.weight, imagenet["layer4.1.conv2.weight"])

    mobile = tiny("mobilenet_v3_large")
    weights = torchvision.models.mobilenet_v3_large(weights=None).state_dict()
    torch.save(weights, tmp_path / "mnv3.pth")
    report = load_deeplab_weights(mobile, tmp_path / "mnv3.pth")
    assert not report.unexpected and not report.shape_mismatch
    assert torch.equal(mobile.backbone["16"][0].weight, weights["features.16.0.weight"])


def test_our_names_and_checkpoints_pass_through(tmp_path):
    model = tiny()
    torch.save({"stage": 2, "model": model.state_dict()}, tmp_path / "ours.pth")
    other = DeepLabV3Plus(DeepLabArch("resnet18", 16, 4, 16))
    report = load_deeplab_weights(other, tmp_path / "ours.pth")
    assert not report.missing and not report.unexpected and not report.shape_mismatch
    torch.save({"stage": 1, "model": {}}, tmp_path / "s1.pth")
    with pytest.raises(WsssError, match="stage-1 checkpoint"):
        load_deeplab_weights(other, tmp_path / "s1.pth")
    torch.save({"conv1a.weight": torch.zeros(1)}, tmp_path / "r38.pth")
    with pytest.raises(WsssError, match="no tensor"):
        load_deeplab_weights(other, tmp_path / "r38.pth")


def test_infer_arch_from_weights():
    assert infer_arch(tiny().state_dict()) == DeepLabArch("resnet18", 16, 4, 16)
    assert infer_arch(tiny("mobilenet_v3_large", classes=3).state_dict()).backbone == "mobilenet_v3_large"
    with pytest.raises(WsssError, match="not a DeepLab"):
        infer_arch({"backbone.conv1a.weight": torch.zeros(1)})
