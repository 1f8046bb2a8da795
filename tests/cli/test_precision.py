"""``--precision fp32|bf16|fp16|auto`` (and ``--amp``, its old spelling) on every command that runs a
model: refusal of other values, what ``auto`` and ``amp`` resolve to, runs that record the precision
they computed in, resuming in another precision (the gradient scaler of fp16 included), and the
loss check every few steps."""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import S1, S2, interrupt_at_epoch, run_cli, tiny_reproduce
from wsss import config as cfglib
from wsss import runtime
from wsss.config import Stage1Config
from wsss.errors import WsssError
from wsss.runs.owner import MANIFEST_NAME, Manifest
from wsss.stages import common, stage1, stage2
from wsss.stages.reproduce import run as run_reproduce

S1_ONE_EPOCH = (*S1[:4], "--epochs", "1", *S1[6:])


# --------------------------------------------------------------------------- the option


def _commands(synth16: Path, ckpts: dict, tmp: Path) -> dict[str, list]:
    data = ["--dataset", "luad", "--data", synth16]
    image = tmp / "in.png"
    Image.fromarray(np.full((40, 40, 3), 120, np.uint8)).save(image)
    return {
        "train-stage1": ["train-stage1", *data, "--out", tmp / "o1", *S1_ONE_EPOCH],
        "train-stage2": ["train-stage2", *data, "--out", tmp / "o2", "--report", tmp / "r2", *S2],
        "eval-cam": ["eval-cam", *data, "--checkpoint", ckpts["s1a"], "--device", "cpu"],
        "generate-pm": ["generate-pm", *data, "--checkpoint", ckpts["s1a"], "--out", tmp / "pm", "--device", "cpu"],
        "evaluate": ["evaluate", *data, "--checkpoint", ckpts["s2"], "--device", "cpu"],
        "predict": ["predict", image, "--checkpoint", ckpts["s2"], "--out", tmp / "p", "--device", "cpu"],
        "predict-wsi": ["predict-wsi", image, "--checkpoint", ckpts["s2"], "--out", tmp / "w", "--device", "cpu"],
        "reproduce": ["reproduce", *data, "--out", tmp / "rc", "--report", tmp / "rr", "--device", "cpu"],
    }


@pytest.mark.parametrize("command", ["train-stage1", "train-stage2", "eval-cam", "generate-pm", "evaluate", "predict",
                                     "predict-wsi", "reproduce"])
def test_an_unknown_precision_is_one_error_line_and_nothing_is_written(command, synth16, thin_ckpts, tmp_path,
                                                                       capsys, monkeypatch):
    args = _commands(synth16, thin_ckpts, tmp_path)[command]
    before = sorted(p.name for p in tmp_path.iterdir())
    code, _, err = run_cli(capsys, monkeypatch, *args, "--precision", "fp8")
    assert code == 1
    assert err.strip().splitlines() == ["error: --precision must be one of fp32, bf16, fp16, auto, not 'fp8'"]
    assert sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.parametrize("command", ["train-stage1", "train-stage2", "evaluate", "predict", "predict-wsi"])
def test_amp_with_precision_is_one_error_line(command, synth16, thin_ckpts, tmp_path, capsys, monkeypatch):
    args = _commands(synth16, thin_ckpts, tmp_path)[command]
    code, _, err = run_cli(capsys, monkeypatch, *args, "--amp", "--precision", "bf16")
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert err.startswith("error: --amp/--no-amp is the old spelling of --precision")


