"""Stage 2: the gate, the pseudo-mask dataset, best-checkpoint selection, resume, `evaluate`, errors."""

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from helpers import interrupt_at_epoch, run_cli, tensorboard_threads, tiny_checkpoint
from wsss.models import loading
from wsss.config import STAGE2_PRESETS, Stage2Config, from_dict, resolve, to_dict
from wsss.data.datasets import InputNorm
from wsss.data.layout import list_train
from wsss.data.seg_datasets import PseudoMaskDataset, pseudo_mask_paths
from wsss.data.specs import LUAD
from wsss.errors import WsssError
from wsss.models.deeplab import DeepLabArch, DeepLabV3Plus
from wsss.runtime import load_checkpoint, save_checkpoint
from wsss.stages import stage2
from wsss.stages.stage2 import gate_logits

LAYERS = ("bn7", "b5_2", "b4_5")


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    """24/4/4 synthetic 64-px patches; the pseudo-masks are the true masks (PM_bn7) and flipped copies."""
    from wsss.data.synth import generate

    root = tmp_path_factory.mktemp("synth2") / "data"
    generate(root, n_train=24, n_val=4, n_test=4, size=64, seed=3, workers=1, progress=False)
    for layer in LAYERS:
        shutil.copytree(root / "train_gt", root / "train_PM" / f"PM_{layer}")
    return root


@pytest.fixture(scope="module")
def stage1_ckpt(tmp_path_factory) -> Path:
    """An untrained thin stage-1 classifier in our checkpoint format (only the gate uses it)."""
    return tiny_checkpoint(tmp_path_factory.mktemp("s1") / "stage1.pth", 1)


def tiny_cfg(data: Path, tmp: Path, **kw) -> Stage2Config:
    base = dict(dataset="luad", data=data, out=tmp / "ckpt", report=tmp / "report", backbone="resnet18",
                head_channels=16, image_size=32, epochs=2, batch_size=8, workers=0, device="cpu", gate=False)
    base.update(kw)
    return Stage2Config(**base)


TINY_ARGS = ("--backbone", "resnet18", "--head-channels", "16", "--image-size", "32", "--batch-size", "8",
             "--workers", "0", "--device", "cpu")

# --------------------------------------------------------------------------- the gate


def test_gate_suppressed_class_cannot_win_over_negative_logits():
    # one pixel, all logits negative; class 1 is the segmenter's favourite but the classifier rejects it
    logits = torch.tensor([-2.0, -1.0, -3.0, -4.0]).view(1, 4, 1, 1)
    probs = torch.tensor([[0.9, 0.05, 0.8, 0.1]])  # 0.1 is not above the threshold: gated too
    reference = logits * (probs > 0.1).float()[:, :, None, None]
    assert reference.argmax(dim=1).item() == 1  # the reference's multiply lets the gated class win
    gated = gate_logits(logits, probs, 0.1)
    assert gated.argmax(dim=1).item() == 0
    assert torch.equal(torch.isinf(gated).flatten(), torch.tensor([False, True, False, True]))
    assert torch.equal(gated[0, [0, 2]], logits[0, [0, 2]])  # kept logits untouched


def test_gate_keeps_the_most_probable_class_when_all_are_gated():
    logits = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    probs = torch.tensor([[0.05, 0.08, 0.02, 0.01],   # everything rejected: class 1 is the best guess
                          [0.95, 0.01, 0.70, 0.02]])  # normal: classes 0 and 2 kept
    pred = gate_logits(logits, probs, 0.1).argmax(dim=1)
    assert torch.all(pred[0] == 1)
    assert torch.equal(pred[1], torch.where(logits[1, 0] >= logits[1, 2], 0, 2))
    assert torch.equal(gate_logits(logits, torch.ones(2, 4), 0.1), logits)  # nothing gated


# --------------------------------------------------------------------------- data and config


