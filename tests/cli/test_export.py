"""`wsss export`: TorchScript and ONNX models with the input normalisation inside, the gate as a second
output, dynamic batch and size, a sidecar that says what they are; bad requests in one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import run_cli
from wsss.data.specs import LUAD
from wsss.runtime import load_checkpoint, save_checkpoint
from wsss.models.loading import load_classifier, load_segmenter

IMAGENET = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


@pytest.fixture(scope="module")
def imagenet_s2(thin_ckpts, tmp_path_factory) -> Path:
    """The thin stage-2 checkpoint recording ImageNet input normalisation: a graph without it would differ."""
    path = tmp_path_factory.mktemp("export") / "s2_imagenet.pth"
    save_checkpoint(path, {**load_checkpoint(thin_ckpts["s2"]), "input_norm": IMAGENET})
    return path


def reference(seg_path: Path, s1_path: Path | None, images: torch.Tensor) -> list[np.ndarray]:
    """What the exported model must compute, by the definition: each model on its own normalisation
    ``(x / 255 - mean) / std`` of the RGB 0-255 input; logits at the input size, the gate's sigmoid."""
    seg = load_segmenter(seg_path)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (seg.norm.mean, seg.norm.std))
    with torch.no_grad():
        out = [seg.model.eval()((images / 255 - mean) / std)["out"].numpy()]
        if s1_path is not None:
            clf = load_classifier(s1_path)
            out.append(torch.sigmoid(clf.model.eval()(images / 255)).numpy())
    return out


def random_images(batch: int, height: int, width: int, seed: int) -> torch.Tensor:
    return torch.rand(batch, 3, height, width, generator=torch.Generator().manual_seed(seed)) * 255


def test_torchscript_equals_pytorch_at_any_batch_and_size(imagenet_s2, tmp_path, capsys, monkeypatch):
    out = tmp_path / "model.pt"
    code, stdout, err = run_cli(capsys, monkeypatch, "export", imagenet_s2, "--format", "torchscript", "--out", out)
    assert code == 0, err
    assert "largest difference from PyTorch" in stdout and (tmp_path / "model.json").is_file()
    model = torch.jit.load(str(out))
    for batch, height, width in ((1, 32, 32), (3, 57, 90)):
        x = random_images(batch, height, width, seed=batch)
        with torch.no_grad():
            got = model(x).numpy()
        (want,) = reference(imagenet_s2, None, x)
        assert got.shape == (batch, 4, height, width) and np.abs(got - want).max() <= 1e-4


def test_onnx_with_the_gate_equals_pytorch_in_onnxruntime(imagenet_s2, thin_ckpts, tmp_path, capsys, monkeypatch):
    ort = pytest.importorskip("onnxruntime")
    out = tmp_path / "model.onnx"
    code, _, err = run_cli(capsys, monkeypatch, "export", imagenet_s2, "--format", "onnx", "--out", out,
                           "--stage1-checkpoint", thin_ckpts["s1a"], "--gate-threshold", 0.3)
    assert code == 0, err
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"]
    assert [o.name for o in session.get_outputs()] == ["logits", "gate"]
    for batch, height, width in ((1, 40, 72), (4, 64, 48)):
        x = random_images(batch, height, width, seed=10 + batch)
        logits, gate = session.run(None, {"image": x.numpy()})
        want_logits, want_gate = reference(imagenet_s2, thin_ckpts["s1a"], x)
        assert logits.shape == (batch, 4, height, width) and gate.shape == (batch, 4)
        assert np.abs(logits - want_logits).max() <= 1e-4 and np.abs(gate - want_gate).max() <= 1e-4

    sidecar = json.loads((tmp_path / "model.json").read_text())
    assert sidecar["classes"] == list(LUAD.classes) and sidecar["palette"]["TE"] == [205, 51, 51]
    assert sidecar["background"] == {"index": 4, "name": "background", "color": [255, 255, 255],
                                     "white_is_background": True}
    assert (sidecar["input"]["mean"], sidecar["input"]["std"]) == (IMAGENET["mean"], IMAGENET["std"])
    assert sidecar["input"]["range"] == [0, 255] and sidecar["input"]["shape"] == ["batch", 3, "height", "width"]
    assert (sidecar["mpp"], sidecar["patch_size"], sidecar["image_size"]) == (None, None, 32)  # records no µm/px
    gate = sidecar["outputs"][1]
    assert (gate["name"], gate["threshold"], gate["mode"], gate["input_size"]) == ("gate", 0.3, "mask", 32)


