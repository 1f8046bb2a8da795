"""Nothing lost, nothing silently wrong: one test per reported case, each through the CLI.

Every expectation comes from outside the code under test: file bytes hashed before and after, the
files a folder holds, the exit status and the number of lines on stderr, a lock written in the
documented format for a process that is (or is no longer) running.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from helpers import S1, S2, live_lock, run_cli, write_palette_mask
from wsss.stages import stage1

LAYERS = ("b4_5", "b5_2", "bn7")


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def tree(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (hidden bookkeeping files left out) with its sha256."""
    return {str(p.relative_to(folder)): sha(p) for p in sorted(Path(folder).rglob("*"))
            if p.is_file() and not p.name.startswith(".wsss-")}


def one_error_line(code: int, err: str) -> str:
    """The command failed with exactly one ``error:`` line and no traceback; returns that line."""
    assert code == 1, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, err
    return errors[0]


@pytest.fixture
def data(synth16) -> Path:
    return synth16


@pytest.fixture
def ckpts(thin_ckpts) -> dict[str, Path]:
    return thin_ckpts


def copy_data(data: Path, dest: Path) -> Path:
    shutil.copytree(data, dest)
    return dest


def with_true_masks_as_pm(data: Path, dest: Path) -> Path:
    """A copy of the dataset whose pseudo-masks (not written by wsss) are its true training masks."""
    root = copy_data(data, dest)
    for layer in LAYERS:
        shutil.copytree(root / "train_gt", root / "train_PM" / f"PM_{layer}")
    return root


# --------------------------------------------------------------------------- 1-3: data loss


def test_1_training_never_replaces_a_checkpoint_it_did_not_write(data, ckpts, tmp_path, capsys, monkeypatch):
    ow = tmp_path / "OW"
    ow.mkdir()
    published = ow / "stage1_checkpoint_trained_on_luad.pth"
    shutil.copy(ckpts["s1a"], published)
    before = sha(published)
    code, _, err = run_cli(capsys, monkeypatch, "train-stage1", "--dataset", "luad", "--data", data, "--out", ow,
                           *S1, "--init-weights", published)
    line = one_error_line(code, err)
    assert "stage1_checkpoint_trained_on_luad.pth" in line and "not written by wsss" in line and "--force" in line
    assert sha(published) == before and sorted(p.name for p in ow.iterdir() if not p.name.startswith(".")) == [
        published.name]

    # stage 2: the same
    root = with_true_masks_as_pm(data, tmp_path / "data2")
    ow2 = tmp_path / "OW2"
    ow2.mkdir()
    published2 = ow2 / "stage2_checkpoint_trained_on_luad.pth"
    shutil.copy(ckpts["s2"], published2)
    code, _, err = run_cli(capsys, monkeypatch, "train-stage2", "--dataset", "luad", "--data", root, "--out", ow2,
                           "--report", tmp_path / "rep2", *S2)
    assert "not written by wsss" in one_error_line(code, err)
    assert sha(published2) == sha(ckpts["s2"])

    # --force replaces it, as asked
    code, _, err = run_cli(capsys, monkeypatch, "train-stage1", "--dataset", "luad", "--data", data, "--out", ow,
                           *S1, "--init-weights", published, "--force")
    assert code == 0, err
    assert sha(published) != before


def test_2_a_second_run_on_a_folder_in_use_is_refused(data, ckpts, tmp_path, capsys, monkeypatch, caplog):
    cc = tmp_path / "CC"
    sleeper = live_lock(cc, "train-stage1")
    try:
        code, _, err = run_cli(capsys, monkeypatch, "train-stage1", "--dataset", "luad", "--data", data, "--out", cc,
                               *S1)
        line = one_error_line(code, err)
        assert f"in use by `wsss train-stage1` (pid {sleeper.pid}" in line
        assert sorted(p.name for p in cc.iterdir()) == [".wsss-lock"]  # nothing written, the lock left alone

        # two predicts on one folder: the second is refused and summary.csv keeps the first's rows
        image = tmp_path / "in" / "a.png"
        image.parent.mkdir()
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(image)
        p = tmp_path / "P"
        assert run_cli(capsys, monkeypatch, "predict", image, "--checkpoint", ckpts["s2"], "--out", p, "--tile", 64,
                       "--device", "cpu")[0] == 0
        summary = sha(p / "summary.csv")
        sleeper2 = live_lock(p, "predict")
        try:
            code, _, err = run_cli(capsys, monkeypatch, "predict", image, "--checkpoint", ckpts["s2"], "--out", p,
                                   "--tile", 64, "--device", "cpu")
            assert "in use by `wsss predict`" in one_error_line(code, err)
            assert sha(p / "summary.csv") == summary
        finally:
            sleeper2.kill()
            sleeper2.wait()
    finally:
        sleeper.kill()
        sleeper.wait()
    # the holder is gone: its lock is stale, reported and taken over; the run goes ahead
    code, _, err = run_cli(capsys, monkeypatch, "train-stage1", "--dataset", "luad", "--data", data, "--out", cc, *S1)
    assert code == 0, err
    assert f"pid {sleeper.pid}" in caplog.text and "no longer running" in caplog.text
    assert (cc / "stage1_checkpoint_trained_on_luad.pth").is_file() and not (cc / ".wsss-lock").exists()


