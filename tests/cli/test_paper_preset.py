"""The `paper` preset is ChuHan89/WSSS-Tissue to the letter: every command's resolved settings equal
the reference's (a table written here from its scripts, not read from our config), the short last
batch of stage 2 is trained on, a missing initialisation is said out loud, and a NaN validation
stops stage 2 in one line."""

from __future__ import annotations

import logging
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from helpers import record_calls, run_cli
from wsss.config import STAGE1_PRESETS, STAGE2_PRESETS, Stage1Config, Stage2Config, resolve
from wsss.data.specs import LUAD
from wsss.metrics import ConfusionMeter
from wsss.models.deeplab import DeepLabArch, DeepLabV3Plus
from wsss.models.resnet38 import ResNet38Classifier
from wsss.runtime import Distributed, load_checkpoint, save_checkpoint
from wsss.stages import pseudo_masks, reproduce, stage1, stage2

# --------------------------------------------------------------------------- the reference's values
# 1_train_stage1.py: argparse defaults (batch 20, 20 epochs, lr 0.01, wt_dec 5e-4); PolyOptimizer passes
# wt_dec as SGD's positional momentum; groups 1×/2×/10×/20× lr; DataLoader(drop_last=True) and
# max_step = (N // batch) * epochs; PDA from `ep > 2`, gama 1 → ×0.98 while > 0.65; flips; ToTensor
# only ([0, 1], no resize); tool/infer_fun.py: CAM threshold 0.25, zeroed classes stay in the argmax.
STAGE1_REFERENCE = {
    "epochs": 20, "batch_size": 20, "lr": 0.01, "head_lr_mult": 10.0, "momentum": 0.0005, "weight_decay": 5e-4,
    "width": 1.0, "image_size": None, "input_norm": "none", "pda": True, "pda_start": 1.0, "pda_decay": 0.98,
    "pda_floor": 0.65, "pda_first_epoch": 3, "pda_norm": "none", "augment": "flip", "stain_jitter": 0.0,
    "cam_threshold": 0.25, "cam_tie_rule": "reference", "init_weights": None,
}
# 3_train_stage2.py: resnet backbone, stride 16, ce, batch 20, 30 epochs, lr 0.01 (decoder/ASPP 10×),
# momentum 0.9, weight decay 5e-4, poly per iteration over epochs × len(train_loader) steps
# (DataLoader without drop_last: ⌈N/20⌉); loss 0.6·PM + 0.2·PM_a + 0.2·PM_b with the background logit
# and batch_average; hflip + blur; the gate (Is_GM always true) multiplies logits by (p > 0.1).
STAGE2_REFERENCE = {
    "epochs": 30, "batch_size": 20, "lr": 0.01, "head_lr_mult": 10.0, "momentum": 0.9, "weight_decay": 5e-4,
    "backbone": "resnet101", "out_stride": 16, "head_channels": 256, "image_size": None, "input_norm": "none",
    "loss": "ce", "loss_reduction": "reference", "pm_layers": ("bn7", "b5_2", "b4_5"), "pm_weights": (0.6, 0.2, 0.2),
    "augment": "hflip", "stain_jitter": 0.0, "mosaic": 0.0, "gate": True, "gate_threshold": 0.1,
    "gate_mode": "reference", "drop_last": False, "init_weights": None,
}
# 2_generate_PM.py: one view, grey > 200 is white, unlabelled classes score 0 in the argmax.
PM_REFERENCE = {"layers": ("b4_5", "b5_2", "bn7"), "tie_rule": "reference", "white_rule": "grey", "scales": (1.0,),
                "flip": False}

# Steps per epoch of the real training sets, by hand: LUAD 16,678 = 833·20 + 18, BCSS 23,422 = 1171·20 + 2.
# Stage 1 drops the short batch (⌊N/20⌋), stage 2 trains on it (⌈N/20⌉).
STEPS_PER_EPOCH = {16_678: (833, 834), 23_422: (1171, 1172)}


def assert_reference(cfg, table: dict) -> None:
    got = {key: getattr(cfg, key) for key in table}
    assert got == table


def stage1_args(tmp_path: Path) -> tuple:
    return ("train-stage1", "--dataset", "luad", "--data", tmp_path / "data", "--out", tmp_path / "ckpt")


def stage2_args(tmp_path: Path) -> tuple:
    return ("train-stage2", "--dataset", "luad", "--data", tmp_path / "data", "--out", tmp_path / "ckpt")


