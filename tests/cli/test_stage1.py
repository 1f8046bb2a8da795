"""Stage-1 training loop, resume, CAM evaluation and the CLI around them."""

import json
import logging
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from helpers import interrupt_at_epoch, model_weights, run_cli, tensorboard_threads, write_palette_mask
from wsss.models import loading
from wsss.config import STAGE1_PRESETS, Stage1Config, resolve
from wsss.errors import WsssError
from wsss.data.datasets import InputNorm
from wsss.data.specs import LUAD
from wsss.models.resnet38 import ResNet38Classifier
from wsss.runtime import load_checkpoint, save_checkpoint
from wsss.stages import stage1


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    from wsss.data.synth import generate

    root = tmp_path_factory.mktemp("synth") / "data"
    generate(root, n_train=24, n_val=4, n_test=4, size=64, seed=3, workers=1, progress=False)
    return root


def tiny_cfg(data: Path, out: Path, **kw) -> Stage1Config:
    base = dict(dataset="luad", data=data, out=out, epochs=2, batch_size=8, lr=0.01, width=0.125,
                image_size=32, workers=0, pda_first_epoch=1, device="cpu", eval_splits=("test",))
    base.update(kw)
    return Stage1Config(**base)


def test_loss_decreases_on_a_tiny_batch():
    torch.manual_seed(0)
    model = ResNet38Classifier(4, width=0.125)
    x = torch.rand(4, 3, 32, 32)
    y = torch.tensor([[1, 0, 0, 1], [0, 1, 0, 0], [0, 0, 1, 1], [1, 1, 0, 0]], dtype=torch.float32)
    opt = torch.optim.SGD(model.param_groups(0.01, 0.0), lr=0.01, momentum=0.9)
    for m in model.modules():  # no dropout, so every step sees the same function
        if isinstance(m, nn.Dropout2d):
            m.p = 0.0
    losses = []
    for _ in range(15):
        loss = F.multilabel_soft_margin_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_poly_schedule_values():
    f = stage1.poly_lambda(10)
    assert f(0) == 1.0
    assert f(5) == pytest.approx(0.5**0.9)
    assert f(10) == 0.0


def test_presets_and_precedence(tmp_path):
    cfg = resolve(Stage1Config, STAGE1_PRESETS, "cpu", dataset="luad", data=tmp_path, epochs=3)
    assert cfg.width == STAGE1_PRESETS["cpu"]["width"] and cfg.epochs == 3 and cfg.preset == "cpu"
    paper = resolve(Stage1Config, STAGE1_PRESETS, None, dataset="luad", data=tmp_path)
    assert (paper.epochs, paper.batch_size, paper.lr, paper.width) == (20, 20, 0.01, 1.0)
    assert (paper.pda_start, paper.pda_decay, paper.pda_floor, paper.pda_first_epoch) == (1.0, 0.98, 0.65, 3)


