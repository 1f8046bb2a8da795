"""Kill each stage (SIGKILL, no cleanup) at a random point, continue it, and compare with an
uninterrupted run: the same tensors, the same pseudo-mask and prediction bytes, the same metrics.

The killed runs are real processes (``wsss.cli.main`` in a child Python) that kill themselves around a random one of
their file replacements (``os.replace``, the step that makes a written file visible), just before or
just after it: the points where what is on disk changes. The uninterrupted runs and the
continuations run in-process (``wsss.cli.main``).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import torch

from helpers import S1, S2, run_cli

SEEDS = (0, 1)

KILLER = r"""
import os, signal, sys
import torch
torch.set_num_threads(1)  # as the in-process runs (conftest): float sums depend on the thread count
n, phase = int(sys.argv[1]), sys.argv[2]
real, count = os.replace, [0]
def replace(src, dst, *args, **kwargs):
    count[0] += 1
    if count[0] == n and phase == "before":
        os.kill(os.getpid(), signal.SIGKILL)
    real(src, dst, *args, **kwargs)
    if count[0] == n and phase == "after":
        os.kill(os.getpid(), signal.SIGKILL)
os.replace = replace
sys.argv = ["wsss", *sys.argv[3:]]
from wsss.cli import main
main()
"""


def count_replaces(monkeypatch, capsys, *args) -> int:
    """Run a command in-process, uninterrupted, counting its file replacements."""
    real, count = os.replace, [0]

    def counting(src, dst, *rest, **kw):
        count[0] += 1
        return real(src, dst, *rest, **kw)

    with monkeypatch.context() as m:
        m.setattr(os, "replace", counting)
        code, _, err = run_cli(capsys, monkeypatch, *args)
    assert code == 0, err
    return count[0]


def killed_runs(runs: list[tuple[int, str, list]]) -> None:
    """``wsss ARGS`` in child processes (started together: their imports overlap), each SIGKILLing
    itself around its ``n``-th ``os.replace``; returns when all are gone."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[2]),
                                                        os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, "-c", KILLER, str(n), phase, *map(str, args)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for n, phase, args in runs]
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode in (-signal.SIGKILL, 0), err  # 0: it finished before that replacement


def points(seed: int, total: int) -> tuple[int, str]:
    rng = random.Random(seed)
    return rng.randint(1, total), rng.choice(("before", "after"))


def tensors(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_checkpoint(a: Path, b: Path) -> None:
    x, y = tensors(a), tensors(b)
    assert x["epoch"] == y["epoch"] and x.get("best_metric") == y.get("best_metric")
    assert x["model"].keys() == y["model"].keys()
    for name in x["model"]:
        assert torch.equal(x["model"][name], y["model"][name]), name


def visible_files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)}


def test_train_stage1_killed_anywhere_resumes_to_the_same_model(synth16, tmp_path, capsys, monkeypatch):
    args = ("train-stage1", "--dataset", "luad", "--data", synth16, *S1[:4], "--epochs", "2", *S1[6:])
    total = count_replaces(monkeypatch, capsys, *args, "--out", tmp_path / "ref")
    killed_runs([(*points(seed, total), [*args, "--out", tmp_path / f"cut{seed}"]) for seed in SEEDS])
    for seed in SEEDS:
        out = tmp_path / f"cut{seed}"
        n, phase = points(seed, total)
        code, _, err = run_cli(capsys, monkeypatch, *args, "--out", out, "--resume")
        assert code == 0, f"killed {phase} replacement {n} of {total}: {err}"
        assert not list(out.glob(".wsss-lock*"))  # the killed run's lock was taken over, then released
        assert_same_checkpoint(tmp_path / "ref" / "stage1_checkpoint_trained_on_luad.pth",
                               out / "stage1_checkpoint_trained_on_luad.pth")
        assert_same_checkpoint(tmp_path / "ref" / "stage1_luad_last.pth", out / "stage1_luad_last.pth")
        assert (json.loads((out / "stage1_luad_cam_metrics.json").read_text())
                == json.loads((tmp_path / "ref" / "stage1_luad_cam_metrics.json").read_text()))


def test_generate_pm_killed_anywhere_continues_to_the_same_masks(synth16, thin_ckpts, tmp_path, capsys,
                                                                  monkeypatch):
    args = ("generate-pm", "--dataset", "luad", "--data", synth16, "--checkpoint", thin_ckpts["s1a"], "--device", "cpu",
            "--workers", "0", "--batch-size", "4")
    total = count_replaces(monkeypatch, capsys, *args, "--out", tmp_path / "ref")
    reference = visible_files(tmp_path / "ref")
    assert len([k for k in reference if k.endswith(".png")]) == 48
    killed_runs([(*points(seed, total), [*args, "--out", tmp_path / f"cut{seed}"]) for seed in SEEDS])
    for seed in SEEDS:
        out = tmp_path / f"cut{seed}"
        n, phase = points(seed, total)
        code, _, err = run_cli(capsys, monkeypatch, *args, "--out", out)
        assert code == 0, f"killed {phase} replacement {n} of {total}: {err}"
        assert not list(out.glob(".wsss-lock*"))
        got = visible_files(out)
        got["pseudo_masks_config.json"] = reference["pseudo_masks_config.json"]  # names its own --out
        assert got == reference, f"killed {phase} replacement {n} of {total}"


def test_train_stage2_killed_anywhere_resumes_to_the_same_model_and_report(synth16, tmp_path, capsys,
                                                                            monkeypatch):
    root = tmp_path / "data"
    shutil.copytree(synth16, root)
    for layer in ("b4_5", "b5_2", "bn7"):
        shutil.copytree(root / "train_gt", root / "train_PM" / f"PM_{layer}")
    # 16 patches in batches of 6: the paper default trains on each epoch's short last batch of 4
    args = ("train-stage2", "--dataset", "luad", "--data", root, *S2[:6], "--epochs", "2", "--batch-size", "6",
            *S2[10:])

    def folders(name: str):
        return ("--out", tmp_path / name / "ckpt", "--report", tmp_path / name / "report")

    total = count_replaces(monkeypatch, capsys, *args, *folders("ref"))
    ref = tmp_path / "ref"
    killed_runs([(*points(seed, total), [*args, *folders(f"cut{seed}")]) for seed in SEEDS])
    for seed in SEEDS:
        name = f"cut{seed}"
        n, phase = points(seed, total)
        code, _, err = run_cli(capsys, monkeypatch, *args, *folders(name), "--resume")
        assert code == 0, f"killed {phase} replacement {n} of {total}: {err}"
        cut = tmp_path / name
        assert not list(cut.rglob(".wsss-lock*"))
        for ckpt in ("stage2_checkpoint_trained_on_luad.pth", "stage2_luad_last.pth"):
            assert_same_checkpoint(ref / "ckpt" / ckpt, cut / "ckpt" / ckpt)
        assert visible_files(cut / "report") == visible_files(ref / "report")