def test_the_sidecar_gives_the_recorded_scale(thin_ckpts, tmp_path, capsys, monkeypatch):
    ckpt = tmp_path / "s2_scale.pth"
    save_checkpoint(ckpt, {**load_checkpoint(thin_ckpts["s2"]), "mpp": 1.0, "patch_size": 224})
    assert run_cli(capsys, monkeypatch, "export", ckpt, "--format", "torchscript", "--out", tmp_path / "m.pt")[0] == 0
    sidecar = json.loads((tmp_path / "m.json").read_text())
    assert (sidecar["mpp"], sidecar["patch_size"], sidecar["outputs"][0]["name"], len(sidecar["outputs"])) == \
        (1.0, 224, "logits", 1)


def torchstain_reinhard(image: np.ndarray, method: str, target: dict) -> np.ndarray:
    """The Reinhard transfer by torchstain itself (not wsss's code): the target's LAB means, and its
    spreads (``reinhard``) or the patch's own (``reinhard-mean``)."""
    from torchstain.numpy.normalizers import NumpyReinhardNormalizer

    own = NumpyReinhardNormalizer()
    own.fit(image)
    normaliser = NumpyReinhardNormalizer()
    normaliser.target_means = np.asarray(target["lab_mean"], dtype=np.float32)
    normaliser.target_stds = np.asarray(own.target_stds if method == "reinhard-mean" else target["lab_std"],
                                        dtype=np.float32)
    return normaliser.normalize(image).reshape(image.shape)


@pytest.mark.parametrize("method, fmt", [("reinhard-mean", "torchscript"), ("reinhard", "onnx")])
def test_a_reinhard_stain_target_travels_in_the_graph(method, fmt, synth16, thin_ckpts, tmp_path, capsys,
                                                      monkeypatch):
    """--stain-norm reinhard(-mean) models map every image onto their target before the scaling; the
    exported graph does it too, each image of a batch on its own, and a mostly-glass image passes."""
    if fmt == "onnx":
        ort = pytest.importorskip("onnxruntime")
    from PIL import Image

    target = {"method": method, "patches": 7, "source": "the training set",
              "lab_mean": [55.0, 25.0, -12.0], "lab_std": [14.0, 7.0, 5.0]}
    ckpt = tmp_path / "s2_stain.pth"
    save_checkpoint(ckpt, {**load_checkpoint(thin_ckpts["s2"]), "input_norm": {**IMAGENET, "stain": target}})
    out = tmp_path / ("m.pt" if fmt == "torchscript" else "m.onnx")
    code, _, err = run_cli(capsys, monkeypatch, "export", ckpt, "--format", fmt, "--out", out)
    assert code == 0, err
    images = [np.asarray(Image.open(p).convert("RGB")) for p in sorted((synth16 / "train").glob("*.png"))[:5]]
    images.append(np.full((32, 32, 3), 245, dtype=np.uint8))  # glass: passes through unchanged
    expected_inputs = [torchstain_reinhard(im, method, target) for im in images[:-1]] + [images[-1]]
    assert not np.array_equal(expected_inputs[0], images[0])  # the step changes the patch
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()
    want = torch.from_numpy(np.stack(expected_inputs)).permute(0, 3, 1, 2).float()
    seg = load_segmenter(ckpt)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (seg.norm.mean, seg.norm.std))
    with torch.no_grad():
        want_logits = seg.model.eval()((want / 255 - mean) / std)["out"].numpy()
        unnormalised = seg.model.eval()((x / 255 - mean) / std)["out"].numpy()
        if fmt == "torchscript":
            got = torch.jit.load(str(out))(x).numpy()
        else:
            got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"image": x.numpy()})[0]
    # torchstain truncates to whole grey levels after float32 arithmetic: the graph's float32 rounding
    # moves a rare pixel by one level, a small change of the logits, far from skipping the step
    assert np.abs(got - want_logits).max() < 0.02 < np.abs(unnormalised - want_logits).max()
    assert np.allclose(got[-1], unnormalised[-1], atol=1e-5)  # the glass image as it is
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["input"]["stain"]["method"] == method and sidecar["input"]["stain"]["lab_mean"] == target["lab_mean"]