def test_3_predict_never_writes_into_its_input_folder_nor_over_the_users_files(ckpts, tmp_path, capsys,
                                                                                monkeypatch):
    folder = tmp_path / "DIR"
    folder.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / "case1.png")
    write_palette_mask(folder / "case1_mask.png", rng.integers(0, 4, (64, 64)))  # the user's ground truth
    before = tree(folder)
    args = ("--checkpoint", ckpts["s2"], "--tile", 64, "--device", "cpu")
    code, _, err = run_cli(capsys, monkeypatch, "predict", folder, "--out", folder, *args)
    assert "is an input folder" in one_error_line(code, err)
    code, _, err = run_cli(capsys, monkeypatch, "predict", folder / "case1.png", "--out", folder, *args)
    assert "is an input folder" in one_error_line(code, err)
    assert tree(folder) == before and not any(p.name.startswith(".wsss") for p in folder.iterdir())

    # another output folder that holds a file of that name: refused, then replaced with --force
    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(folder / "case1_mask.png", out / "case1_mask.png")
    code, _, err = run_cli(capsys, monkeypatch, "predict", folder / "case1.png", "--out", out, *args)
    assert "case1_mask.png exists and was not written by wsss" in one_error_line(code, err)
    assert sha(out / "case1_mask.png") == before["case1_mask.png"]
    assert run_cli(capsys, monkeypatch, "predict", folder / "case1.png", "--out", out, *args, "--force")[0] == 0
    assert sha(out / "case1_mask.png") != before["case1_mask.png"]


# --------------------------------------------------------------------------- 4-9: silently wrong


def test_4_pseudo_masks_of_another_checkpoint_are_never_kept_as_new(data, ckpts, tmp_path, capsys, monkeypatch):
    root = copy_data(data, tmp_path / "data")
    args = ("generate-pm", "--dataset", "luad", "--data", root, "--device", "cpu", "--workers", "0")
    code, out, err = run_cli(capsys, monkeypatch, *args, "--checkpoint", ckpts["s1a"])
    assert code == 0, err
    assert "16 computed, 0 skipped" in out
    pm = root / "train_PM"
    first = tree(pm)
    assert len([k for k in first if k.startswith("PM_")]) == 48

    code, out, err = run_cli(capsys, monkeypatch, *args, "--checkpoint", ckpts["s1a"])  # same run: kept
    assert code == 0 and "0 computed, 16 skipped" in out, err

    code, _, err = run_cli(capsys, monkeypatch, *args, "--checkpoint", ckpts["s1b"])
    line = one_error_line(code, err)
    assert "s1a.pth" in line and f"sha256 {sha(ckpts['s1a'])[:12]}" in line and f"{sha(ckpts['s1b'])[:12]}" in line
    assert "--force" in line
    assert tree(pm) == first  # nothing replaced, and the config still names the first checkpoint
    assert json.loads((pm / "pseudo_masks_config.json").read_text())["checkpoint"] == str(ckpts["s1a"])

    code, out, err = run_cli(capsys, monkeypatch, *args, "--checkpoint", ckpts["s1b"], "--force")
    assert code == 0 and "16 computed, 0 skipped" in out, err
    assert json.loads((pm / "pseudo_masks_config.json").read_text())["checkpoint"] == str(ckpts["s1b"])

    # masks that wsss did not write (another tool's, or an older version's): which checkpoint is unknown
    other = copy_data(data, tmp_path / "data_other")
    shutil.copytree(other / "train_gt", other / "train_PM" / "PM_bn7")
    code, _, err = run_cli(capsys, monkeypatch, "generate-pm", "--dataset", "luad", "--data", other,
                           "--device", "cpu", "--workers", "0", "--checkpoint", ckpts["s1a"])
    assert "was not written by wsss" in one_error_line(code, err)