def test_what_each_precision_computes_in(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    for has_bf16, auto_cpu in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(runtime, "cpu_has_bf16", lambda has=has_bf16: has)
        table = {("fp32", cpu): "fp32", ("bf16", cpu): "bf16", ("fp16", cpu): "fp16", ("auto", cpu): auto_cpu,
                 ("amp", cpu): "bf16", ("fp32", cuda): "fp32", ("bf16", cuda): "bf16", ("fp16", cuda): "fp16",
                 ("auto", cuda): "bf16", ("amp", cuda): "fp16"}
        for (asked, device), expected in table.items():
            assert runtime.resolve_precision(asked, device) == expected, (asked, device, has_bf16)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    assert runtime.resolve_precision("auto", cuda) == "fp32"  # a GPU without bf16 (before Ampere)
    # A gradient scaler for fp16 only; autocast only where asked.
    assert runtime.grad_scaler(cpu, "fp16").is_enabled()
    assert not runtime.grad_scaler(cpu, "bf16").is_enabled() and not runtime.grad_scaler(cpu, "fp32").is_enabled()
    with runtime.autocast(cpu, "bf16"):
        assert torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.bfloat16
    with runtime.autocast(cpu, "fp32"):
        assert torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.float32


AVX512 = {"avx2", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni"}


@pytest.mark.parametrize("machine, flags, onednn, native", [
    ("x86_64", AVX512, True, False),  # oneDNN has bf16 kernels on every AVX-512 CPU, emulated here
    ("x86_64", AVX512 | {"avx512_bf16"}, True, True),
    ("x86_64", AVX512 | {"amx_bf16", "amx_tile"}, True, True),
    ("x86_64", AVX512 | {"avx512_bf16"}, False, False),  # ONEDNN_MAX_CPU_ISA below bf16
    ("x86_64", {"avx2"}, False, False),
    ("aarch64", set(), True, True),  # torch checks Arm's BF16 extension itself
    ("aarch64", set(), False, False),
])
def test_auto_means_bf16_only_where_the_cpu_computes_it_natively(machine, flags, onednn, native, monkeypatch):
    """``auto`` must not pick bf16 on an AVX-512 CPU without AVX512-BF16 or AMX: oneDNN runs it there
    by emulation, 2.5x slower than fp32."""
    monkeypatch.setattr(runtime.platform, "machine", lambda: machine)
    monkeypatch.setattr(runtime, "_x86_cpu_flags", lambda: frozenset(flags))
    monkeypatch.setattr(runtime, "_onednn_bf16", lambda: onednn)
    assert runtime.cpu_has_bf16() is native
    assert runtime.resolve_precision("auto", torch.device("cpu")) == ("bf16" if native else "fp32")


def test_cpu_flags_are_read_from_the_flags_line(tmp_path, monkeypatch):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: some avx512_bf16 CPU\nflags\t\t: fpu avx2 avx512f\n\n"
                    "processor\t: 1\nflags\t\t: fpu avx2 avx512f\n")
    real = runtime.Path
    monkeypatch.setattr(runtime, "Path", lambda p: info if p == "/proc/cpuinfo" else real(p))
    assert runtime._x86_cpu_flags() == {"fpu", "avx2", "avx512f"}  # not the model name's words


def test_old_configs_with_amp_read_as_precision(tmp_path):
    saved = cfglib.to_dict(Stage1Config(dataset="luad", data=tmp_path))
    del saved["precision"]
    for amp, precision in ((True, "amp"), (False, "fp32")):
        cfg = cfglib.from_dict(Stage1Config, {**saved, "amp": amp})
        assert cfg.precision == precision
        # a saved run with the old setting on is no "setting this version lacks"
        common._refuse_unknown_settings(Stage1Config, {**saved, "amp": amp}, stage1.Stage1Paths(tmp_path, "luad"))


# --------------------------------------------------------------------------- runs record their precision


def test_bf16_training_records_its_precision_and_differs_from_fp32(synth16, tmp_path, capsys, monkeypatch):
    runs = {}
    for name, precision in (("bf16", "bf16"), ("bf16_again", "bf16"), ("fp32", "fp32")):
        out = tmp_path / name
        code, stdout, err = run_cli(capsys, monkeypatch, "train-stage1", "--dataset", "luad", "--data", synth16,
                                    "--out", out, *S1_ONE_EPOCH, "--precision", precision)
        assert code == 0, err
        assert json.loads((out / "stage1_luad_config.json").read_text())["precision"] == precision
        ckpt = torch.load(out / "stage1_checkpoint_trained_on_luad.pth", map_location="cpu", weights_only=True)
        assert ckpt["config"]["precision"] == precision
        assert math.isfinite(json.loads(stdout)["val"])  # the CAM evaluation ran too
        runs[name] = ckpt["model"]
    # bf16 computes in bf16 (other weights than fp32), and deterministically (the same weights twice).
    assert all(torch.equal(runs["bf16"][k], runs["bf16_again"][k]) for k in runs["bf16"])
    assert not all(torch.equal(runs["bf16"][k], runs["fp32"][k]) for k in runs["bf16"])


@pytest.mark.parametrize("has_bf16, recorded", [(True, "bf16"), (False, "fp32")])
def test_auto_records_what_it_computed_in(has_bf16, recorded, synth16, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: has_bf16)
    code, _, err = run_cli(capsys, monkeypatch, "train-stage1", "--dataset", "luad", "--data", synth16,
                           "--out", tmp_path, *S1_ONE_EPOCH, "--precision", "auto")
    assert code == 0, err
    assert json.loads((tmp_path / "stage1_luad_config.json").read_text())["precision"] == recorded


def test_amp_is_bf16_on_the_cpu(synth16, tmp_path, capsys, monkeypatch):
    code, _, err = run_cli(capsys, monkeypatch, "train-stage1", "--dataset", "luad", "--data", synth16,
                           "--out", tmp_path, *S1_ONE_EPOCH, "--amp")
    assert code == 0, err
    assert json.loads((tmp_path / "stage1_luad_config.json").read_text())["precision"] == "bf16"


def _settings(out: Path) -> dict:
    return Manifest.read(out).runs[-1]["config"]["settings"]


def test_predict_in_bf16_records_its_precision_and_refuses_to_mix(thin_ckpts, tmp_path, capsys, monkeypatch):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(tmp_path / "in.png")
    args = ("predict", tmp_path / "in.png", "--checkpoint", thin_ckpts["s2"], "--out", tmp_path / "p", "--tile", "32",
            "--overlap", "8", "--device", "cpu")
    code, _, err = run_cli(capsys, monkeypatch, *args, "--precision", "bf16")
    assert code == 0, err
    assert (tmp_path / "p" / "in_mask.png").is_file() and _settings(tmp_path / "p")["precision"] == "bf16"
    code, _, err = run_cli(capsys, monkeypatch, *args)  # fp32 into the same folder: other settings
    assert code == 1 and 'precision: "bf16" → "fp32"' in err and len(err.strip().splitlines()) == 1


def test_predictions_an_older_wsss_made_without_amp_count_as_fp32(thin_ckpts, tmp_path, capsys, monkeypatch):
    Image.fromarray(np.full((40, 40, 3), 100, np.uint8)).save(tmp_path / "in.png")
    args = ("predict", tmp_path / "in.png", "--checkpoint", thin_ckpts["s2"], "--out", tmp_path / "p", "--tile", "32",
            "--overlap", "8", "--device", "cpu")
    assert run_cli(capsys, monkeypatch, *args)[0] == 0
    journal = tmp_path / "p" / MANIFEST_NAME
    entries = [json.loads(line) for line in journal.read_text().splitlines()]
    for entry in entries:  # what an older wsss recorded: "amp": false instead of "precision"
        settings = (entry.get("config") or {}).get("settings")
        if settings is not None:
            settings["amp"] = not settings.pop("precision") == "fp32"
    journal.write_text("".join(json.dumps(e) + "\n" for e in entries))
    assert "amp" in _settings(tmp_path / "p")
    code, stdout, err = run_cli(capsys, monkeypatch, *args)
    assert code == 0 and "1 of 1 images segmented" in stdout, err
    code, _, err = run_cli(capsys, monkeypatch, *args, "--precision", "bf16")
    assert code == 1 and "another model or settings" in err


def _signature(out: Path) -> dict:
    return Manifest.read(out).runs[-1]["config"]["signature"]


def test_pseudo_masks_in_bf16_record_it_and_are_not_mixed_with_fp32(synth16, thin_ckpts, tmp_path, capsys,
                                                                   monkeypatch):
    args = ("generate-pm", "--dataset", "luad", "--data", synth16, "--checkpoint", thin_ckpts["s1a"], "--out",
            tmp_path / "pm", "--device", "cpu", "--workers", "0")
    code, stdout, err = run_cli(capsys, monkeypatch, *args, "--precision", "bf16")
    assert code == 0 and "16 computed" in stdout, err
    assert _signature(tmp_path / "pm")["precision"] == "bf16"
    code, _, err = run_cli(capsys, monkeypatch, *args)  # fp32 would mix two precisions' masks
    assert code == 1 and 'precision: "bf16" → "fp32"' in err and len(err.strip().splitlines()) == 1
    code, stdout, err = run_cli(capsys, monkeypatch, *args, "--precision", "bf16")  # the same: all kept
    assert code == 0 and "0 computed, 16 skipped" in stdout, err


def test_pseudo_masks_an_older_wsss_made_count_as_fp32(synth16, thin_ckpts, tmp_path, capsys, monkeypatch):
    args = ("generate-pm", "--dataset", "luad", "--data", synth16, "--checkpoint", thin_ckpts["s1a"], "--out",
            tmp_path / "pm", "--device", "cpu", "--workers", "0")
    assert run_cli(capsys, monkeypatch, *args)[0] == 0
    journal = tmp_path / "pm" / MANIFEST_NAME
    entries = [json.loads(line) for line in journal.read_text().splitlines()]
    for entry in entries:  # an older wsss recorded no precision
        (entry.get("config") or {}).get("signature", {}).pop("precision", None)
    journal.write_text("".join(json.dumps(e) + "\n" for e in entries))
    assert "precision" not in _signature(tmp_path / "pm")
    code, stdout, err = run_cli(capsys, monkeypatch, *args)
    assert code == 0 and "0 computed, 16 skipped" in stdout, err


# --------------------------------------------------------------------------- resuming in another precision


def _stage1_args(synth16: Path, out: Path) -> tuple:
    return ("train-stage1", "--dataset", "luad", "--data", synth16, "--out", out, *S1[:4], "--epochs", "2", *S1[6:])


def test_resume_may_change_the_precision(synth16, tmp_path, capsys, monkeypatch):
    args = _stage1_args(synth16, tmp_path)
    with monkeypatch.context() as m:
        interrupt_at_epoch(m, stage1)
        code, _, _ = run_cli(capsys, monkeypatch, *args)
    assert code == 130
    assert json.loads((tmp_path / "stage1_luad_config.json").read_text())["precision"] == "fp32"
    code, _, err = run_cli(capsys, monkeypatch, *args, "--resume", "--precision", "bf16")
    assert code == 0, err
    assert json.loads((tmp_path / "stage1_luad_config.json").read_text())["precision"] == "bf16"
    assert torch.load(tmp_path / "stage1_luad_last.pth", weights_only=True)["epoch"] == 1


def test_resuming_in_fp16_a_stage1_run_saved_without_it_starts_a_fresh_scaler(synth16, tmp_path, capsys,
                                                                             monkeypatch):
    """fp16 uses a gradient scaler (also on the CPU); a run saved in fp32 saved a disabled scaler's
    empty state, which GradScaler.load_state_dict refuses: the resumed run must start a fresh one."""
    args = _stage1_args(synth16, tmp_path)
    with monkeypatch.context() as m:
        interrupt_at_epoch(m, stage1)
        assert run_cli(capsys, monkeypatch, *args)[0] == 130
    assert torch.load(tmp_path / "stage1_luad_last.pth", weights_only=True)["scaler"] == {}
    code, _, err = run_cli(capsys, monkeypatch, *args, "--resume", "--precision", "fp16")
    assert code == 0, err
    scaler = torch.load(tmp_path / "stage1_luad_last.pth", weights_only=True)["scaler"]
    assert scaler["scale"] > 0 and scaler["_growth_tracker"] >= 0  # an enabled scaler's state was saved


def test_resuming_in_fp16_a_stage2_run_saved_without_it_starts_a_fresh_scaler(synth16, tmp_path, capsys,
                                                                             monkeypatch):
    root = tmp_path / "data"
    shutil.copytree(synth16, root)
    for layer in ("b4_5", "b5_2", "bn7"):
        shutil.copytree(root / "train_gt", root / "train_PM" / f"PM_{layer}")
    args = ("train-stage2", "--dataset", "luad", "--data", root, *S2[:6], "--epochs", "2", *S2[8:],
            "--out", tmp_path / "ckpt", "--report", tmp_path / "report")
    with monkeypatch.context() as m:
        interrupt_at_epoch(m, stage2)
        assert run_cli(capsys, monkeypatch, *args)[0] == 130
    code, _, err = run_cli(capsys, monkeypatch, *args, "--resume", "--precision", "fp16")
    assert code == 0, err
    assert torch.load(tmp_path / "ckpt" / "stage2_luad_last.pth", weights_only=True)["scaler"]["scale"] > 0
    code, _, err = run_cli(capsys, monkeypatch, *args, "--resume", "--precision", "fp32")  # and back: nothing left
    assert code == 0, err


def test_an_fp16_run_resumes_to_the_same_model_and_scaler(synth16, tmp_path, capsys, monkeypatch):
    whole = _stage1_args(synth16, tmp_path / "whole")
    assert run_cli(capsys, monkeypatch, *whole, "--precision", "fp16")[0] == 0
    cut = _stage1_args(synth16, tmp_path / "cut")
    with monkeypatch.context() as m:
        interrupt_at_epoch(m, stage1)
        assert run_cli(capsys, monkeypatch, *cut, "--precision", "fp16")[0] == 130
    assert run_cli(capsys, monkeypatch, *cut, "--precision", "fp16", "--resume")[0] == 0
    a = torch.load(tmp_path / "whole" / "stage1_luad_last.pth", weights_only=True)
    b = torch.load(tmp_path / "cut" / "stage1_luad_last.pth", weights_only=True)
    assert a["scaler"] == b["scaler"]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


# --------------------------------------------------------------------------- the loss check


class _Bar:
    def __init__(self) -> None:
        self.postfix = []

    def set_postfix(self, **kw) -> None:
        self.postfix.append(kw)


class _Writer:
    def __init__(self) -> None:
        self.scalars = []

    def add_scalar(self, tag, value, step) -> None:
        self.scalars.append((tag, value, step))


class _Optimizer:
    param_groups = [{"lr": 0.5}]


def test_losses_are_read_back_every_few_steps_and_a_nan_names_its_step(monkeypatch):
    monkeypatch.setattr(common, "CHECK_EVERY", 4)
    dist = runtime.Distributed("cpu")
    bar, writer = _Bar(), _Writer()
    losses = common.StepLosses(dist, epoch=2, first_step=100, bar=bar, writer=writer, tag="loss", optimizer=_Optimizer())
    for step, value in enumerate([1.0, 0.5, 0.25]):
        losses.add(step, torch.tensor(value))
    assert writer.scalars == [] and bar.postfix == []  # nothing read back before the 4th step
    losses.add(3, torch.tensor(0.125))
    assert [s for s in writer.scalars if s[0] == "loss"] == [("loss", 1.0, 100), ("loss", 0.5, 101),
                                                             ("loss", 0.25, 102), ("loss", 0.125, 103)]
    assert ("train/lr", 0.5, 103) in writer.scalars and bar.postfix[-1]["loss"] == "0.1250"
    losses.add(4, torch.tensor(2.0))
    losses.add(5, torch.tensor(float("nan")))
    losses.add(6, torch.tensor(float("inf")))
    with pytest.raises(WsssError, match=r"^loss is not finite at epoch 3, step 6; try a lower --lr"):
        losses.flush()


def test_reproduce_runs_every_step_in_the_precision_asked(tmp_path, tiny_presets):
    """The whole chain in bf16: each step records it, and the numbers are real numbers."""
    result = run_reproduce(tiny_reproduce(tmp_path, precision="bf16"))
    ckpt = tmp_path / "ckpt"
    assert json.loads((ckpt / "stage1_luad_config.json").read_text())["precision"] == "bf16"
    assert json.loads((ckpt / "stage2_luad_config.json").read_text())["precision"] == "bf16"
    assert _signature(ckpt / "train_PM")["precision"] == "bf16"
    assert result["precision"] == "bf16" and "precision bf16" in (tmp_path / "report" / "report.md").read_text()
    assert math.isfinite(result["stage2"]["test_gate"]["pixel_acc"])


def test_usable_cpus_are_the_affinity_mask_not_the_host(monkeypatch):
    """reproduce's synthetic data uses a process per usable CPU: a process pinned to 2 of 64 CPUs
    (taskset, a container's cpuset) gets 2."""
    monkeypatch.setattr(runtime.os, "cpu_count", lambda: 64)
    monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda pid: {3, 7}, raising=False)
    assert runtime.usable_cpus() == 2

    def unsupported(pid):
        raise AttributeError("no sched_getaffinity here")

    monkeypatch.setattr(runtime.os, "sched_getaffinity", unsupported, raising=False)
    assert runtime.usable_cpus() == 64


