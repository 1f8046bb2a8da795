"""MXNet .params reading (every record version), PSA renaming and stage-1 weight loading."""

from __future__ import annotations

import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from wsss.errors import WsssError
from wsss.models.resnet38 import ResNet38Classifier
from wsss.models.weights import (
    LIST_MAGIC,
    V1_MAGIC,
    V2_MAGIC,
    V3_MAGIC,
    load_stage1_weights,
    mxnet_to_psa_names,
    read_mxnet_params,
    write_mxnet_params,
)

WIDTH = 0.125
_BN_MX = {"weight": "gamma", "bias": "beta", "running_mean": "moving_mean", "running_var": "moving_var"}


def mxnet_name(psa_name: str) -> str:
    """The name the ResNet38 ImageNet .params file uses for a PSA parameter (inverse of the map)."""
    if psa_name == "conv1a.weight":
        return "arg:conv1a_weight"
    if psa_name.startswith("bn7."):
        param = psa_name.split(".")[1]
        return f"{'aux' if 'running' in param else 'arg'}:bn7_{_BN_MX[param]}"
    module, layer, param = psa_name.split(".")
    stage, block = re.fullmatch(r"b(\d)(?:_(\d+))?", module).groups()
    block = "a" if block is None else f"b{block}"
    kind, branch = layer.split("_", 1)
    if kind == "conv":
        return f"arg:res{stage}{block}_{branch}_weight"
    return f"{'aux' if 'running' in param else 'arg'}:bn{stage}{block}_{branch}_{_BN_MX[param]}"