def test_5_a_16_bit_patch_is_refused_by_training_and_reported_by_check_data(data, tmp_path, capsys, monkeypatch):
    root = copy_data(data, tmp_path / "data")
    victim = sorted((root / "train").iterdir())[3]
    rgb = np.asarray(Image.open(victim))
    Image.fromarray((rgb[..., 0].astype(np.uint16) * 257)).save(victim)  # 16-bit greyscale, same name
    assert Image.open(victim).mode.startswith("I")
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, monkeypatch, "train-stage1", "--dataset", "luad", "--data", root, "--out", out, *S1)
    line = one_error_line(code, err)
    assert victim.name in line and "grayscale" in line
    assert not list(out.glob("*.pth")) if out.exists() else True  # refused before any training
    code, out_text, _ = run_cli(capsys, monkeypatch, "check-data", root, "--dataset", "luad")
    assert code == 1 and victim.name in out_text and "grayscale" in out_text


def test_6_bcss_names_under_luad_and_luad_names_under_bcss_are_refused(data, ckpts, tmp_path, capsys, monkeypatch):
    root = copy_data(data, tmp_path / "data")
    for path in (root / "train").iterdir():  # [1 0 0 1] → [1001], the BCSS-WSSS way
        label = path.stem[path.stem.rindex("[") + 1:-1].replace(" ", "")
        path.rename(path.with_name(f"{path.stem[:path.stem.rindex('[')]}[{label}].png"))
    example = sorted((root / "train").iterdir())[0].name
    for command in (("train-stage1", "--out", tmp_path / "o1", *S1),
                    ("generate-pm", "--checkpoint", ckpts["s1a"], "--out", tmp_path / "o2")):
        code, _, err = run_cli(capsys, monkeypatch, command[0], "--dataset", "luad", "--data", root, *command[1:])
        line = one_error_line(code, err)
        assert example in line and "--dataset bcss" in line
    code, out_text, _ = run_cli(capsys, monkeypatch, "check-data", root, "--dataset", "luad")
    assert code == 1 and "--dataset bcss" in out_text
    code, out_text, _ = run_cli(capsys, monkeypatch, "check-data", data, "--dataset", "bcss")
    assert code == 1 and "--dataset luad" in out_text
    assert not (tmp_path / "o1").exists() or not list((tmp_path / "o1").glob("*.pth"))


def test_7_resume_refuses_options_given_with_other_values(data, tmp_path, capsys, monkeypatch, caplog):
    caplog.set_level(logging.INFO)
    out = tmp_path / "run"
    base = ("train-stage1", "--dataset", "luad", "--data", data, "--out", out)
    assert run_cli(capsys, monkeypatch, *base, *S1)[0] == 0
    last = out / "stage1_luad_last.pth"
    before = sha(last)
    code, _, err = run_cli(capsys, monkeypatch, *base, *S1[:4], "--epochs", "4", "--lr", "0.5", "--resume")
    line = one_error_line(code, err)
    assert "--epochs 1 → 4" in line and "--lr 0.01 → 0.5" in line and "--force" in line
    assert sha(last) == before
    # the same values again, or how it runs (device, workers): fine
    code, _, err = run_cli(capsys, monkeypatch, *base, *S1, "--resume")
    assert code == 0 and "after epoch 1 of 1" in caplog.text, err


def test_7_a_run_an_older_wsss_wrote_can_still_be_resumed(data, tmp_path, capsys, monkeypatch, caplog):
    """No manifest at all (outputs of a wsss before manifests): --resume takes the run as it is and
    records its files; a folder with a manifest that does not list them is another matter (test_1)."""
    caplog.set_level(logging.INFO)
    out = tmp_path / "old"
    base = ("train-stage1", "--dataset", "luad", "--data", data, "--out", out, *S1)
    assert run_cli(capsys, monkeypatch, *base)[0] == 0
    (out / ".wsss-manifest.jsonl").unlink()
    code, _, err = run_cli(capsys, monkeypatch, *base, "--resume")
    assert code == 0 and "written by an older wsss" in caplog.text, err
    files = [json.loads(line).get("file") for line in (out / ".wsss-manifest.jsonl").read_text().splitlines()]
    assert {"stage1_luad_last.pth", "stage1_checkpoint_trained_on_luad.pth"} <= set(files)