@pytest.mark.parametrize("native", [True, False])
def test_bf16_asked_for_on_a_cpu_without_it_warns_once(native, synth16, tmp_path, capsys, monkeypatch, caplog):
    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: native)
    runtime._warn_emulated_bf16.cache_clear()
    code, _, err = run_cli(capsys, monkeypatch, "train-stage1", "--dataset", "luad", "--data", synth16,
                           "--out", tmp_path, *S1_ONE_EPOCH, "--precision", "bf16")
    assert code == 0, err
    assert sum("no native bf16" in r.getMessage() for r in caplog.records) == (0 if native else 1)
    assert json.loads((tmp_path / "stage1_luad_config.json").read_text())["precision"] == "bf16"


def test_evaluate_warns_of_a_stage1_checkpoint_without_gate(synth16, thin_ckpts, capsys, monkeypatch, caplog):
    args = ("evaluate", "--dataset", "luad", "--data", synth16, "--checkpoint", thin_ckpts["s2"], "--device", "cpu")
    code, out, err = run_cli(capsys, monkeypatch, *args, "--stage1-checkpoint", thin_ckpts["s1a"])
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert code == 0, err
    assert warnings == ["warning: --stage1-checkpoint is used only with --gate; segmenting without the gate"]
    assert "with the gate" not in out
    code, _, err = run_cli(capsys, monkeypatch, *args, "--gate")
    assert code == 1 and "--gate needs --stage1-checkpoint" in err


def test_train_stage2_warns_of_a_stage1_checkpoint_without_gate(synth16, thin_ckpts, caplog):
    from wsss.data.specs import LUAD
    from wsss.stages import stage2

    cfg = cfglib.Stage2Config(dataset="luad", data=synth16, gate=False, stage1_checkpoint=thin_ckpts["s1a"])
    assert stage2._gate_classifier(cfg, LUAD) is None
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == [
        "warning: --stage1-checkpoint is used only with --gate; segmenting without the gate"]
    caplog.clear()
    assert stage2._gate_classifier(cfglib.Stage2Config(dataset="luad", data=synth16, gate=False), LUAD) is None
    assert not caplog.records
