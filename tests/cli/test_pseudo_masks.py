"""``wsss generate-pm`` / ``eval-pm``: exact pseudo-masks, white handling per dataset, resume, names, CLI."""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import run_cli
from gradcam_oracle import make_classifier, reference_fusion, slow_normalised
from wsss.models import loading
from wsss.config import Stage1Config
from wsss.data.background import white_mask
from wsss.data.datasets import get_input_norm, resize_rgb, to_tensor
from wsss.data.labels import parse_label
from wsss.data.layout import list_images, pseudo_mask_path
from wsss.data.png import read_mask, read_rgb, write_mask
from wsss.data.specs import BCSS, LUAD
from wsss.errors import WsssError
from wsss.models.resnet38 import ResNet38Classifier
from wsss.runtime import save_checkpoint
from wsss.stages import stage1
from wsss.stages.pseudo_masks import PseudoMaskConfig, evaluate, existing_mask, generate

LAYERS = ("b4_5", "b5_2", "bn7")


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory) -> Path:
    from wsss.data.synth import generate as synth

    root = tmp_path_factory.mktemp("pm") / "data"
    synth(root, n_train=6, n_val=1, n_test=1, size=48, seed=5, workers=1, progress=False)
    return root


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Our format (trained at 32 px, ImageNet input normalisation) and a WSSS-Tissue-style plain state_dict."""
    folder = tmp_path_factory.mktemp("ckpt")
    model = make_classifier(seed=7)
    cfg = Stage1Config(dataset="luad", data=folder, width=0.125, image_size=32, input_norm="imagenet")
    save_checkpoint(folder / "ours.pth", stage1.checkpoint_state(model, cfg, LUAD, 0))
    torch.save(model.state_dict(), folder / "plain.pth")
    return {"ours": folder / "ours.pth", "plain": folder / "plain.pth"}


def config(data: Path, checkpoint: Path, out: Path, **kw) -> PseudoMaskConfig:
    return PseudoMaskConfig(dataset=kw.pop("dataset", "luad"), data=data, checkpoint=checkpoint, out=out,
                            batch_size=4, device="cpu", workers=0, **kw)


def pm_files(out: Path) -> list[Path]:
    return sorted(out.glob("PM_*/*"))


def test_masks_equal_the_slow_reference(synth_root, checkpoints, tmp_path):
    out = tmp_path / "pm"
    summary = generate(config(synth_root, checkpoints["ours"], out), progress=False)
    assert summary["computed"] == 6 and summary["files_written"] == 18
    loaded = loading.load_classifier(checkpoints["ours"], 4)
    assert loaded.image_size == 32 and loaded.norm == get_input_norm("imagenet")
    saw_background = False
    for path in list_images(synth_root / "train"):
        image = read_rgb(path)
        x = to_tensor(resize_rgb(image, 32), loaded.norm)[None]
        label = parse_label(path.name, 4)
        white = white_mask(image)
        for layer in LAYERS:
            want = reference_fusion(slow_normalised(loaded.model, x, layer, image.shape[:2]), label, white)
            written = pseudo_mask_path(out, layer, path)
            assert written.name == path.name
            np.testing.assert_array_equal(read_mask(written), want, err_msg=f"{layer} {path.name}")
            write_mask(tmp_path / "ref.png", want, LUAD.flat_palette())
            assert written.read_bytes() == (tmp_path / "ref.png").read_bytes()
            saw_background |= bool((want == 4).any())
    assert saw_background  # the fixture exercises the white-background channel
    fractions = summary["class_fractions"]["bn7"]
    assert set(fractions) == {"TE", "NEC", "LYM", "TAS", "background"}
    assert abs(sum(fractions.values()) - 1.0) < 1e-4


def test_output_names_equal_input_names(synth_root, checkpoints, tmp_path):
    out = tmp_path / "pm"
    generate(config(synth_root, checkpoints["plain"], out, layers=("bn7",)), progress=False)
    names = sorted(p.name for p in (synth_root / "train").iterdir())
    assert any("[" in n and " " in n for n in names)
    assert sorted(p.name for p in (out / "PM_bn7").iterdir()) == names  # no temp files left either
    assert not (out / "PM_b4_5").exists()


def test_resume_skips_finished_files_and_refuses_changed_ones(synth_root, checkpoints, tmp_path):
    out = tmp_path / "pm"
    cfg = config(synth_root, checkpoints["plain"], out)  # a published-style plain state_dict
    first = generate(cfg, progress=False)
    assert first["files_written"] == 18
    files = pm_files(out)
    original = {p: p.read_bytes() for p in files}
    truncated, deleted = files[1], files[-1]
    deleted.unlink()
    stamps = {p: p.stat().st_mtime_ns for p in files if p != deleted}

    again = generate(cfg, progress=False)
    assert again["files_written"] == 1 and again["computed"] == 1 and again["skipped"] == 5
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # finished files untouched
    assert all(p.read_bytes() == original[p] for p in files)
    assert again["class_fractions"] == first["class_fractions"]  # counted from the files on disk

    # a mask changed since it was written (cut short by hand, edited): not silently replaced
    truncated.write_bytes(original[truncated][: len(original[truncated]) // 2])
    assert existing_mask(truncated, (48, 48), 4) is None
    with pytest.raises(WsssError, match=re.escape(truncated.name) + ".*was not written by wsss.*--force"):
        generate(cfg, progress=False)
    assert truncated.read_bytes() == original[truncated][: len(original[truncated]) // 2]
    forced = generate(replace(cfg, force=True), progress=False)
    assert forced["files_written"] == 18 and forced["skipped"] == 0
    assert truncated.read_bytes() == original[truncated]


def white_left_images(root: Path, names: list[str]) -> Path:
    """Patches 40×40 whose left half is white and right half textured."""
    rng = np.random.default_rng(0)
    for name in names:
        image = rng.integers(0, 160, (40, 40, 3), dtype=np.uint8)
        image[:, :20] = 255
        (root / "train").mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(root / "train" / name)
    return root


def test_white_is_background_for_luad_only(checkpoints, tmp_path):
    luad = white_left_images(tmp_path / "luad", ["a-[1 0 0 1].png", "b-[0 1 1 0].png"])
    bcss = white_left_images(tmp_path / "bcss", ["TCGA-A+0[1001].png", "TCGA-B+1[0110].png"])
    generate(config(luad, checkpoints["plain"], luad / "pm"), progress=False)
    generate(config(bcss, checkpoints["plain"], bcss / "pm", dataset="bcss"), progress=False)
    for layer in LAYERS:
        for name, bname in (("a-[1 0 0 1].png", "TCGA-A+0[1001].png"), ("b-[0 1 1 0].png", "TCGA-B+1[0110].png")):
            allowed = {i for i, d in enumerate(parse_label(name, 4)) if d}
            lmask = read_mask(luad / "pm" / f"PM_{layer}" / name)
            bmask = read_mask(bcss / "pm" / f"PM_{layer}" / bname)
            white = white_mask(read_rgb(luad / "train" / name))
            assert (lmask[white] == 4).all() and set(np.unique(lmask[~white])) <= allowed
            assert set(np.unique(bmask)) <= allowed  # bcss: white is fat, never background
            with Image.open(bcss / "pm" / f"PM_{layer}" / bname) as img:
                assert img.mode == "P" and img.getpalette()[:15] == [c for rgb in BCSS.palette for c in rgb]


def test_eval_pm_scores_and_background_accounting(tmp_path):
    root = tmp_path / "d"
    gt = np.array([[0, 0, 1, 4], [2, 2, 1, 4]], np.uint8)
    pm = np.array([[0, 4, 1, 4], [2, 3, 1, 0]], np.uint8)
    write_mask(root / "train_gt" / "p-[1 1 1 0].png", gt, LUAD.flat_palette())
    write_mask(root / "train_PM" / "PM_bn7" / "p-[1 1 1 0].png", pm, LUAD.flat_palette())
    result = evaluate(root, LUAD)["bn7"]
    # 6 true-tissue pixels, 1 marked background; the other 5: TE 1/1, NEC 2/2, LYM 1 of 2 (one TAS)
    assert result["background_on_tissue"] == round(1 / 6, 6)
    assert result["background_recall"] == 0.5
    assert result["pixels"] == 5
    assert result["per_class"]["TE"]["iou"] == 1.0 and result["per_class"]["LYM"]["iou"] == 0.5


def test_cli_generate_and_eval_end_to_end(synth_root, checkpoints, tmp_path, capsys, monkeypatch):
    out = tmp_path / "pm"
    code, stdout, err = run_cli(capsys, monkeypatch, "generate-pm", "--dataset", "luad", "--data", synth_root,
                                "--checkpoint", checkpoints["ours"], "--out", out, "--batch-size", "4",
                                "--workers", "1", "--device", "cpu")
    assert code == 0, err
    assert "6 computed" in stdout and "background" in stdout
    code, stdout, err = run_cli(capsys, monkeypatch, "eval-pm", "--dataset", "luad", "--data", synth_root,
                                "--pm-dir", out, "--json", tmp_path / "pm.json")
    assert code == 0, err
    results = json.loads((tmp_path / "pm.json").read_text())
    assert list(results) == list(LAYERS)
    assert all(r["mIoU"] is not None and r["background_on_tissue"] is not None for r in results.values())
    assert "mIoU  b4_5" in stdout


def test_cli_user_errors_are_one_line(synth_root, checkpoints, tmp_path, capsys, monkeypatch):
    def fails(*args, expect):
        code, _, err = run_cli(capsys, monkeypatch, *map(str, args))
        assert code == 1 and expect in err and len(err.strip().splitlines()) == 1, err
        assert "Traceback" not in err

    base = ["generate-pm", "--dataset", "luad", "--data", synth_root, "--out", tmp_path / "pm", "--workers", "0"]
    ckpt = torch.load(checkpoints["ours"], weights_only=True)
    ckpt["stage"] = 2
    save_checkpoint(tmp_path / "s2.pth", ckpt)
    fails(*base, "--checkpoint", tmp_path / "s2.pth", expect="stage-2 checkpoint")
    torch.save(ResNet38Classifier(3, width=0.125).state_dict(), tmp_path / "c3.pth")
    fails(*base, "--checkpoint", tmp_path / "c3.pth", expect="3 classes")
    fails(*base, "--checkpoint", checkpoints["ours"], "--layers", "b4_5,fc9", expect="fc9")
    assert not (tmp_path / "pm" / "PM_b4_5").exists()

    no_gt = tmp_path / "no_gt"
    shutil.copytree(synth_root / "train", no_gt / "train")
    fails("eval-pm", "--dataset", "luad", "--data", no_gt, expect="train_gt")
    fails("eval-pm", "--dataset", "luad", "--data", synth_root, "--pm-dir", tmp_path / "nothing",
          expect="run wsss generate-pm first")


def test_cli_generate_pm_takes_the_white_rule_of_the_preset(synth_root, checkpoints, tmp_path, capsys, monkeypatch):
    base = ["generate-pm", "--dataset", "luad", "--data", synth_root, "--checkpoint", checkpoints["ours"],
            "--layers", "bn7", "--workers", "0", "--device", "cpu"]
    for name, extra, rule in (("paper", [], "grey"), ("cpu", ["--preset", "cpu"], "glass"),
                              ("best", ["--preset", "best"], "glass"),
                              ("override", ["--preset", "cpu", "--white-rule", "grey"], "grey")):
        code, _, err = run_cli(capsys, monkeypatch, *base, "--out", tmp_path / name, *extra)
        assert code == 0, err
        assert json.loads((tmp_path / name / "pseudo_masks_config.json").read_text())["white_rule"] == rule, name
    code, _, err = run_cli(capsys, monkeypatch, *base, "--out", tmp_path / "bad", "--preset", "gpu")
    assert code == 1 and "unknown preset 'gpu'" in err and len(err.strip().splitlines()) == 1


def test_torchrun_ranks_split_the_patches_and_write_the_single_process_masks(synth_root, checkpoints, tmp_path):
    """Two torchrun processes (gloo on the CPU): each computes every other patch under its own lock
    of the shared folder; together they write byte for byte the masks of one process, and the
    summary counts every patch once. A second run keeps them all."""
    import os
    import subprocess
    import sys

    single = tmp_path / "one"
    generate(config(synth_root, checkpoints["ours"], single), progress=False)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "ranks"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "wsss",
           "generate-pm", "--dataset", "luad", "--data", str(synth_root), "--checkpoint", str(checkpoints["ours"]),
           "--out", str(out), "--batch-size", "4", "--device", "cpu", "--workers", "0"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [p.relative_to(out) for p in pm_files(out)] == [p.relative_to(single) for p in pm_files(single)]
    assert all((out / p.relative_to(single)).read_bytes() == p.read_bytes() for p in pm_files(single))
    # each rank logged its own 3 patches and the summed summary: 6 computed, 18 files (once per rank)
    assert proc.stderr.count("pseudo-masks: 6 patches computed, 0 skipped") == 2, proc.stderr[-3000:]
    manifest = [json.loads(line) for line in (out / ".wsss-manifest.jsonl").read_text().splitlines()]
    written = [e["file"] for e in manifest if "file" in e and e["file"].startswith("PM_")]
    assert sorted(written) == sorted(str(p.relative_to(out)) for p in pm_files(out))  # every mask once
    assert not list(out.glob(".wsss-lock*"))
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 0 and again.stderr.count("0 patches computed, 6 skipped") == 2, again.stderr[-3000:]


def test_a_write_that_fails_in_the_writer_thread_stops_the_run_and_a_rerun_keeps_what_was_written(
        synth_root, checkpoints, tmp_path, monkeypatch):
    """PNGs are written in a thread while the next batch computes: its error (a full disk) reaches
    the caller as the same one-line error, after which every recorded mask is a complete file."""
    from wsss.stages import pseudo_masks as pm

    out = tmp_path / "pm"
    real, calls = pm.write_mask, []

    def full_disk(path, mask, palette):
        calls.append(path)
        if len(calls) == 7:  # the first mask of the second batch of two patches (three layers a patch)
            raise WsssError(f"cannot write {path}: No space left on device")
        return real(path, mask, palette)

    monkeypatch.setattr(pm, "write_mask", full_disk)
    with pytest.raises(WsssError, match="No space left on device"):
        generate(replace(config(synth_root, checkpoints["ours"], out), batch_size=2), progress=False)
    assert len(pm_files(out)) == 6  # the first batch: two patches, three layers each
    monkeypatch.setattr(pm, "write_mask", real)
    summary = generate(replace(config(synth_root, checkpoints["ours"], out), batch_size=2), progress=False)
    assert (summary["computed"], summary["skipped"]) == (4, 2) and len(pm_files(out)) == 18