def test_7_a_run_saved_with_a_setting_this_version_lacks_is_not_resumed_without_it(data, tmp_path, capsys,
                                                                                   monkeypatch, caplog):
    """A run saved by a wsss that had an option this one does not (removed, or newer), switched on:
    --resume refuses rather than silently continue without it; the same setting off is harmless."""
    from wsss.runtime import load_checkpoint, save_checkpoint

    caplog.set_level(logging.INFO)
    out = tmp_path / "run"
    base = ("train-stage1", "--dataset", "luad", "--data", data, "--out", out, *S1)
    assert run_cli(capsys, monkeypatch, *base)[0] == 0
    saved = {p: load_checkpoint(p) for p in (out / "stage1_luad_last.pth", out / "stage1_checkpoint_trained_on_luad.pth")}

    def older_wsss_wrote(**settings):  # its run, saved with these settings, without a manifest
        for path, state in saved.items():
            state["config"].update(settings)
            save_checkpoint(path, state)
        (out / ".wsss-manifest.jsonl").unlink()

    older_wsss_wrote(warmup_epochs=1.5, future_thing=None)
    before = tree(out)
    code, _, err = run_cli(capsys, monkeypatch, *base, "--resume")
    line = one_error_line(code, err)
    assert "warmup-epochs 1.5" in line and "future" not in line and "--force" in line
    assert tree(out) == before
    older_wsss_wrote(warmup_epochs=0.0)  # off: the run computed what this version computes
    code, _, err = run_cli(capsys, monkeypatch, *base, "--resume")
    assert code == 0 and "after epoch 1 of 1" in caplog.text, err


def test_8_gate_threshold_outside_0_1_is_refused_everywhere(data, ckpts, tmp_path, capsys, monkeypatch):
    image = tmp_path / "a.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(image)
    gate = ("--gate", "--stage1-checkpoint", ckpts["s1a"])
    for threshold in ("2", "-5"):
        for args in (("evaluate", "--dataset", "luad", "--data", data, "--checkpoint", ckpts["s2"], *gate),
                     ("predict", image, "--checkpoint", ckpts["s2"], "--out", tmp_path / "p", *gate),
                     ("predict-wsi", image, "--checkpoint", ckpts["s2"], "--out", tmp_path / "w", *gate)):
            code, _, err = run_cli(capsys, monkeypatch, *args, "--gate-threshold", threshold, "--device", "cpu")
            assert "--gate-threshold" in one_error_line(code, err)
    assert not (tmp_path / "p").exists() and not (tmp_path / "w").exists()


def test_9_greyscale_slides_and_tiny_images_are_refused(ckpts, tmp_path, capsys, monkeypatch):
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (256, 256), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "grey.tif", grey)  # stripped, one page: OpenSlide reads it as grey RGB
    tifffile.imwrite(tmp_path / "grey_rgb.tif", np.repeat(grey[..., None], 3, axis=-1), photometric="rgb")
    for name in ("grey.tif", "grey_rgb.tif"):
        code, _, err = run_cli(capsys, monkeypatch, "predict-wsi", tmp_path / name, "--checkpoint", ckpts["s2"],
                               "--out", tmp_path / "w", "--tile", 64, "--device", "cpu")
        line = one_error_line(code, err)
        assert name in line and ("greyscale" in line or "no colour" in line), line
    assert not (tmp_path / "w").exists()

    Image.fromarray(np.full((1, 1, 3), 120, np.uint8)).save(tmp_path / "dot.png")
    code, _, err = run_cli(capsys, monkeypatch, "predict", tmp_path / "dot.png", "--checkpoint", ckpts["s2"],
                           "--out", tmp_path / "p", "--device", "cpu")
    line = one_error_line(code, err)
    assert "dot.png is 1×1 px, far below the 224 px window" in line
    assert not (tmp_path / "p").exists()


# --------------------------------------------------------------------------- 10-12: tracebacks