@pytest.mark.parametrize("preset", [("--preset", "paper"), ()], ids=["paper", "no preset"])
def test_training_commands_resolve_to_the_reference(preset, tmp_path, capsys, monkeypatch):
    calls1 = record_calls(monkeypatch, stage1, "train", {})
    calls2 = record_calls(monkeypatch, stage2, "train", {})
    for args in (stage1_args(tmp_path), stage2_args(tmp_path)):
        code, _, err = run_cli(capsys, monkeypatch, *args, *preset)
        assert code == 0, err
    (cfg1,), _ = calls1[0]
    (cfg2,), _ = calls2[0]
    assert_reference(cfg1, STAGE1_REFERENCE)
    assert_reference(cfg2, STAGE2_REFERENCE)


def test_options_given_override_the_presets_rules(tmp_path, capsys, monkeypatch):
    calls1 = record_calls(monkeypatch, stage1, "train", {})
    calls2 = record_calls(monkeypatch, stage2, "train", {})
    pm_calls = record_calls(monkeypatch, pseudo_masks, "generate", {})
    record_calls(monkeypatch, pseudo_masks, "format_summary", "")
    runs = [
        (("--preset", "paper", "--tie-rule", "ours"), ("--preset", "paper", "--gate-mode", "mask", "--drop-last"),
         ("--preset", "paper", "--tie-rule", "ours"), ("ours", "mask", True, "ours")),
        (("--preset", "cpu", "--tie-rule", "reference"), ("--preset", "cpu", "--gate-mode", "reference", "--keep-last"),
         ("--preset", "cpu", "--tie-rule", "reference"), ("reference", "reference", False, "reference")),
    ]
    for a1, a2, apm, expected in runs:
        for args in ((*stage1_args(tmp_path), *a1), (*stage2_args(tmp_path), *a2),
                     ("generate-pm", "--dataset", "luad", "--data", tmp_path, "--checkpoint", tmp_path / "s1.pth", *apm)):
            code, _, err = run_cli(capsys, monkeypatch, *args)
            assert code == 0, err
        cfg1, cfg2, pm = calls1[-1][0][0], calls2[-1][0][0], pm_calls[-1][0][0]
        assert (cfg1.cam_tie_rule, cfg2.gate_mode, cfg2.drop_last, pm.tie_rule) == expected


def test_generate_pm_and_reproduce_resolve_to_the_reference(tmp_path, capsys, monkeypatch):
    pm_calls = record_calls(monkeypatch, pseudo_masks, "generate", {})
    record_calls(monkeypatch, pseudo_masks, "format_summary", "")
    code, _, err = run_cli(capsys, monkeypatch, "generate-pm", "--dataset", "luad", "--data", tmp_path,
                           "--checkpoint", tmp_path / "s1.pth", "--preset", "paper")
    assert code == 0, err
    (pm,), _ = pm_calls[0]
    assert_reference(pm, PM_REFERENCE)

    runs = record_calls(monkeypatch, reproduce, "run", {})
    record_calls(monkeypatch, reproduce, "format_report", "")
    code, _, err = run_cli(capsys, monkeypatch, "reproduce", "--dataset", "luad", "--data", tmp_path, "--preset", "paper")
    assert code == 0, err
    (cfg,), _ = runs[0]
    assert cfg.gate_mode == "reference"
    assert_reference(reproduce.stage1_config(cfg, tmp_path), STAGE1_REFERENCE)
    assert_reference(reproduce.stage2_config(cfg, tmp_path, tmp_path, tmp_path / "s1.pth", tmp_path), STAGE2_REFERENCE)
    assert_reference(reproduce.pm_config(cfg, tmp_path / "s1.pth", tmp_path), PM_REFERENCE)


@pytest.mark.parametrize("preset, ours", [("paper", False), ("cpu-paper", False), ("cpu", True), ("best", True)])
def test_cpu_and_best_keep_our_rules_and_explicit_options_win(preset, ours, tmp_path):
    s1 = resolve(Stage1Config, STAGE1_PRESETS, preset, dataset="luad", data=tmp_path)
    s2 = resolve(Stage2Config, STAGE2_PRESETS, preset, dataset="luad", data=tmp_path)
    from wsss.config import PM_PRESETS

    rules = (s1.cam_tie_rule, PM_PRESETS[preset].get("tie_rule", "reference"), s2.gate_mode, s2.drop_last)
    assert rules == (("ours", "ours", "mask", True) if ours else ("reference", "reference", "reference", False))
    flipped = resolve(Stage2Config, STAGE2_PRESETS, preset, dataset="luad", data=tmp_path,
                      gate_mode="reference" if ours else "mask", drop_last=not ours)
    assert (flipped.gate_mode, flipped.drop_last) == (("reference", False) if ours else ("mask", True))