def test_flip_moves_image_and_every_mask_together(tiny_data):
    samples = list_train(tiny_data, 4)[:1]
    paths = [[tiny_data / "train_gt" / samples[0].path.name] * 2]
    ds = PseudoMaskDataset(samples, paths, None, InputNorm(), LUAD, augment=True)
    plain = PseudoMaskDataset(samples, paths, None, InputNorm(), LUAD, augment=False)[0]
    torch.manual_seed(0)
    flips = 0
    for _ in range(12):
        x, masks, _ = ds[0]
        flipped = torch.equal(masks[0], plain[1][0].flip(-1))
        assert flipped or torch.equal(masks[0], plain[1][0])
        assert torch.equal(masks[1], masks[0])
        reference_image = plain[0].flip(-1) if flipped else plain[0]
        assert (x - reference_image).abs().mean() < 0.05  # at most blurred, never flipped alone
        flips += flipped
    assert 0 < flips < 12


def test_missing_pseudo_masks_name_the_first_file(tiny_data, tmp_path):
    samples = list_train(tiny_data, 4)
    with pytest.raises(WsssError, match=r"pseudo-mask missing: .*PM_gt.*wsss generate-pm --dataset luad"):
        pseudo_mask_paths(samples, tiny_data / "train_PM", ("bn7", "gt"), "luad")


def test_presets_precedence_and_round_trip(tmp_path):
    cfg = resolve(Stage2Config, STAGE2_PRESETS, "cpu", dataset="luad", data=tmp_path, epochs=3)
    assert cfg.backbone == STAGE2_PRESETS["cpu"]["backbone"] and cfg.epochs == 3 and cfg.preset == "cpu"
    paper = resolve(Stage2Config, STAGE2_PRESETS, None, dataset="luad", data=tmp_path)
    assert (paper.backbone, paper.out_stride, paper.epochs, paper.batch_size, paper.lr) == ("resnet101", 16, 30, 20, 0.01)
    assert paper.pm_layers == LAYERS and paper.pm_weights == (0.6, 0.2, 0.2) and paper.gate_threshold == 0.1
    back = from_dict(Stage2Config, json.loads(json.dumps(to_dict(replace(cfg, stage1_checkpoint=tmp_path / "s1")))))
    assert back == replace(cfg, stage1_checkpoint=tmp_path / "s1")
    with pytest.raises(WsssError, match="2 layers but"):
        Stage2Config(dataset="luad", data=tmp_path, pm_layers=("bn7", "b5_2"), pm_weights=(1.0,))
    with pytest.raises(WsssError, match="--loss"):
        Stage2Config(dataset="luad", data=tmp_path, loss="hinge")


# --------------------------------------------------------------------------- training


def test_best_checkpoint_is_the_best_validation_epoch(tiny_data, tmp_path, monkeypatch):
    scores = iter([0.2, 0.5, 0.4])

    def fake_validate(*args, **kw):
        return {"mIoU": next(scores), "fwIoU": 0.0, "pixel_acc": 0.0, "mean_class_acc": 0.0}

    monkeypatch.setattr(stage2, "score_val", fake_validate)
    summary = stage2.train(tiny_cfg(tiny_data, tmp_path, epochs=3, image_size=16))
    best = load_checkpoint(tmp_path / "ckpt" / "stage2_checkpoint_trained_on_luad.pth")
    last = load_checkpoint(tmp_path / "ckpt" / "stage2_luad_last.pth")
    assert best["epoch"] == 1 and best["best_metric"] == 0.5 and last["epoch"] == 2
    assert best["stage"] == 2 and best["arch"]["backbone"] == "resnet18" and best["class_names"] == list(LUAD.classes)
    assert best["input_norm"] == InputNorm().to_dict() and best["image_size"] == 16
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert metrics["best_epoch"] == 2 and metrics["val_best"]["mIoU"] == 0.5 and metrics["test_gate"] is None
    assert metrics["test"] == summary["metrics"]["test"]
    assert len(list((tmp_path / "report" / "pred").glob("*.png"))) == 4
    assert list((tmp_path / "ckpt" / "runs" / "stage2_luad").iterdir())