def test_10_mask_values_outside_the_palette_stop_before_any_compute(data, ckpts, tmp_path, capsys, monkeypatch):
    root = with_true_masks_as_pm(data, tmp_path / "data")
    bad = sorted((root / "val" / "mask").iterdir())[1]
    mask = np.asarray(Image.open(bad)).copy()
    mask[0, 0] = 7
    write_palette_mask(bad, mask)
    cases = [
        ("evaluate", "--dataset", "luad", "--data", root, "--checkpoint", ckpts["s2"], "--split", "val"),
        ("eval-cam", "--dataset", "luad", "--data", root, "--checkpoint", ckpts["s1a"], "--split", "val"),
        ("train-stage2", "--dataset", "luad", "--data", root, "--out", tmp_path / "o", "--report", tmp_path / "r",
         *S2),
    ]
    for args in cases:
        code, _, err = run_cli(capsys, monkeypatch, *args, *(() if args[0] == "train-stage2" else ("--device", "cpu")))
        line = one_error_line(code, err)
        assert "holds value 7" in line and bad.name in line, line
    # train-stage2 stopped before its first epoch: no checkpoint, no report
    assert not list(tmp_path.glob("o/*.pth")) and not (tmp_path / "r" / "metrics.json").exists()


def test_11_an_output_path_that_is_a_file_is_one_line_before_any_compute(data, ckpts, tmp_path, capsys,
                                                                         monkeypatch):
    root = with_true_masks_as_pm(data, tmp_path / "data")
    afile = tmp_path / "afile"
    afile.write_text("mine")
    cases = [
        ("train-stage1", "--dataset", "luad", "--data", root, "--out", afile, *S1),
        ("generate-pm", "--dataset", "luad", "--data", root, "--checkpoint", ckpts["s1a"], "--out", afile),
        ("train-stage2", "--dataset", "luad", "--data", root, "--out", tmp_path / "o", "--report", afile, *S2),
        ("predict", root / "test" / "img", "--checkpoint", ckpts["s2"], "--out", afile / "sub"),
    ]
    for args in cases:
        code, _, err = run_cli(capsys, monkeypatch, *args)
        line = one_error_line(code, err)
        assert "afile" in line and "is a file; a folder is needed" in line, line
    assert afile.read_text() == "mine"
    assert not list(tmp_path.glob("o/*.pth"))  # train-stage2 refused --report before training


FULL_DISK_SCRIPT = r"""
import json, resource, sys
import torch
torch.set_num_threads(1)
from wsss.cli import main
results = []
for limit, argv in json.loads(sys.argv[1]):
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    sys.argv = ["wsss", *argv]
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code
    resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    sys.stderr.write("\n=== %s exit %s\n" % (argv[0], code))
"""