@pytest.mark.parametrize("patches", sorted(STEPS_PER_EPOCH))
def test_poly_steps_of_the_real_datasets(patches, tmp_path):
    dist = Distributed("cpu")
    s1 = resolve(Stage1Config, STAGE1_PRESETS, "paper", dataset="luad", data=tmp_path, workers=0)
    s2 = resolve(Stage2Config, STAGE2_PRESETS, "paper", dataset="luad", data=tmp_path, workers=0)
    cpu2 = resolve(Stage2Config, STAGE2_PRESETS, "cpu", dataset="luad", data=tmp_path, workers=0, batch_size=20)
    floor, ceil = STEPS_PER_EPOCH[patches]
    assert len(stage1.train_loader(s1, [None] * patches, dist)) == floor
    assert len(stage2.train_loader(s2, [None] * patches, dist)) == ceil
    assert len(stage2.train_loader(cpu2, [None] * patches, dist)) == floor


# --------------------------------------------------------------------------- commands that load a model


def stage1_checkpoint(path: Path, preset: str | None) -> Path:
    """A thin classifier in our format, trained (as far as its record says) with ``preset``; None: a
    WSSS-Tissue-style plain state dict."""
    model = ResNet38Classifier(4, width=0.125)
    if preset is None:
        torch.save(model.state_dict(), path)
    else:
        cfg = resolve(Stage1Config, STAGE1_PRESETS, preset, dataset="luad", data=Path("."), width=0.125)
        save_checkpoint(path, stage1.checkpoint_state(model, cfg, LUAD, 0))
    return path


def stage2_checkpoint(path: Path, preset: str | None) -> Path:
    model = DeepLabV3Plus(DeepLabArch("resnet18", 16, 4, 8))
    if preset is None:
        torch.save({"state_dict": model.state_dict()}, path)
    else:
        cfg = resolve(Stage2Config, STAGE2_PRESETS, preset, dataset="luad", data=Path("."), backbone="resnet18",
                      head_channels=8)
        save_checkpoint(path, stage2.checkpoint_state(model, cfg, LUAD, 0, {}))
    return path


def empty_metrics(*args, **kwargs) -> dict:
    return ConfusionMeter(4, 4).to_json(list(LUAD.classes))


@pytest.mark.parametrize("preset, rule", [("paper", "reference"), (None, "reference"), ("cpu", "ours")],
                         ids=["paper", "published", "cpu"])
def test_eval_cam_uses_the_checkpoints_tie_rule(preset, rule, luad_root, tmp_path, capsys, monkeypatch):
    calls = record_calls(monkeypatch, stage1, "evaluate_cams", empty_metrics)
    ckpt = stage1_checkpoint(tmp_path / "s1.pth", preset)
    base = ("eval-cam", "--dataset", "luad", "--data", luad_root, "--checkpoint", ckpt, "--device", "cpu")
    for extra, expected in (((), rule), (("--tie-rule", "ours"), "ours"), (("--tie-rule", "reference"), "reference")):
        code, _, err = run_cli(capsys, monkeypatch, *base, *extra)
        assert code == 0, err
        assert calls[-1][1]["tie_rule"] == expected


@pytest.mark.parametrize("preset, mode", [("paper", "reference"), (None, "reference"), ("cpu", "mask")],
                         ids=["paper", "published", "cpu"])
def test_evaluate_uses_the_checkpoints_gate(preset, mode, luad_root, tmp_path, capsys, monkeypatch):
    calls = record_calls(monkeypatch, stage2, "evaluate_samples",
                         lambda *a, **k: {"plain": ConfusionMeter(4, 4), "gate": ConfusionMeter(4, 4)})
    s1 = stage1_checkpoint(tmp_path / "s1.pth", "paper")
    s2 = stage2_checkpoint(tmp_path / "s2.pth", preset)
    base = ("evaluate", "--dataset", "luad", "--data", luad_root, "--checkpoint", s2, "--gate",
            "--stage1-checkpoint", s1, "--device", "cpu")
    for extra, expected in (((), (0.1, mode)), (("--gate-mode", "mask", "--gate-threshold", "0.3"), (0.3, "mask"))):
        code, _, err = run_cli(capsys, monkeypatch, *base, *extra)
        assert code == 0, err
        args, kwargs = calls[-1]
        assert (args[5], kwargs["gate_mode"]) == expected  # args: seg, samples, spec, device, gate, threshold