def imagenet_like_arrays(model: torch.nn.Module, seed: int = 0) -> dict[str, np.ndarray]:
    """Random arrays for every backbone tensor, named as in the real file, plus the ImageNet head."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for name, tensor in model.state_dict().items():
        if name.endswith("num_batches_tracked") or name.startswith("fc8"):
            continue
        arrays[mxnet_name(name)] = rng.standard_normal(tuple(tensor.shape)).astype(np.float32)
    arrays["arg:linear1000_weight"] = rng.standard_normal((1000, 512)).astype(np.float32)
    arrays["arg:linear1000_bias"] = np.zeros(1000, np.float32)
    return arrays


def _list_file(records: list[bytes], names: list[str]) -> bytes:
    body = struct.pack("<QQQ", LIST_MAGIC, 0, len(records)) + b"".join(records)
    tail = struct.pack("<Q", len(names)) + b"".join(struct.pack("<Q", len(n)) + n.encode() for n in names)
    return body + tail


def test_mxnet_names_map_the_psa_way():
    arrays = {
        "res4b3_branch2a_weight": np.zeros(1, np.float32),
        "arg:res2a_branch1_weight": np.zeros(1, np.float32),
        "bn2a_branch2a_gamma": np.zeros(1, np.float32),
        "bn5b2_branch2b1_beta": np.zeros(1, np.float32),
        "aux:bn6a_branch2b2_moving_mean": np.zeros(1, np.float32),
        "aux:bn7_moving_var": np.zeros(1, np.float32),
        "conv1a_weight": np.zeros(1, np.float32),
        "linear1000_weight": np.zeros(1, np.float32),
        "something_else": np.zeros(1, np.float32),
    }
    assert sorted(mxnet_to_psa_names(arrays)) == sorted([
        "b4_3.conv_branch2a.weight",
        "b2.conv_branch1.weight",
        "b2.bn_branch2a.weight",
        "b5_2.bn_branch2b1.bias",
        "b6.bn_branch2b2.running_mean",
        "bn7.running_var",
        "conv1a.weight",
        "something_else",
    ])


def test_imagenet_params_roundtrip_into_thin_model(tmp_path):
    model = ResNet38Classifier(4, width=WIDTH)
    arrays = imagenet_like_arrays(model)
    path = tmp_path / "ilsvrc-cls_rna-a1_cls1000_ep-0001.params"
    write_mxnet_params(path, arrays)
    read = read_mxnet_params(path)
    assert list(read) == list(arrays)
    assert all(np.array_equal(read[k], arrays[k]) for k in arrays)

    fc8_before = model.fc8.weight.detach().clone()
    report = load_stage1_weights(model, path)
    assert report.imagenet
    assert report.missing == ["fc8.weight"] and not report.unexpected and not report.shape_mismatch
    state = model.state_dict()
    for name in report.loaded:
        assert np.array_equal(state[name].numpy(), arrays[mxnet_name(name)]), name
    assert len(report.loaded) == len(arrays) - 2  # all but linear1000_{weight,bias}
    assert torch.equal(model.fc8.weight, fc8_before)
    assert f"Loaded {len(report.loaded)}/{len(report.loaded) + 1}" in report.summary()


@pytest.mark.parametrize("version", ["legacy", "v1", "v2", "v3"])
def test_writer_reader_roundtrip_every_version_and_dtype(tmp_path, version):
    rng = np.random.default_rng(1)
    arrays = {
        "f32": rng.standard_normal((2, 3)).astype(np.float32),
        "f64": rng.standard_normal(4),
        "f16": rng.standard_normal((1, 2, 1, 2)).astype(np.float16),
        "u8": np.arange(5, dtype=np.uint8),
        "i32": np.arange(-3, 3, dtype=np.int32).reshape(2, 3),
        "i8": np.array([-128, 127], np.int8),
        "i64": np.array([2**40], np.int64),
    }
    path = tmp_path / f"{version}.params"
    write_mxnet_params(path, arrays, version=version)
    read = read_mxnet_params(path)
    for name, array in arrays.items():
        assert read[name].dtype == array.dtype and np.array_equal(read[name], array), name


def test_hand_built_legacy_v1_v2_records(tmp_path):
    data = np.array([[1.5, -2.0, 3.25]], np.float32)
    payload = struct.pack("<iii", 1, 0, 0) + data.tobytes()  # cpu, device 0, float32
    legacy = struct.pack("<III", 2, 1, 3) + payload  # ndim 2 as the magic, u32 dims
    v1 = struct.pack("<Iiqq", V1_MAGIC, 2, 1, 3) + payload  # i32 ndim, i64 dims
    v2 = struct.pack("<Iiiqq", V2_MAGIC, 0, 2, 1, 3) + payload  # + storage type 0
    empty_v2 = struct.pack("<Iii", V2_MAGIC, 0, 0)  # ndim 0: nothing follows
    empty_legacy = struct.pack("<I", 0)
    scalar_v3 = struct.pack("<Iii", V3_MAGIC, 0, 0) + struct.pack("<iii", 1, 0, 6) + struct.pack("<q", 7)
    unknown_v3 = struct.pack("<Iii", V3_MAGIC, 0, -1)  # unknown shape: nothing follows
    path = tmp_path / "hand.params"
    names = ["legacy", "v1", "v2", "empty_v2", "empty_legacy", "scalar_v3", "unknown_v3"]
    path.write_bytes(_list_file([legacy, v1, v2, empty_v2, empty_legacy, scalar_v3, unknown_v3], names))
    read = read_mxnet_params(path)
    for name in ("legacy", "v1", "v2"):
        assert np.array_equal(read[name], data), name
    assert read["empty_v2"].size == 0 and read["empty_legacy"].size == 0 and read["unknown_v3"].size == 0
    assert read["scalar_v3"].shape == () and read["scalar_v3"] == 7


def test_truncated_params_file_is_a_user_error(tmp_path):
    path = tmp_path / "w.params"
    write_mxnet_params(path, {"conv1a_weight": np.ones((8, 3, 3, 3), np.float32)})
    raw = path.read_bytes()
    for cut in (4, 30, len(raw) // 2, len(raw) - 1):
        path.write_bytes(raw[:cut])
        with pytest.raises(WsssError, match="truncated"):
            read_mxnet_params(path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"PK\x03\x04 not params at all, really", "not an MXNet"),
        (_list_file([struct.pack("<Iii", V2_MAGIC, 1, 1)], ["x"]), "sparse"),
        (_list_file([struct.pack("<I", 0xDEADBEEF)], ["x"]), "corrupt"),
        (_list_file([struct.pack("<Iiqiii", V1_MAGIC, 1, 1, 1, 0, 99) + b"\0"], ["x"]), "dtype"),
        (_list_file([struct.pack("<I", 0)], []), "names"),
    ],
)
def test_corrupt_params_files_are_user_errors(tmp_path, content, message):
    path = tmp_path / "bad.params"
    path.write_bytes(content)
    with pytest.raises(WsssError, match=message):
        read_mxnet_params(path)


def test_renamed_params_file_is_recognised_by_its_header(tmp_path):
    model = ResNet38Classifier(4, width=WIDTH)
    path = tmp_path / "imagenet.bin"
    write_mxnet_params(path, imagenet_like_arrays(model), version="legacy")
    report = load_stage1_weights(model, path)
    assert report.imagenet and report.missing == ["fc8.weight"]


def test_missing_file_is_a_user_error(tmp_path):
    with pytest.raises(WsssError, match="not found"):
        load_stage1_weights(ResNet38Classifier(4, width=WIDTH), tmp_path / "nope.pth")


def test_dataparallel_state_dict_loads(tmp_path):
    torch.manual_seed(0)
    source = ResNet38Classifier(4, width=WIDTH)
    path = tmp_path / "stage1_checkpoint_trained_on_luad.pth"
    torch.save({f"module.{k}": v for k, v in source.state_dict().items()}, path)
    target = ResNet38Classifier(4, width=WIDTH)
    report = load_stage1_weights(target, path)
    assert not report.imagenet and not report.missing and not report.unexpected and not report.shape_mismatch
    for name, tensor in source.state_dict().items():
        assert torch.equal(target.state_dict()[name], tensor), name


def test_own_checkpoint_format_uses_model_entry(tmp_path):
    source = ResNet38Classifier(4, width=WIDTH)
    path = tmp_path / "ckpt.pth"
    torch.save({"model": source.state_dict(), "stage": 1, "epoch": 3, "class_names": ["a", "b"]}, path)
    report = load_stage1_weights(ResNet38Classifier(4, width=WIDTH), path)
    assert not report.missing and not report.unexpected
    torch.save({"model": source.state_dict(), "stage": 2}, path)
    with pytest.raises(WsssError, match="stage-2"):
        load_stage1_weights(ResNet38Classifier(4, width=WIDTH), path)


def test_wrong_shape_is_reported_not_loaded(tmp_path):
    path = tmp_path / "three_classes.pth"
    torch.save(ResNet38Classifier(3, width=WIDTH).state_dict(), path)
    target = ResNet38Classifier(4, width=WIDTH)
    fc8_before = target.fc8.weight.detach().clone()
    report = load_stage1_weights(target, path)
    assert report.shape_mismatch == [("fc8.weight", (4, 512, 1, 1), (3, 512, 1, 1))]
    assert "fc8.weight" not in report.loaded and "fc8.weight" not in report.missing
    assert torch.equal(target.fc8.weight, fc8_before)
    assert "Shape mismatch" in report.summary() and "fc8.weight" in report.summary()


def test_file_with_nothing_matching_is_rejected(tmp_path):
    path = tmp_path / "deeplab.pth"
    deeplab = {"backbone.conv1.weight": torch.zeros(64, 3, 7, 7), "decoder.last_conv.8.bias": torch.zeros(4)}
    torch.save(deeplab, path)
    with pytest.raises(WsssError, match="matches"):
        load_stage1_weights(ResNet38Classifier(4, width=WIDTH), path)


def test_unreadable_checkpoint_is_a_user_error(tmp_path):
    path = tmp_path / "garbage.pth"
    path.write_bytes(b"\x00not a torch file")
    with pytest.raises(WsssError, match="cannot read"):
        load_stage1_weights(ResNet38Classifier(4, width=WIDTH), path)
    params = Path(tmp_path / "short.params")
    params.write_bytes(b"\x12\x01")
    with pytest.raises(WsssError):
        load_stage1_weights(ResNet38Classifier(4, width=WIDTH), params)