def test_11_a_full_disk_is_one_line_naming_the_file_and_leaves_no_partial_file(data, ckpts, tmp_path):
    """Writes beyond a file-size limit fail as on a full disk (EFBIG instead of ENOSPC; Python ignores
    SIGXFSZ). One process runs the commands, each under its own limit."""
    from helpers import slide_pixels, write_pyramid_levels

    root = copy_data(data, tmp_path / "data")
    slide = tmp_path / "slide.tif"
    write_pyramid_levels(slide, slide_pixels())
    image = root / "test" / "img" / sorted(p.name for p in (root / "test" / "img").iterdir())[0]
    runs = [
        (64 * 1024, ["train-stage1", "--dataset", "luad", "--data", str(root), "--out", str(tmp_path / "s1"), *S1]),
        (2 * 1024, ["generate-pm", "--dataset", "luad", "--data", str(root), "--checkpoint", str(ckpts["s1a"]),
                    "--device", "cpu", "--workers", "0"]),
        (512, ["predict", str(image), "--checkpoint", str(ckpts["s2"]), "--out", str(tmp_path / "p"), "--tile", "32", "--overlap", "8",
               "--device", "cpu"]),
        (4 * 1024, ["predict-wsi", str(slide), "--checkpoint", str(ckpts["s2"]), "--out", str(tmp_path / "w"),
                    "--tile", "64", "--device", "cpu"]),
        (0, ["predict", str(image), "--checkpoint", str(ckpts["s2"]), "--out", str(tmp_path / "p0"), "--tile", "32",
             "--overlap", "8", "--device", "cpu"]),  # full from the start: the lock itself cannot be written
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[2]),
                                                        os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", FULL_DISK_SCRIPT, json.dumps(runs)], capture_output=True, text=True,
                          env=env, timeout=900)
    parts = proc.stderr.split("\n=== ")
    assert len(parts) == len(runs) + 1, proc.stderr
    outputs = [parts[0]] + [part.split("\n", 1)[1] if "\n" in part else "" for part in parts[1:-1]]
    for (_, argv), text, part in zip(runs, outputs, parts[1:]):
        assert part.startswith(f"{argv[0]} exit 1"), proc.stderr
        assert "Traceback" not in text, text
        errors = [line for line in text.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and "File too large" in errors[0] and str(tmp_path) in errors[0], text
    for folder in (tmp_path / "s1", root / "train_PM", tmp_path / "p", tmp_path / "w"):
        assert not [p for p in folder.rglob("*") if p.name.endswith(".tmp")], folder  # no partial file
    assert not (tmp_path / "p0").exists()  # nothing written: nothing left


def test_12_bad_tiff_and_checkpoint_files_are_one_line(data, tmp_path, capsys, monkeypatch):
    (tmp_path / "zero.tif").write_bytes(b"II*\x00\x00\x00\x00\x00")  # a TIFF header whose first page is at 0
    torch.save(torch.nn.Linear(2, 2), tmp_path / "model.pth")  # a pickled module, not weights
    (tmp_path / "cut.pth").write_bytes((tmp_path / "model.pth").read_bytes()[:200])
    code, _, err = run_cli(capsys, monkeypatch, "predict-wsi", tmp_path / "zero.tif", "--checkpoint",
                           tmp_path / "model.pth", "--out", tmp_path / "w")
    assert "zero.tif holds no image" in one_error_line(code, err)
    for name in ("model.pth", "cut.pth"):
        for args in (("eval-cam", "--dataset", "luad", "--data", data, "--checkpoint", tmp_path / name),
                     ("evaluate", "--dataset", "luad", "--data", data, "--checkpoint", tmp_path / name)):
            code, _, err = run_cli(capsys, monkeypatch, *args, "--device", "cpu")
            line = one_error_line(code, err)
            assert name in line and "weights_only" not in err and "trust" not in err, err
            assert ("truncated or corrupt" in line) == (name == "cut.pth")


def test_12_ctrl_c_says_what_was_saved_and_how_to_continue(data, tmp_path, capsys, monkeypatch, caplog):
    caplog.set_level(logging.INFO)
    out = tmp_path / "run"
    real = stage1.train_one_epoch

    def interrupt_in_epoch_2(*args, **kwargs):
        if args[-1] == 1:  # the epoch index
            os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(stage1, "train_one_epoch", interrupt_in_epoch_2)
    args = ("train-stage1", "--dataset", "luad", "--data", data, "--out", out, *S1[:4], "--epochs", "2", *S1[6:])
    code, _, err = run_cli(capsys, monkeypatch, *args)
    assert code == 130 and "Traceback" not in err, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("interrupted: epoch 1 of 2 saved in ") and str(out / "stage1_luad_last.pth") in line
    command = shlex.split(line.split("to continue: ", 1)[1])
    assert command[0] == "wsss" and command[-1] == "--resume"
    assert not (out / ".wsss-lock").exists()
    monkeypatch.setattr(stage1, "train_one_epoch", real)
    code, _, err = run_cli(capsys, monkeypatch, *command[1:])
    assert code == 0 and "after epoch 1 of 2" in caplog.text, err


class FillingDisk:
    """A file that takes ``room`` bytes, then writes short and fails with ENOSPC, as a disk that
    fills up while a checkpoint is written."""

    def __init__(self, f, room: int) -> None:
        self.f, self.room = f, room

    def write(self, data) -> int:
        data = bytes(data)
        if self.room <= 0:
            raise OSError(28, "No space left on device")
        part = data[: self.room]
        self.room -= len(part)
        return self.f.write(part)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


@pytest.mark.parametrize("room", [0, 300, 5000])
def test_11_a_disk_filling_up_during_a_checkpoint_write_is_one_line_and_no_file(tmp_path, capsys, monkeypatch, room):
    """torch reports a failed write as its own RuntimeError ("unexpected pos"); the OS's cause is
    what the user must see. ``room``: where the disk fills up (before, inside, after the header)."""
    from wsss import runtime
    from wsss.errors import WsssError

    monkeypatch.setattr(runtime, "open", lambda path, mode="r": FillingDisk(open(path, mode), room), raising=False)
    target = tmp_path / "ckpt.pth"
    with pytest.raises(WsssError) as info:
        runtime.save_checkpoint(target, {"model": {"w": torch.zeros(4096)}})
    assert str(info.value) == f"cannot write {target}: No space left on device"
    assert list(tmp_path.iterdir()) == []  # neither the checkpoint nor its temporary file