# --------------------------------------------------------------------------- training on tiny data

S1_TINY = ("--width", "0.125", "--image-size", "32", "--epochs", "1", "--batch-size", "8", "--workers", "0",
           "--device", "cpu")
S2_TINY = ("--backbone", "resnet18", "--head-channels", "8", "--image-size", "32", "--workers", "0", "--device",
           "cpu", "--no-gate")


@pytest.fixture
def data(synth16, tmp_path) -> Path:
    """16 training patches of 32 px with pseudo-masks (the true masks), 4 val, 4 test."""
    root = tmp_path / "data"
    shutil.copytree(synth16, root)
    for layer in ("b4_5", "b5_2", "bn7"):
        shutil.copytree(root / "train_gt", root / "train_PM" / f"PM_{layer}")
    return root


def error_line(err: str) -> str:
    """The one ``error:`` line of a failed command (progress bars may precede it), asserting it is one."""
    assert err.count("error:") == 1 and "Traceback" not in err, err
    line = "error:" + err.rstrip().rsplit("error:", 1)[1]
    assert "\n" not in line, err
    return line


def warnings_in(caplog) -> list[str]:
    """The warnings of a run but the fit check's (a one-epoch tiny classifier does not fit its labels,
    which tests/cli/test_stage1.py covers)."""
    return [r.getMessage() for r in caplog.records
            if r.levelno >= logging.WARNING and "does not fit its training labels" not in r.getMessage()]


def test_paper_without_init_weights_warns_once_per_stage(data, tmp_path, capsys, monkeypatch, caplog):
    caplog.set_level(logging.INFO)
    code, _, err = run_cli(capsys, monkeypatch, "train-stage1", "--dataset", "luad", "--data", data, "--out",
                           tmp_path / "a", "--preset", "paper", *S1_TINY)
    assert code == 0, err
    (line,) = warnings_in(caplog)
    assert line.startswith("warning:") and "ilsvrc-cls_rna-a1_cls1000_ep-0001.params" in line
    assert "BatchNorm is trained and nothing is frozen" in line and "\n" not in line

    caplog.clear()
    code, _, err = run_cli(capsys, monkeypatch, "train-stage2", "--dataset", "luad", "--data", data, "--out",
                           tmp_path / "b", "--report", tmp_path / "rb", "--preset", "paper", "--epochs", "1",
                           "--batch-size", "8", *S2_TINY)
    assert code == 0, err
    (line,) = warnings_in(caplog)
    assert line.startswith("warning:") and "deeplab-resnet.pth.tar" in line and "random ResNet-18" in line


def test_no_warning_with_init_weights_or_another_preset(data, tmp_path, capsys, monkeypatch, caplog):
    caplog.set_level(logging.INFO)
    weights1 = tmp_path / "resnet38.pth"
    torch.save(ResNet38Classifier(4, width=0.125).state_dict(), weights1)
    weights2 = tmp_path / "deeplab.pth"
    torch.save(DeepLabV3Plus(DeepLabArch("resnet18", 16, 4, 8)).state_dict(), weights2)
    code, _, err = run_cli(capsys, monkeypatch, "train-stage1", "--dataset", "luad", "--data", data, "--out",
                           tmp_path / "a", "--preset", "paper", "--init-weights", weights1, *S1_TINY)
    assert code == 0, err
    code, _, err = run_cli(capsys, monkeypatch, "train-stage2", "--dataset", "luad", "--data", data, "--out",
                           tmp_path / "b", "--report", tmp_path / "rb", "--preset", "paper", "--epochs", "1",
                           "--batch-size", "8", "--init-weights", weights2, *S2_TINY)
    assert code == 0, err
    code, _, err = run_cli(capsys, monkeypatch, "train-stage2", "--dataset", "luad", "--data", data, "--out",
                           tmp_path / "c", "--report", tmp_path / "rc", "--preset", "cpu", "--epochs", "1",
                           "--batch-size", "8", *S2_TINY)
    assert code == 0, err
    assert warnings_in(caplog) == []