def test_a_macenko_stain_target_is_not_exported(thin_ckpts, tmp_path, capsys, monkeypatch):
    """Macenko's per-image fit (eigenvectors, percentiles) has no graph form here: refused in one line."""
    target = {"method": "macenko", "patches": 7, "source": "the training set",
              "stain_matrix": [[0.65, 0.07], [0.70, 0.99], [0.29, 0.11]], "max_concentration": [1.9, 1.0]}
    ckpt = tmp_path / "s2_stain.pth"
    save_checkpoint(ckpt, {**load_checkpoint(thin_ckpts["s2"]), "input_norm": {**IMAGENET, "stain": target}})
    code, _, err = run_cli(capsys, monkeypatch, "export", ckpt, "--format", "torchscript", "--out", tmp_path / "m.pt")
    assert code == 1 and err.count("error:") == 1 and "normalises stain with macenko" in err, err
    assert "Traceback" not in err and sorted(p.name for p in tmp_path.iterdir()) == ["s2_stain.pth"]


def test_bad_exports_end_in_one_line_and_write_nothing(thin_ckpts, tmp_path, capsys, monkeypatch):
    def fails(*args) -> str:
        code, _, err = run_cli(capsys, monkeypatch, "export", *args)
        assert code == 1 and err.count("error:") == 1 and "Traceback" not in err, err
        return err.strip()

    assert fails(thin_ckpts["s2"], "--format", "tflite", "--out", tmp_path / "m.tflite") == \
        "error: --format must be one of torchscript, onnx, not 'tflite'"
    assert "is a stage-1 checkpoint; a stage-2 checkpoint is needed here" in \
        fails(thin_ckpts["s1a"], "--format", "onnx", "--out", tmp_path / "m.onnx")
    assert fails(thin_ckpts["s2"], "--format", "onnx", "--out", tmp_path / "model.pt") == \
        f"error: --out {tmp_path / 'model.pt'} names a TorchScript file; a --format onnx model is written as .onnx"
    assert "names an ONNX file; a --format torchscript model is written as .pt" in \
        fails(thin_ckpts["s2"], "--format", "torchscript", "--out", tmp_path / "model.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    # two formats under one name would share m.json: the second export says whose sidecar it is
    code, _, err = run_cli(capsys, monkeypatch, "export", thin_ckpts["s2"], "--format", "torchscript", "--out",
                           tmp_path / "m.pt")
    assert code == 0, err
    sidecar = (tmp_path / "m.json").read_text()
    assert fails(thin_ckpts["s2"], "--format", "onnx", "--out", tmp_path / "m.onnx") == \
        f"error: {tmp_path / 'm.json'} is the sidecar of m.pt, exported earlier (a model's sidecar is its --out with " \
        "the suffix .json): give this export another name, or pass --force to replace it"
    assert (tmp_path / "m.json").read_text() == sidecar and not (tmp_path / "m.onnx").exists()
    for name in ("m.pt", "m.json"):
        (tmp_path / name).unlink()
    (tmp_path / "mine.pt").write_text("not wsss's")
    assert "mine.pt exists; pass --force to replace it" in \
        fails(thin_ckpts["s2"], "--format", "torchscript", "--out", tmp_path / "mine.pt")
    assert (tmp_path / "mine.pt").read_text() == "not wsss's"
    monkeypatch.setitem(__import__("sys").modules, "onnx", None)  # the export extra not installed
    assert fails(thin_ckpts["s2"], "--format", "onnx", "--out", tmp_path / "m.onnx") == \
        "error: ONNX export needs the onnx package: pip install onnx onnxruntime (the export extra)"
    assert not (tmp_path / "m.onnx").exists() and not (tmp_path / "m.json").exists()
