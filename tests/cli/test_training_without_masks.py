"""A dataset of labelled training patches and no val/test masks trains end to end: stage 1 leaves
out its CAM evaluation, stage 2 keeps its last epoch, and the reports say so (one line each, never a
crash, never a made-up number); with val masks but no test masks, stage 2 keeps its best epoch on val
and leaves the test scores out."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from helpers import run_cli
from wsss.runtime import load_checkpoint

STAGE1 = ("--preset", "cpu", "--epochs", "1", "--batch-size", "8", "--device", "cpu")
STAGE2 = ("--preset", "cpu", "--epochs", "2", "--batch-size", "8", "--head-channels", "8", "--no-gate",
          "--device", "cpu")


@pytest.fixture
def labelled_only(synth16, tmp_path) -> Path:
    data = tmp_path / "data"
    shutil.copytree(synth16, data, ignore=shutil.ignore_patterns("val", "test", "train_gt"))
    return data


def _ok(capsys, monkeypatch, *args) -> tuple[str, str]:
    code, out, err = run_cli(capsys, monkeypatch, *args)
    assert code == 0, f"{args[0]}: {err}"
    return out, err


def test_both_stages_train_on_labelled_patches_alone(labelled_only, tmp_path, capsys, monkeypatch, caplog):
    caplog.set_level(logging.INFO)
    data, ckpt, report = labelled_only, tmp_path / "ckpt", tmp_path / "report"
    out, _ = _ok(capsys, monkeypatch, "check-data", data, "--dataset", "luad")
    assert "no problems found" in out and "note: no masks in" in out and "patches at 7 µm/px" in out
    _ok(capsys, monkeypatch, "train-stage1", "--dataset", "luad", "--data", data, "--out", ckpt, *STAGE1)
    s1 = ckpt / "stage1_checkpoint_trained_on_luad.pth"
    assert json.loads((ckpt / "stage1_luad_cam_metrics.json").read_text()) == {}
    lines = [r.getMessage() for r in caplog.records if "no masks in" in r.getMessage()]
    assert lines == [f"no masks in {data / 'val'}/mask or {data / 'test'}/mask: their CAM evaluation is left out "
                     "(stage 1 keeps its last epoch either way)"]
    _ok(capsys, monkeypatch, "generate-pm", "--data", data, "--checkpoint", s1, "--device", "cpu", "--workers", 0)
    out, _ = _ok(capsys, monkeypatch, "train-stage2", "--dataset", "luad", "--data", data, "--out", ckpt,
                 "--report", report, *STAGE2)
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["kept"] == "last epoch (no val masks)" and metrics["best_epoch"] == 2
    assert metrics["test"] is None and metrics["test_gate"] is None and metrics["val_best"] is None
    assert metrics["left_out"] == f"no masks in {data / 'test'}/mask: the test scores are left out"
    assert out.strip() == f"kept: last epoch (no val masks), epoch 2; {metrics['left_out']}"
    best = load_checkpoint(ckpt / "stage2_checkpoint_trained_on_luad.pth")
    assert best["epoch"] == 1 and best["best_metric"] is None  # the last of epochs 0, 1
    assert best["mpp"] == 7.0 and best["patch_size"] == 32


def test_stage2_with_val_masks_but_no_test_masks(synth16, tmp_path, capsys, monkeypatch):
    data = tmp_path / "data"
    shutil.copytree(synth16, data, ignore=shutil.ignore_patterns("test", "train_gt"))
    (data / "train_PM").mkdir()
    for layer in ("bn7", "b5_2", "b4_5"):  # the true masks as pseudo-masks: no stage 1 needed
        shutil.copytree(synth16 / "train_gt", data / "train_PM" / f"PM_{layer}")
    _ok(capsys, monkeypatch, "train-stage2", "--dataset", "luad", "--data", data, "--out", tmp_path / "ckpt",
        "--report", tmp_path / "report", *STAGE2)
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert metrics["kept"] == "best validation mIoU" and metrics["val_best"]["mIoU"] is not None
    assert metrics["test"] is None and "the test scores are left out" in metrics["left_out"]