def recorded_losses(monkeypatch) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
    """Every stage-2 loss computed: ``(logits, masks, loss)``."""
    build = stage2.build_multi_mask_loss
    seen = []

    def spying(*args, **kwargs):
        loss_fn = build(*args, **kwargs)

        def fn(logits, masks):
            loss = loss_fn(logits, masks)
            seen.append((logits.detach().clone(), masks.clone(), loss.item()))
            return loss

        return fn

    monkeypatch.setattr(stage2, "build_multi_mask_loss", spying)
    return seen


@pytest.mark.parametrize("keep, patches, batches", [
    (True, 16, [6, 6, 4]),    # 16 = 6 + 6 + 4: the reference trains on the 4
    (False, 16, [6, 6]),      # ours leaves them out
    (True, 13, [6, 6]),       # 13 = 6 + 6 + 1: a batch of one cannot train BatchNorm, left out
], ids=["paper", "drop-last", "lone patch"])
def test_short_last_batch_and_poly_steps_by_hand(keep, patches, batches, data, tmp_path, capsys, monkeypatch):
    for path in sorted((data / "train").glob("*.png"))[patches:]:
        path.unlink()
    steps = record_calls(monkeypatch, stage2, "build_optimizer", stage2.build_optimizer)
    losses = recorded_losses(monkeypatch)
    code, _, err = run_cli(capsys, monkeypatch, "train-stage2", "--dataset", "luad", "--data", data, "--out",
                           tmp_path / "ckpt", "--report", tmp_path / "report", "--epochs", "2", "--batch-size", "6",
                           "--keep-last" if keep else "--drop-last", *S2_TINY)
    assert code == 0, err
    assert steps[0][0][2] == 2 * len(batches)  # poly max_step: epochs × batches per epoch
    assert [logits.shape[0] for logits, _, _ in losses] == batches * 2
    last = load_checkpoint(tmp_path / "ckpt" / "stage2_luad_last.pth")
    assert last["scheduler"]["last_epoch"] == 2 * len(batches)
    # the reference's loss of a batch of B: the background logit (100 where PM_bn7 is 4) appended for
    # every term, cross-entropy averaged over all pixels, then divided by B (the short batch's own B)
    logits, masks, loss = losses[len(batches) - 1]
    b = logits.shape[0]
    extra = 100.0 * (masks[:, 0] == 4).float().unsqueeze(1)
    five = torch.cat([logits, extra], dim=1)
    expected = sum(w * F.cross_entropy(five, masks[:, i].long(), ignore_index=255) / b
                   for i, w in enumerate((0.6, 0.2, 0.2)))
    assert loss == pytest.approx(expected.item(), rel=1e-5)


def test_resume_is_bit_exact_with_the_short_batch(data, tmp_path, capsys, monkeypatch):
    args = ("train-stage2", "--dataset", "luad", "--data", data, "--epochs", "2", "--batch-size", "6", *S2_TINY)
    code, _, err = run_cli(capsys, monkeypatch, *args, "--out", tmp_path / "full", "--report", tmp_path / "rf")
    assert code == 0, err
    real = stage2.train_one_epoch

    def stop_in_epoch_2(*a, **k):
        if a[-1] == 1:
            raise KeyboardInterrupt
        return real(*a, **k)

    with monkeypatch.context() as m:
        m.setattr(stage2, "train_one_epoch", stop_in_epoch_2)
        with pytest.raises(KeyboardInterrupt):
            stage2.train(resolve(Stage2Config, STAGE2_PRESETS, None, dataset="luad", data=data, out=tmp_path / "cut",
                                 report=tmp_path / "rc", epochs=2, batch_size=6, backbone="resnet18", head_channels=8,
                                 image_size=32, workers=0, device="cpu", gate=False))
    code, _, err = run_cli(capsys, monkeypatch, *args, "--out", tmp_path / "cut", "--report", tmp_path / "rc",
                           "--resume")
    assert code == 0, err
    full = load_checkpoint(tmp_path / "full" / "stage2_luad_last.pth")
    cut = load_checkpoint(tmp_path / "cut" / "stage2_luad_last.pth")
    assert full["scheduler"]["last_epoch"] == cut["scheduler"]["last_epoch"] == 6
    for name, tensor in full["model"].items():
        assert torch.equal(tensor, cut["model"][name]), name