def test_resume_after_interruption_matches_uninterrupted_run(tiny_data, tmp_path, monkeypatch):
    stage2.train(tiny_cfg(tiny_data, tmp_path / "full"))
    reference = load_checkpoint(tmp_path / "full" / "ckpt" / "stage2_luad_last.pth")

    cut = tiny_cfg(tiny_data, tmp_path / "cut")
    real_epoch = interrupt_at_epoch(monkeypatch, stage2, 1)
    with pytest.raises(KeyboardInterrupt):
        stage2.train(cut)
    assert not tensorboard_threads()  # the interrupted run closed its event writer (an API caller's process goes on)
    with pytest.raises(WsssError, match="--resume"):
        stage2.train(cut)
    monkeypatch.setattr(stage2, "train_one_epoch", real_epoch)
    stage2.train(cut, resume=True)
    resumed = load_checkpoint(tmp_path / "cut" / "ckpt" / "stage2_luad_last.pth")
    assert resumed["epoch"] == 1 and resumed["best_epoch"] == reference["best_epoch"]
    for name, tensor in reference["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), name


def test_the_gate_changes_the_test_not_the_trained_segmenter(tiny_data, stage1_ckpt, tmp_path):
    """The gate is a test-time step: the same seed trains the same weights with and without it (the
    gate's classifier was built from the seeded random stream, so --gate moved stage 2's start)."""
    gated = stage2.train(tiny_cfg(tiny_data, tmp_path / "gate", epochs=1, gate=True, stage1_checkpoint=stage1_ckpt))
    plain = stage2.train(tiny_cfg(tiny_data, tmp_path / "plain", epochs=1))
    assert gated["metrics"]["test_gate"] is not None and plain["metrics"]["test_gate"] is None
    a = load_checkpoint(tmp_path / "gate" / "ckpt" / "stage2_checkpoint_trained_on_luad.pth")["model"]
    b = load_checkpoint(tmp_path / "plain" / "ckpt" / "stage2_checkpoint_trained_on_luad.pth")["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_cli_train_with_gate_then_evaluate_reproduces(tiny_data, stage1_ckpt, tmp_path, capsys, monkeypatch):
    code, out, err = run_cli(capsys, monkeypatch, "train-stage2", "--dataset", "luad", "--data", tiny_data,
                             "--stage1-checkpoint", stage1_ckpt, "--gate", "--epochs", "1", "--out", tmp_path / "ckpt",
                             "--report", tmp_path / "report", "--pm-weights", "0.5,0.3,0.2", *TINY_ARGS)
    assert code == 0, err
    assert "with the gate" in out and "mIoU" in out
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert set(metrics) == {"test", "test_gate", "val_best", "best_epoch", "test_last_epoch", "kept"}
    assert metrics["best_epoch"] == 1 and metrics["kept"] == "best validation mIoU"
    for folder in ("pred", "pred_gate"):
        assert len(list((tmp_path / "report" / folder).glob("*.png"))) == 4

    ckpt = tmp_path / "ckpt" / "stage2_checkpoint_trained_on_luad.pth"
    code, out, err = run_cli(capsys, monkeypatch, "evaluate", "--dataset", "luad", "--data", tiny_data,
                             "--checkpoint", ckpt, "--split", "test", "--gate", "--stage1-checkpoint", stage1_ckpt,
                             "--device", "cpu", "--json", tmp_path / "eval.json")
    assert code == 0, err
    again = json.loads((tmp_path / "eval.json").read_text())
    assert again == {"test": metrics["test"], "test_gate": metrics["test_gate"]}

    # --gate-mode reference reaches the evaluation: with a threshold no class passes, the reference's
    # multiply makes every logit 0 and class 0 wins every pixel; our mask keeps each patch's most
    # probable class instead, which the untrained classifier does not make class 0 for every patch
    for mode in ("reference", "mask"):
        code, out, err = run_cli(capsys, monkeypatch, "evaluate", "--dataset", "luad", "--data", tiny_data,
                                 "--checkpoint", ckpt, "--split", "test", "--gate", "--stage1-checkpoint",
                                 stage1_ckpt, "--gate-threshold", "0.99", "--gate-mode", mode, "--device", "cpu",
                                 "--json", tmp_path / f"{mode}.json")
        assert code == 0, err
    confusion = torch.tensor(json.loads((tmp_path / "reference.json").read_text())["test_gate"]["confusion_matrix"])
    assert confusion[:, 1:].sum() == 0 and confusion[:, 0].sum() > 0
    probs = torch.sigmoid(loading.load_classifier(stage1_ckpt).model(torch.rand(1, 3, 32, 32)))
    assert probs.max() <= 0.99  # the premise: nothing passes the threshold

    # the same weights under the reference's names and file layout, as a published checkpoint
    published = load_checkpoint(ckpt)["model"]
    names = {v: k for k, v in _reference_names(published).items()}
    torch.save({"state_dict": {names.get(k, k): v for k, v in published.items()}, "optimizer": {}},
               tmp_path / "published.pth")
    loaded = loading.load_segmenter(tmp_path / "published.pth", 4)
    assert loaded.model.arch == DeepLabArch("resnet18", 16, 4, 16) and loaded.norm == InputNorm()
    for name, tensor in loaded.model.state_dict().items():
        assert torch.equal(tensor, published[name]), name


def _reference_names(state) -> dict:
    """{reference name: our name} for the ASPP and decoder tensors of ``state``."""
    from reference_nets import REFERENCE_TO_OURS

    return {ref: our for ref, our in REFERENCE_TO_OURS.items() if our in state}


def test_one_line_errors(tiny_data, stage1_ckpt, tmp_path, capsys, monkeypatch):
    def cli(*args):
        code, _, err = run_cli(capsys, monkeypatch, *args)
        # one error line (a progress bar may precede it on stderr), never a traceback
        assert code == 1 and err.count("error:") == 1 and "Traceback" not in err, err
        assert err.rstrip().rsplit("error:", 1)[1].count("\n") == 0, err
        return err

    base = ("--dataset", "luad", "--data", tiny_data)
    err = cli("evaluate", *base, "--checkpoint", stage1_ckpt, "--device", "cpu")
    assert "stage-1 checkpoint" in err

    model = DeepLabV3Plus(DeepLabArch("resnet18", 16, 3, 16))
    cfg = tiny_cfg(tiny_data, tmp_path)
    state = stage2.checkpoint_state(model, cfg, LUAD, 0, {})
    state["class_names"] = ["A", "B", "C"]
    save_checkpoint(tmp_path / "c3.pth", state)
    assert "3 classes" in cli("evaluate", *base, "--checkpoint", tmp_path / "c3.pth", "--device", "cpu")
    torch.save({"state_dict": model.state_dict()}, tmp_path / "plain3.pth")
    assert "3 classes" in cli("evaluate", *base, "--checkpoint", tmp_path / "plain3.pth", "--device", "cpu")

    err = cli("train-stage2", *base, "--no-gate", "--pm-layers", "bn7,gt", "--pm-weights", "0.5,0.5",
              "--out", tmp_path / "o", *TINY_ARGS)
    assert "pseudo-mask missing" in err and "PM_gt" in err and "wsss generate-pm" in err
    assert "--stage1-checkpoint" in cli("train-stage2", *base, "--gate", "--out", tmp_path / "o", *TINY_ARGS)
    assert "--pm-weights" in cli("train-stage2", *base, "--pm-weights", "0.6,x", "--out", tmp_path / "o")
    assert not (tmp_path / "o" / "stage2_luad_last.pth").exists()
    err = cli("train-stage2", *base, "--no-gate", "--lr", "1e30", "--epochs", "1", "--out", tmp_path / "o", *TINY_ARGS)
    assert "loss is not finite" in err
    assert not (tmp_path / "o" / "stage2_checkpoint_trained_on_luad.pth").exists()


def test_torchrun_two_processes_gloo(tiny_data, tmp_path):
    """DDP on CPU: two processes, gloo; validation is sharded and summed over both ranks."""
    import os
    import subprocess
    import sys

    from wsss.data.layout import list_masked
    from wsss.data.png import read_mask

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "wsss", "train-stage2", "--dataset", "luad", "--data", str(tiny_data), "--no-gate",
           "--epochs", "1", "--out", str(tmp_path), "--report", str(tmp_path / "report"),
           "--backbone", "resnet18", "--head-channels", "16", "--image-size", "32", "--batch-size", "4",
           "--workers", "0", "--device", "cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "3 steps/epoch" in proc.stderr and "world size 2" in proc.stderr  # 24 patches / 2 ranks / 4
    best = load_checkpoint(tmp_path / "stage2_checkpoint_trained_on_luad.pth")
    evaluated = sum(int((read_mask(s.mask) != LUAD.background_index).sum()) for s in list_masked(tiny_data, "val"))
    assert best["best_val"]["pixels"] == evaluated


def test_ema_keeps_the_average_of_the_weights_seen_after_every_step(tiny_data, tmp_path, monkeypatch):
    """--ema d: the kept (validated, saved, tested) model is the exponential moving average of the
    weights after each optimizer step, recomputed here from those weights: a = w1, then
    a <- d*a + (1-d)*w (BatchNorm statistics too). Resuming an interrupted --ema run gives the same
    average to the bit."""
    seen: list[dict] = []
    real_step = stage2.optimizer_step

    def recording_step(loss, optimizer, scheduler, scaler):
        real_step(loss, optimizer, scheduler, scaler)
        model = next(iter(recording_step.models))
        seen.append({k: v.detach().clone().float() for k, v in model.state_dict().items()
                     if v.dtype.is_floating_point})

    recording_step.models = []
    real_build = stage2.build_model

    def build_and_remember(cfg, spec):
        model = real_build(cfg, spec)
        recording_step.models[:] = [model]
        return model

    monkeypatch.setattr(stage2, "optimizer_step", recording_step)
    monkeypatch.setattr(stage2, "build_model", build_and_remember)
    decay = 0.6
    stage2.train(tiny_cfg(tiny_data, tmp_path, ema=decay, epochs=2))
    assert len(seen) == 6  # 24 patches, batches of 8, 2 epochs
    average = dict(seen[0])
    for weights in seen[1:]:
        average = {k: decay * average[k] + (1 - decay) * weights[k] for k in average}
    last = load_checkpoint(tmp_path / "ckpt" / "stage2_luad_last.pth")
    kept = load_checkpoint(tmp_path / "ckpt" / "stage2_checkpoint_trained_on_luad.pth")["model"]
    best_epoch = load_checkpoint(tmp_path / "ckpt" / "stage2_checkpoint_trained_on_luad.pth")["epoch"]
    if best_epoch == 1:  # the best on val is the last epoch's average
        for k, v in average.items():
            assert torch.allclose(kept[k].float(), v, atol=1e-6), k
    for k, v in average.items():
        assert torch.allclose(last["ema"][f"module.{k}"].float(), v, atol=1e-6), k
    assert any(not torch.equal(last["model"][k].float(), average[k]) for k in average)  # the raw weights differ

    monkeypatch.undo()
    interrupt_at_epoch(monkeypatch, stage2, 1)
    with pytest.raises(KeyboardInterrupt):
        stage2.train(tiny_cfg(tiny_data, tmp_path / "b", ema=decay, epochs=2))
    monkeypatch.undo()
    stage2.train(tiny_cfg(tiny_data, tmp_path / "b", ema=decay, epochs=2), resume=True)
    again = load_checkpoint(tmp_path / "b" / "ckpt" / "stage2_luad_last.pth")
    for k, v in last["ema"].items():
        assert torch.equal(again["ema"][k], v), k