def test_resume_after_interruption_matches_uninterrupted_run(tiny_data, tmp_path, monkeypatch):
    full = stage1.train(tiny_cfg(tiny_data, tmp_path / "full", eval_splits=()))
    assert full["epochs"] == 2
    reference = load_checkpoint(tmp_path / "full" / "stage1_checkpoint_trained_on_luad.pth")

    cut = tiny_cfg(tiny_data, tmp_path / "cut", eval_splits=())
    real_epoch = interrupt_at_epoch(monkeypatch, stage1, 1)
    with pytest.raises(KeyboardInterrupt):
        stage1.train(cut)
    assert not tensorboard_threads()  # the interrupted run closed its event writer (an API caller's process goes on)
    last = load_checkpoint(tmp_path / "cut" / "stage1_luad_last.pth")
    assert last["epoch"] == 0 and last["optimizer"]["state"]  # momentum buffers saved
    assert not (tmp_path / "cut" / "stage1_checkpoint_trained_on_luad.pth").exists()

    # A plain rerun refuses to overwrite the interrupted run.
    with pytest.raises(WsssError, match="--resume"):
        stage1.train(cut)
    monkeypatch.setattr(stage1, "train_one_epoch", real_epoch)
    stage1.train(replace(cut, workers=0), resume=True)
    resumed = load_checkpoint(tmp_path / "cut" / "stage1_checkpoint_trained_on_luad.pth")
    assert resumed["epoch"] == 1
    for name, tensor in reference["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), name


def _lrs_of_every_step(monkeypatch) -> list[float]:
    """The first parameter group's learning rate at every optimizer step of stage 1."""
    seen, real = [], stage1.optimizer_step

    def record(loss, optimizer, scheduler, scaler):
        seen.append(optimizer.param_groups[0]["lr"])
        real(loss, optimizer, scheduler, scaler)

    monkeypatch.setattr(stage1, "optimizer_step", record)
    return seen


def test_refit_epochs_run_only_when_stage1_does_not_fit(tiny_data, tmp_path, monkeypatch, caplog):
    """A run that fits never enters the refit epochs (the same weights as without them); one that
    does not trains --refit-epochs more on the poly schedule restarted from the initial rate, and
    records the fit before them."""
    final = "stage1_checkpoint_trained_on_luad.pth"
    monkeypatch.setattr(stage1, "FIT_LABEL_ACC", 0.0)  # every run fits
    plain = stage1.train(tiny_cfg(tiny_data, tmp_path / "plain", eval_splits=()))
    fitting = stage1.train(tiny_cfg(tiny_data, tmp_path / "fitting", eval_splits=(), refit_epochs=2))
    assert plain["epochs"] == fitting["epochs"] == 2 and "before_refit" not in fitting["fit"]
    a, b = model_weights(tmp_path / "plain" / final), model_weights(tmp_path / "fitting" / final)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not any("restarted" in r.getMessage() for r in caplog.records)

    monkeypatch.setattr(stage1, "FIT_LABEL_ACC", 1.01)  # no run fits
    lrs = _lrs_of_every_step(monkeypatch)
    refit = stage1.train(tiny_cfg(tiny_data, tmp_path / "refit", eval_splits=(), refit_epochs=2))
    steps = 24 // 8  # 24 patches, batches of 8: 3 steps an epoch, 6 in 2 epochs
    poly = [0.01 * (1 - k / (2 * steps)) ** 0.9 for k in range(2 * steps)]
    assert lrs == pytest.approx(poly + poly)  # the 2 epochs, then the 2 refit epochs from the start again
    assert refit["epochs"] == 4 and load_checkpoint(tmp_path / "refit" / final)["epoch"] == 3
    assert refit["fit"]["refit_epochs"] == 2 and refit["fit"]["before_refit"]["fits"] is False
    assert [r.getMessage() for r in caplog.records if "restarted" in r.getMessage()] == [
        "stage 1 does not fit its training labels yet (label accuracy "
        f"{refit['fit']['before_refit']['label_acc']:.3f} < 1.01): 2 more epochs on a restarted learning-rate "
        "schedule (--refit-epochs)"]
    c = model_weights(tmp_path / "refit" / final)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_a_run_interrupted_in_its_refit_epochs_resumes_to_the_same_model(tiny_data, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(stage1, "FIT_LABEL_ACC", 1.01)  # no run fits
    cfg = dict(eval_splits=(), refit_epochs=3)  # not 2: the refit schedule differs from the first one
    stage1.train(tiny_cfg(tiny_data, tmp_path / "full", **cfg))
    real_epoch = interrupt_at_epoch(monkeypatch, stage1, 3)  # the second refit epoch
    with pytest.raises(KeyboardInterrupt):
        stage1.train(tiny_cfg(tiny_data, tmp_path / "cut", **cfg))
    last = load_checkpoint(tmp_path / "cut" / "stage1_luad_last.pth")
    assert last["epoch"] == 2 and last["refit"] is True and last["fit_before_refit"]["fits"] is False
    monkeypatch.setattr(stage1, "train_one_epoch", real_epoch)
    caplog.set_level(logging.INFO, logger="wsss")
    summary = stage1.train(tiny_cfg(tiny_data, tmp_path / "cut", **cfg), resume=True)
    assert summary["fit"]["before_refit"] == last["fit_before_refit"]
    assert any(r.getMessage().endswith("after epoch 3 of 5") for r in caplog.records)  # 2 epochs + 3 refit
    full = model_weights(tmp_path / "full" / "stage1_checkpoint_trained_on_luad.pth")
    resumed = model_weights(tmp_path / "cut" / "stage1_checkpoint_trained_on_luad.pth")
    assert all(torch.equal(full[k], resumed[k]) for k in full)


def test_checkpoint_format(tiny_data, tmp_path):
    summary = stage1.train(tiny_cfg(tiny_data, tmp_path, epochs=1))
    ckpt = load_checkpoint(tmp_path / "stage1_checkpoint_trained_on_luad.pth")
    assert ckpt["stage"] == 1 and ckpt["class_names"] == list(LUAD.classes)
    assert ckpt["input_norm"] == {"mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]}
    assert ckpt["arch"] == {"name": "resnet38", "width": 0.125, "num_classes": 4}
    assert json.loads((tmp_path / "stage1_luad_config.json").read_text())["width"] == 0.125
    metrics = json.loads((tmp_path / "stage1_luad_cam_metrics.json").read_text())
    assert metrics["test"]["mIoU"] == summary["cam_metrics"]["test"]["mIoU"]
    assert list((tmp_path / "runs" / "stage1_luad").iterdir())  # tensorboard events
    loaded = loading.load_classifier(tmp_path / "stage1_checkpoint_trained_on_luad.pth", 4)
    assert loaded.image_size == 32 and not loaded.model.training


class HandMadeCams(nn.Module):
    """A 'classifier' whose bn7 features are the input itself: CAM of class c = channel c of the image.

    fc8 maps channel c to class c (classes 0..2) and nothing to class 3; ``bias`` shifts the logits.
    """

    def __init__(self, bias: list[float]):
        super().__init__()
        self.fc8 = nn.Conv2d(3, 4, 1, bias=False)
        w = torch.zeros(4, 3, 1, 1)
        for c in range(3):
            w[c, c] = 1.0
        self.fc8.weight.data.copy_(w)
        self.bias = torch.tensor(bias)

    def forward_features(self, x):
        return {"bn7": x}

    def forward_head(self, features, attention=None):
        return self.fc8(features.mean(dim=(2, 3), keepdim=True)).flatten(1) + self.bias

    cams_and_logits = ResNet38Classifier.cams_and_logits


@pytest.fixture
def half_and_half(tmp_path) -> Path:
    """Test images red on the left, green on the right; masks TE left, NEC right, a background row."""
    from PIL import Image

    root = tmp_path / "hand"
    img = np.zeros((8, 8, 3), np.uint8)
    img[:, :4, 0] = 255
    img[:, 4:, 1] = 255
    mask = np.zeros((8, 8), np.uint8)
    mask[:, 4:] = 1
    mask[0] = 4  # not evaluated
    for split in ("val", "test"):
        (root / split / "img").mkdir(parents=True)
        Image.fromarray(img).save(root / split / "img" / "a.png")
        write_palette_mask(root / split / "mask" / "a.png", mask)
    return root


def test_eval_cams_on_hand_made_cams(half_and_half):
    model = HandMadeCams(bias=[0.0, 0.0, 0.0, 0.0])
    m = stage1.evaluate_cams(model, half_and_half, "test", LUAD, norm=InputNorm(), image_size=None,
                             device=torch.device("cpu"))
    # every evaluated pixel right: TE and NEC IoU 1, LYM and TAS absent everywhere
    assert m["per_class"]["TE"]["iou"] == 1.0 and m["per_class"]["NEC"]["iou"] == 1.0
    assert m["per_class"]["LYM"]["iou"] is None and m["mIoU"] == 1.0
    assert m["pixels"] == 56


def test_eval_cams_drops_unlikely_classes(half_and_half):
    # NEC's logit 0.5 - 3 < logit(0.25): NEC is dropped; on the right half TE, LYM and TAS all
    # score 0 after normalisation and the tie goes to TE. TE: 28 right, 28 wrong -> IoU 0.5.
    model = HandMadeCams(bias=[0.0, -3.0, 0.0, 0.0])
    m = stage1.evaluate_cams(model, half_and_half, "test", LUAD, norm=InputNorm(), image_size=None,
                             device=torch.device("cpu"))
    assert m["per_class"]["TE"]["iou"] == 0.5
    assert m["per_class"]["NEC"]["iou"] == 0.0
    assert m["mIoU"] == 0.25


def test_eval_cam_cli_and_wrong_checkpoints(tiny_data, tmp_path, capsys, monkeypatch):
    stage1.train(tiny_cfg(tiny_data, tmp_path, epochs=1, eval_splits=()))
    ckpt = tmp_path / "stage1_checkpoint_trained_on_luad.pth"
    code, out, err = run_cli(capsys, monkeypatch, "eval-cam", "--dataset", "luad", "--data", tiny_data,
                             "--checkpoint", ckpt, "--split", "val", "--device", "cpu", "--json", tmp_path / "m.json")
    assert code == 0, err
    assert "mIoU" in out and json.loads((tmp_path / "m.json").read_text())["mIoU"] is not None

    fake = load_checkpoint(ckpt)
    fake["stage"] = 2
    save_checkpoint(tmp_path / "s2.pth", fake)
    code, _, err = run_cli(capsys, monkeypatch, "eval-cam", "--dataset", "luad", "--data", tiny_data,
                           "--checkpoint", tmp_path / "s2.pth")
    assert code == 1 and "stage-2 checkpoint" in err and len(err.strip().splitlines()) == 1

    # trained on a 3-class spec: refused, naming the difference
    fake["stage"], fake["class_names"] = 1, ["A", "B", "C"]
    fake["spec"] = {**LUAD.to_dict(), "name": "abc", "classes": ["A", "B", "C"], "colors": [[1, 1, 1]] * 3,
                    "background_index": 3}
    save_checkpoint(tmp_path / "c3.pth", fake)
    code, _, err = run_cli(capsys, monkeypatch, "eval-cam", "--dataset", "luad", "--data", tiny_data,
                           "--checkpoint", tmp_path / "c3.pth")
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert "trained on dataset spec 'abc', not the 'luad' given" in err and "classes [A, B, C] vs [TE, NEC, LYM, TAS]" in err
    # a checkpoint from before specs records the dataset and its class names only
    del fake["spec"]
    fake["dataset"] = "luad"
    save_checkpoint(tmp_path / "old3.pth", fake)
    code, _, err = run_cli(capsys, monkeypatch, "eval-cam", "--dataset", "luad", "--data", tiny_data,
                           "--checkpoint", tmp_path / "old3.pth")
    assert code == 1 and "records dataset luad but classes A, B, C" in err

    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    code, _, err = run_cli(capsys, monkeypatch, "eval-cam", "--dataset", "luad", "--data", tiny_data,
                           "--checkpoint", tmp_path / "junk.pth")
    assert code == 1 and err.startswith("error: cannot load checkpoint")


def test_nan_loss_is_a_clear_error(tiny_data, tmp_path, capsys, monkeypatch):
    code, _, err = run_cli(capsys, monkeypatch, "train-stage1", "--dataset", "luad", "--data", tiny_data,
                           "--out", tmp_path, "--width", "0.125", "--image-size", "32", "--epochs", "1",
                           "--batch-size", "8", "--lr", "1e30", "--workers", "0", "--device", "cpu")
    assert code == 1 and "loss is not finite" in err and "Traceback" not in err
    assert not (tmp_path / "stage1_checkpoint_trained_on_luad.pth").exists()


def test_torchrun_two_processes_gloo(tiny_data, tmp_path):
    """DDP on CPU: two processes, gloo, a few steps; rank 0 writes one checkpoint."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "wsss", "train-stage1", "--dataset", "luad", "--data", str(tiny_data), "--out", str(tmp_path),
           "--width", "0.125", "--image-size", "32", "--epochs", "2", "--batch-size", "4", "--workers", "0",
           "--device", "cpu", "--pda-first-epoch", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = load_checkpoint(tmp_path / "stage1_checkpoint_trained_on_luad.pth")
    assert ckpt["epoch"] == 1
    # 24 patches over 2 ranks, batch 4: 3 steps per epoch per rank
    assert "3 steps/epoch" in proc.stderr and "world size 2" in proc.stderr
    assert math.isfinite(json.loads((tmp_path / "stage1_luad_cam_metrics.json").read_text())["val"]["pixel_acc"])


# ----------------------------------------------------------------------------- the fit check

_COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (220, 200, 40)]
_LABELS = [(1, 0, 0, 0), (0, 1, 0, 0), (0, 0, 1, 0), (0, 0, 0, 1), (1, 1, 0, 0), (0, 0, 1, 1), (1, 0, 1, 0), (0, 1, 0, 1)]


@pytest.fixture(scope="module")
def colour_blocks(tmp_path_factory) -> Path:
    """Eight 32-px patches, each class a coloured band: labels a small network can learn exactly."""
    from PIL import Image

    root = tmp_path_factory.mktemp("blocks") / "data"
    rng = np.random.default_rng(0)
    for i, label in enumerate(_LABELS):
        img = np.full((32, 32, 3), 240, np.int16)
        present = [c for c in range(4) if label[c]]
        for j, c in enumerate(present):
            img[:, j * 32 // len(present):(j + 1) * 32 // len(present)] = _COLOURS[c]
        img = np.clip(img + rng.integers(-10, 10, img.shape), 0, 255).astype(np.uint8)
        (root / "train").mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(root / "train" / f"p{i}-[{' '.join(map(str, label))}].png")
    for split in ("val", "test"):
        Image.fromarray(np.full((32, 32, 3), _COLOURS[0], np.uint8)).save(_mkdir(root / split / "img") / "a.png")
        write_palette_mask(root / split / "mask" / "a.png", np.zeros((32, 32), np.uint8))
    return root


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.mark.parametrize("lr, fits", [(0.0, False), (0.02, True)])
def test_the_run_says_when_stage1_does_not_fit_its_labels(colour_blocks, tmp_path, capsys, monkeypatch, caplog, lr,
                                                          fits):
    """A classifier that cannot learn (learning rate 0) is reported in one warning line; one that
    learns the colour bands is not. The recorded label accuracy is recomputed here from the saved
    model's logits on the training patches. Without dropout: with the reference's, the fit after 80
    epochs depended on the CPU and thread count (0.875 on one AVX2 thread, 1.000 on two); without it
    seeds 0-2 fit by epoch 40-80 on one thread."""
    from PIL import Image

    out = tmp_path / "s1"
    code, _, err = run_cli(capsys, monkeypatch, "train-stage1", "--dataset", "luad", "--data", colour_blocks,
                           "--out", out, "--epochs", "80", "--batch-size", "8", "--lr", lr, "--width", "0.125",
                           "--momentum", "0.9", "--no-pda", "--head-lr-mult", "1", "--dropout", "0", "--workers", "0",
                           "--device", "cpu")
    assert code == 0, err
    warnings = [r.getMessage() for r in caplog.records if "does not fit its training labels" in r.getMessage()]
    assert len(warnings) == (0 if fits else 1)
    ckpt = load_checkpoint(out / "stage1_checkpoint_trained_on_luad.pth")
    model = ResNet38Classifier(4, width=0.125)
    model.load_state_dict(ckpt["model"])
    model.eval()
    right = []
    for path in sorted((colour_blocks / "train").glob("*.png")):
        x = torch.from_numpy(np.asarray(Image.open(path), np.float32) / 255).permute(2, 0, 1)[None]
        label = torch.tensor([int(c) for c in path.name.split("[")[1][:-5].split()], dtype=torch.float32)
        with torch.no_grad():
            right.append(((model(x)[0] > 0).float() == label).float())
    label_acc = torch.stack(right).mean().item()
    assert ckpt["fit"]["label_acc"] == pytest.approx(label_acc, abs=1e-4)
    assert ckpt["fit"]["fits"] is fits
    assert (label_acc >= 0.95) is fits


def test_dropout_scales_the_reference_rates(tmp_path, capsys, monkeypatch):
    """--dropout multiplies the reference's rates (b6 0.3, b7 0.5, head 0.5: written here by hand);
    at 0 a training-mode forward is deterministic, at 1 it is not."""
    model = ResNet38Classifier(4, width=0.125)
    rates = lambda m: [m.b6.dropout_2b1.p, m.b6.dropout_2b2.p, m.b7.dropout_2b1.p, m.b7.dropout_2b2.p, m.dropout7.p]
    assert rates(model) == [0.3, 0.3, 0.5, 0.5, 0.5]
    model.scale_dropout(0.5)
    assert rates(model) == pytest.approx([0.15, 0.15, 0.25, 0.25, 0.25])
    x = torch.rand(2, 3, 32, 32)
    for scale, same in ((0.0, True), (1.0, False)):
        model.scale_dropout(scale)
        torch.manual_seed(0)
        a = model(x)
        torch.manual_seed(1)
        assert torch.equal(a, model(x)) is same
    assert resolve(Stage1Config, STAGE1_PRESETS, "cpu", dataset="luad", data=tmp_path).dropout == 0.0
    assert resolve(Stage1Config, STAGE1_PRESETS, "paper", dataset="luad", data=tmp_path).dropout == 1.0
    code, _, err = run_cli(capsys, monkeypatch, "train-stage1", "--dataset", "luad", "--data", tmp_path,
                           "--out", tmp_path / "o", "--dropout", "3")
    assert code == 1 and err.strip().splitlines() == [
        "error: --dropout must be in [0, 2] (a multiple of the reference's rates), not 3"]