def test_a_run_saved_before_drop_last_existed_resumes_dropping_it(tmp_path):
    """A stage-2 run saved by a wsss without ``drop_last`` dropped its short last batch: resuming it
    must go on doing so (its poly schedule counted ⌊N/batch⌋ steps), whatever today's default."""
    from wsss.config import from_dict, to_dict

    saved = to_dict(resolve(Stage2Config, STAGE2_PRESETS, "paper", dataset="luad", data=tmp_path))
    assert from_dict(Stage2Config, saved).drop_last is False
    del saved["drop_last"]
    assert from_dict(Stage2Config, saved).drop_last is True


# --------------------------------------------------------------------------- the best checkpoint


def fake_validation(monkeypatch, scores) -> None:
    values = iter(scores)

    def validate(*args, **kwargs):
        return {"mIoU": next(values), "fwIoU": 0.0, "pixel_acc": 0.0, "mean_class_acc": 0.0}

    monkeypatch.setattr(stage2, "score_val", validate)


def s2_run(data: Path, tmp_path: Path, epochs: int = 2) -> tuple:
    return ("train-stage2", "--dataset", "luad", "--data", data, "--out", tmp_path / "ckpt", "--report",
            tmp_path / "report", "--epochs", str(epochs), "--batch-size", "8", *S2_TINY)


@pytest.mark.parametrize("nan", [math.nan, None], ids=["nan", "null"])
def test_nan_validation_stops_with_one_line_and_resumes(nan, data, tmp_path, capsys, monkeypatch):
    fake_validation(monkeypatch, [0.25, nan])
    code, out, err = run_cli(capsys, monkeypatch, *s2_run(data, tmp_path))
    assert code == 1
    line = error_line(err)
    assert line.startswith("error: the validation mIoU of epoch 2 of 2 is NaN")
    last = tmp_path / "ckpt" / "stage2_luad_last.pth"
    assert f"epoch 1 of 2 saved in {last}" in line and line.endswith("--resume")
    assert load_checkpoint(last)["epoch"] == 0
    best = load_checkpoint(tmp_path / "ckpt" / "stage2_checkpoint_trained_on_luad.pth")
    assert best["epoch"] == 0 and best["best_metric"] == 0.25
    assert not (tmp_path / "report" / "metrics.json").exists()
    # the line's advice works: with a finite validation the run continues from epoch 2
    fake_validation(monkeypatch, [0.5])
    code, _, err = run_cli(capsys, monkeypatch, *s2_run(data, tmp_path), "--resume")
    assert code == 0, err
    assert load_checkpoint(tmp_path / "ckpt" / "stage2_checkpoint_trained_on_luad.pth")["epoch"] == 1


def test_nan_in_the_first_epoch_says_nothing_was_saved(data, tmp_path, capsys, monkeypatch):
    fake_validation(monkeypatch, [math.nan])
    code, _, err = run_cli(capsys, monkeypatch, *s2_run(data, tmp_path, epochs=1))
    assert code == 1
    line = error_line(err)
    assert "no epoch finished yet" in line and line.endswith("--resume")
    assert not (tmp_path / "ckpt" / "stage2_checkpoint_trained_on_luad.pth").exists()


def test_a_model_is_kept_only_above_zero_as_the_reference(data, tmp_path, capsys, monkeypatch):
    fake_validation(monkeypatch, [0.0, 0.3])
    code, _, err = run_cli(capsys, monkeypatch, *s2_run(data, tmp_path / "a"))
    assert code == 0, err
    assert load_checkpoint(tmp_path / "a" / "ckpt" / "stage2_checkpoint_trained_on_luad.pth")["epoch"] == 1
    fake_validation(monkeypatch, [0.0, 0.0])
    code, _, err = run_cli(capsys, monkeypatch, *s2_run(data, tmp_path / "b"))
    assert code == 1
    assert "no epoch reached a validation mIoU above 0" in error_line(err)


def test_reproduce_names_the_initial_weights_it_was_given(tmp_path):
    cfg = reproduce.ReproduceConfig(dataset="luad", data=tmp_path, run="r",
                                    stage1_init=Path("checkpoints/ilsvrc-cls_rna-a1_cls1000_ep-0001.params"))
    weights = reproduce.init_weights(cfg)
    assert weights == {"stage1": "checkpoints/ilsvrc-cls_rna-a1_cls1000_ep-0001.params", "stage2": None}
    assert reproduce.describe_init_weights(weights) == (
        "stage 1 checkpoints/ilsvrc-cls_rna-a1_cls1000_ep-0001.params; stage 2 none (random initialisation)")
