"""`wsss reproduce`: the chain on a tiny synthetic dataset, the report, and continuing a stopped run."""

import json
import logging
from pathlib import Path

import pytest

from helpers import assert_one_line_error, run_cli, tiny_reproduce
from wsss.config import STAGE1_PRESETS, STAGE2_PRESETS
from wsss.errors import WsssError
from wsss.stages.reproduce import format_report, run






def test_reproduce_runs_the_chain_then_continues_instead_of_repeating(tmp_path, tiny_presets, capsys, monkeypatch,
                                                                     caplog):
    caplog.set_level(logging.INFO)
    cfg = tiny_reproduce(tmp_path)
    first = run(cfg)
    report = tmp_path / "report"
    # every stage ran and wrote what the next one reads
    assert (tmp_path / "data" / "synth.json").is_file()
    for layer in ("b4_5", "b5_2", "bn7"):
        assert len(list((tmp_path / "ckpt" / "train_PM" / f"PM_{layer}").glob("*.png"))) == 16
    assert (tmp_path / "ckpt" / "stage1_checkpoint_trained_on_luad.pth").is_file()
    assert (tmp_path / "ckpt" / "stage2_checkpoint_trained_on_luad.pth").is_file()
    # the report carries the numbers each stage wrote, not numbers of its own
    metrics = json.loads((report / "metrics.json").read_text())
    cam = json.loads((tmp_path / "ckpt" / "stage1_luad_cam_metrics.json").read_text())
    saved = json.loads((report / "report.json").read_text())
    assert saved["stage2"]["test"]["mIoU"] == metrics["test"]["mIoU"]
    assert saved["stage2"]["test_gate"]["mIoU"] == metrics["test_gate"]["mIoU"]
    assert saved["stage1_cam"]["test"]["mIoU"] == cam["test"]["mIoU"]
    assert set(saved["pseudo_masks"]) == {"b4_5", "b5_2", "bn7"}
    assert not any(t["skipped"] for t in saved["times"].values())
    md = (report / "report.md").read_text()
    assert md == format_report(first)
    for row in ("stage-1 CAM (test)", "pseudo-mask bn7", "stage 2 (test)", "stage 2 + gate (test)", "**total**"):
        assert row in md
    # it says which initial weights each stage started from: here none
    assert saved["init_weights"] == {"stage1": None, "stage2": None}
    none = "stage 1 none (random initialisation); stage 2 none (random initialisation)"
    assert f"Initial weights: {none}." in md and f"initial weights: {none}" in caplog.text

    # a second call skips every finished step and reports the same numbers and earlier times
    code, out, err = run_cli(capsys, monkeypatch, "reproduce", "--dataset", "luad", "--data", tmp_path / "data",
                             "--synth", "--preset", "tiny", "--run", "t", "--out", tmp_path / "ckpt", "--report",
                             report, "--device", "cpu", "--workers", "0", "--no-figures")
    assert code == 0, err
    again = json.loads((report / "report.json").read_text())
    assert again["stage2"] == saved["stage2"]
    assert all(t["skipped"] for t in again["times"].values())
    assert [t["seconds"] for t in again["times"].values()] == [
        t["seconds"] for k, t in saved["times"].items() if k != "synthetic data"]
    assert "stage 2 + gate (test)" in out

    # stopped during stage 2: only stage 2 runs again
    progress = json.loads((report / "progress.json").read_text())
    del progress["steps"]["stage2"]
    (report / "progress.json").write_text(json.dumps(progress))
    (report / "metrics.json").unlink()
    third = run(cfg)
    skipped = {k: t["skipped"] for k, t in third["times"].items()}
    assert skipped.pop("stage 2: train-stage2 --gate") is False
    assert all(skipped.values())
    assert (report / "metrics.json").is_file()


def test_reproduce_refuses_to_mix_settings(tmp_path, tiny_presets):
    report = tmp_path / "report"
    report.mkdir()
    (report / "progress.json").write_text(json.dumps({"signature": {"dataset": "luad", "data": str(tmp_path / "data"),
                                                                    "preset": "cpu", "stage1_init": None,
                                                                    "stage2_init": None}, "steps": {}}))
    (tmp_path / "data" / "train").mkdir(parents=True)
    with pytest.raises(WsssError, match='other settings.*preset: "cpu" → "tiny"'):
        run(tiny_reproduce(tmp_path, synth=False))


def test_reproduce_takes_a_config_file_for_the_whole_chain(tmp_path, tiny_presets, capsys, monkeypatch):
    """--config gives every step its table (over the preset, under reproduce's own options);
    --print-config prints the three resolved tables; the file's settings are part of what the
    report records, so a continued run with another file is refused."""
    from wsss.config import PRESET_DIR

    base = ["reproduce", "--dataset", "luad", "--data", tmp_path / "data", "--out", tmp_path / "c",
            "--report", tmp_path / "r", "--seeds", "3"]

    def printed(*args) -> str:
        code, out, err = run_cli(capsys, monkeypatch, *base, *args, "--print-config")
        assert code == 0, err
        return out

    by_name = printed("--preset", "cpu")
    assert by_name.count('precision = "auto"\n') == 3  # the preset's, as --precision is not given
    assert printed("--preset", "cpu", "--precision", "fp32").count('precision = "fp32"\n') == 3
    assert by_name.count("[stage1]\n") == by_name.count("[pseudo_masks]\n") == by_name.count("[stage2]\n") == 1
    assert by_name.count('preset = "cpu"\n') == 3 and by_name.count("seed = 3\n") == 2  # stage 1 and stage 2
    assert printed("--config", PRESET_DIR / "cpu.toml") == by_name.replace('preset = "cpu"\n', "")
    mine = tmp_path / "mine.toml"
    mine.write_text('[stage1]\npreset = "cpu"\nepochs = 3\nseed = 9\n\n[stage2]\ngate_mode = "reference"\n'
                    '[pseudo_masks]\nflip = true\n')
    text = printed("--preset", "cpu", "--config", mine)
    stage1, pm, stage2 = (text.split(f"[{t}]\n")[1].split("\n[")[0] for t in ("stage1", "pseudo_masks", "stage2"))
    assert "epochs = 3\n" in stage1 and "seed = 3\n" in stage1  # reproduce's --seeds wins over the file
    assert "flip = true\n" in pm and 'gate_mode = "reference"\n' in stage2 and "epochs = 12\n" in stage2

    cfg = tiny_reproduce(tmp_path, synth=False, config_file=mine)
    assert cfg.gate_mode == "reference"
    assert cfg.signature()["config"] == {"stage1": {"preset": "cpu", "epochs": 3, "seed": 9},
                                         "pseudo_masks": {"flip": True}, "stage2": {"gate_mode": "reference"}}
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "progress.json").write_text(json.dumps({"signature": tiny_reproduce(tmp_path, synth=False).signature(),
                                                                   "steps": {}}))
    (tmp_path / "data" / "train").mkdir(parents=True)
    with pytest.raises(WsssError, match=r'other settings \(config: null → \{"stage1": \{"preset": "cpu", "epochs": 3'):
        run(cfg)
    mine.write_text("[stage1]\nepoch = 3\n")
    err = assert_one_line_error(capsys, monkeypatch, *base, "--config", mine)
    assert f"{mine}: [stage1] has no key 'epoch'" in err


def test_reproduce_missing_data_is_one_clear_line(tmp_path, capsys, monkeypatch):
    code, out, err = run_cli(capsys, monkeypatch, "reproduce", "--dataset", "luad", "--data", tmp_path / "nope",
                             "--report", tmp_path / "r", "--out", tmp_path / "c")
    assert code == 1
    assert "not found" in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()


def test_ablations_run_in_their_own_folders_and_add_rows(tmp_path, tiny_presets):
    result = run(tiny_reproduce(tmp_path, ablations=True))
    rows = result["ablations"]
    # the tiny preset has none of our improvements (it is the paper's recipe at a tiny scale), so each
    # improvement row turns one on
    ours = [("stage 1 --blur-jitter 1 (ours)", "stage1_blur_jitter_1"),
            ("stage 1 --refit-epochs 6 (ours)", "stage1_refit_epochs_6"),
            ("stage 1 --momentum 0.9 (ours)", "stage1_momentum_0.9"), ("stage 1 --augment d4 (ours)", "stage1_augment_d4"),
            ("stage 1 --no-pda (ours)", "stage1_pda_False"), ("stage 1 --dropout 0 (ours)", "stage1_dropout_0"),
            ("stage 1 --lr 0.02 (ours)", "stage1_lr_0.02"),
            ("pseudo-masks --white-rule glass (ours)", "pm_white_rule_glass"),
            ("stage 2 --jpeg-jitter 40 (ours)", "stage2_jpeg_jitter_40"),
            ("stage 2 --loss-reduction mean (ours)", "stage2_loss_reduction_mean"),
            ("stage 2 --augment d4 (ours)", "stage2_augment_d4"),
            ("stage 2 --mosaic 0.5 (ours)", "stage2_mosaic_0.5"),
            ("stage 2 --ema 0.99 (in no preset)", "stage2_ema_0.99")]
    assert list(rows) == ["full method", "single-layer PM (bn7)", *(t for t, _ in ours),
                          "fully supervised (true masks)"]
    report = tmp_path / "report"
    for name, folder in (("single-layer PM (bn7)", "bn7_only"), *ours,
                         ("fully supervised (true masks)", "gt")):
        metrics = json.loads((report / "ablation" / folder / "metrics.json").read_text())
        assert rows[name]["stage2_test"] == metrics["test"]["mIoU"]
        assert rows[name]["stage2_test_gate"] == metrics["test_gate"]["mIoU"]
    # each variant trained what it says
    bn7 = json.loads((tmp_path / "ckpt" / "ablation" / "bn7_only" / "stage2_luad_config.json").read_text())
    assert bn7["pm_layers"] == ["bn7"] and bn7["pm_weights"] == [1.0]
    no_pda = json.loads((tmp_path / "ckpt" / "ablation" / "stage1_pda_False" / "stage1_luad_config.json").read_text())
    assert no_pda["pda"] is False
    assert len(list((tmp_path / "ckpt" / "ablation" / "stage1_pda_False" / "train_PM" / "PM_bn7").glob("*.png"))) == 16
    momentum = json.loads((tmp_path / "ckpt" / "ablation" / "stage1_momentum_0.9" / "stage1_luad_config.json").read_text())
    assert json.loads((tmp_path / "ckpt" / "ablation" / "pm_white_rule_glass" / "train_PM" / "pseudo_masks_config.json")
                      .read_text())["white_rule"] == "glass"
    assert momentum["momentum"] == 0.9
    main = json.loads((tmp_path / "ckpt" / "stage1_luad_config.json").read_text())
    assert main["momentum"] == 0.0005
    mean = json.loads((tmp_path / "ckpt" / "ablation" / "stage2_loss_reduction_mean" / "stage2_luad_config.json").read_text())
    assert mean["loss_reduction"] == "mean"
    assert json.loads((tmp_path / "ckpt" / "stage2_luad_config.json").read_text())["loss_reduction"] == "reference"
    assert json.loads((tmp_path / "ckpt" / "ablation" / "stage2_ema_0.99" / "stage2_luad_config.json")
                      .read_text())["ema"] == 0.99
    gt = json.loads((tmp_path / "ckpt" / "ablation" / "gt" / "stage2_luad_config.json").read_text())
    assert gt["pm_layers"] == ["gt"]
    assert rows["full method"]["stage2_test"] == result["stage2"]["test"]["mIoU"]
    assert "## Ablations" in (report / "report.md").read_text()


def test_seed_sweep_reports_mean_min_max_from_the_per_seed_files(tmp_path, tiny_presets):
    from wsss.stages.reproduce import aggregate_files

    result = run(tiny_reproduce(tmp_path, seeds=(0, 2), upper_bound=True))
    report = tmp_path / "report"
    files = [report / "seed_result.json", report / "seed2" / "seed_result.json"]
    per_seed = [json.loads(f.read_text()) for f in files]
    # each seed trained its own models in its own folders
    assert (tmp_path / "ckpt" / "seed2" / "stage1_checkpoint_trained_on_luad.pth").is_file()
    assert json.loads((tmp_path / "ckpt" / "seed2" / "stage1_luad_config.json").read_text())["seed"] == 2
    assert len(list((tmp_path / "ckpt" / "seed2" / "train_PM" / "PM_bn7").glob("*.png"))) == 16
    # the rows come from those files: recompute mean/min/max by hand
    for row, key in (("stage 2 + gate (test)", ("stage2", "test_gate")),
                     ("upper bound: stage 2 on true masks (test)", ("upper_bound", "test"))):
        values = [r[key[0]][key[1]]["mIoU"] for r in per_seed]
        summary = result["summary"][row]
        assert summary["per_seed"] == {"0": values[0], "2": values[1]}
        assert summary["mean"] == pytest.approx(sum(values) / 2)
        assert (summary["min"], summary["max"]) == (min(values), max(values))
    # a changed per-seed file changes the summary: nothing is cached elsewhere
    per_seed[1]["stage2"]["test_gate"]["mIoU"] = 0.0001
    files[1].write_text(json.dumps(per_seed[1]))
    assert aggregate_files(files)["stage 2 + gate (test)"]["min"] == 0.0001
    md = (report / "report.md").read_text()
    assert "| result | mean | min | max | seed 0 | seed 2 |" in md


def test_transfer_tests_the_seeds_model_on_the_other_dataset(tmp_path, tiny_presets):
    """Pointing --transfer at the training data itself must give back the stage-2 test numbers exactly."""
    result = run(tiny_reproduce(tmp_path, transfer=tmp_path / "data"))
    assert result["transfer"]["test"] == result["stage2"]["test"]
    assert result["transfer"]["test_gate"] == result["stage2"]["test_gate"]
    assert result["summary"]["stage 2 + gate tested on data"]["mean"] == result["stage2"]["test_gate"]["mIoU"]
    with pytest.raises(WsssError, match="--transfer: dataset folder"):
        run(tiny_reproduce(tmp_path, transfer=tmp_path / "nowhere", report=tmp_path / "r2", out=tmp_path / "c2"))


def test_improvement_rows_of_the_cpu_preset_go_back_to_the_paper_values():
    from wsss.config import IMPROVEMENTS, PM_PRESETS, Stage1Config, Stage2Config
    from wsss.stages.pseudo_masks import PseudoMaskConfig
    from wsss.stages.reproduce import improvement_variants

    paper = {"stage1": Stage1Config("luad", Path(".")), "stage2": Stage2Config("luad", Path(".")),
             "pm": PseudoMaskConfig("luad", Path("."), Path("x.pth"))}
    variants = improvement_variants("cpu")
    assert len(variants) == sum(len(v) for v in IMPROVEMENTS.values())
    for v in variants:
        (step, change), = [(k, getattr(v, k)) for k in ("stage1", "pm", "stage2") if getattr(v, k)]
        (key, value), = change.items()
        assert value == getattr(paper[step], key) and v.title.endswith("(paper)")
    # the cpu preset carries every improvement, best all but the thin network's "no PDA", "no dropout"
    # and learning rate (PDA helps from ImageNet weights in the paper's own ablation; the dropout was
    # made for 4096 channels; the rate was tuned on the thin network), cpu-paper none
    for step, presets in (("stage1", STAGE1_PRESETS), ("pm", PM_PRESETS), ("stage2", STAGE2_PRESETS)):
        for key, value in IMPROVEMENTS[step].items():
            assert presets["cpu"][key] == value
            thin_only = step == "stage1" and key in ("pda", "dropout", "lr")
            assert presets["best"].get(key, "paper value") == ("paper value" if thin_only else value)
            assert key not in presets["cpu-paper"]
    best = improvement_variants("best")
    assert [v.title for v in best if v.stage1 and "pda" in v.stage1] == ["stage 1 --no-pda (ours)"]


def test_reproduce_over_random_tasks_reports_every_task_and_seed(tmp_path, tiny_presets, capsys, monkeypatch):
    """``--synth-tasks 1,2 --seeds 0,1``: each task gets its own data, checkpoints and report, and the
    table's mean, worst and per-task columns are those of the four runs' own result files."""
    code, out, err = run_cli(capsys, monkeypatch, "reproduce", "--dataset", "luad", "--data", tmp_path / "data",
                             "--synth", "--synth-tasks", "1,2", "--seeds", "0,1", "--synth-counts", "12,3,3",
                             "--synth-size", "48", "--preset", "tiny", "--run", "t", "--out", tmp_path / "ckpt",
                             "--report", tmp_path / "report", "--device", "cpu", "--workers", "0", "--no-figures")
    assert code == 0, err
    for task in (1, 2):
        synth = json.loads((tmp_path / "data" / f"task{task}" / "synth.json").read_text())
        assert synth["task"]["seed"] == task and synth["size"] == 48
    per_run = {}
    for task in (1, 2):
        for seed, sub in ((0, ""), (1, "seed1")):
            path = tmp_path / "report" / f"task{task}" / sub / "seed_result.json"
            per_run[(task, seed)] = json.loads(path.read_text())
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    cam = {k: r["stage1_cam"]["test"]["mIoU"] for k, r in per_run.items()}
    row = report["summary"]["stage-1 CAM (test)"]
    assert row["mean"] == pytest.approx(sum(cam.values()) / 4)
    assert row["min"] == pytest.approx(min(cam.values()))
    fit = report["summary"]["stage-1 label accuracy on its training patches (fit)"]
    assert fit["min"] == pytest.approx(min(r["stage1_fit"]["label_acc"] for r in per_run.values()))
    md = (tmp_path / "report" / "report.md").read_text()
    task1 = (cam[(1, 0)] + cam[(1, 1)]) / 2
    line = next(line for line in md.splitlines() if line.startswith("| stage-1 CAM (test)"))
    assert f"{task1:.3f}" in line.split("|")[5]
    assert "Stage 1 fits its training labels" in md


def test_reproduce_refuses_synthetic_data_of_other_settings(tmp_path, tiny_presets):
    """DATA holding 48-px synthetic patches is not silently used for a run that asks for 32-px ones
    or for a random task."""
    from wsss.data.synth import generate

    generate(tmp_path / "data", n_train=4, n_val=1, n_test=1, size=48, workers=1, progress=False)
    for kw, words in (({"synth_size": 32}, "size 48 (asked 32)"), ({"synth_size": 48, "synth_task": 3}, "task")):
        with pytest.raises(WsssError, match="holds synthetic data of other settings") as info:
            run(tiny_reproduce(tmp_path, **kw))
        assert words in str(info.value)
    assert not (tmp_path / "report").exists()


def test_an_unknown_preset_is_one_line_before_anything_is_written(tmp_path, capsys, monkeypatch):
    from helpers import assert_one_line_error

    err = assert_one_line_error(capsys, monkeypatch, "reproduce", "--dataset", "luad", "--data", tmp_path / "data",
                                "--synth", "--preset", "fast", "--out", tmp_path / "ckpt", "--report", tmp_path / "r")
    assert "unknown preset 'fast'; choose one of paper, cpu-paper, cpu, best" in err
    assert not any(p.exists() for p in (tmp_path / "data", tmp_path / "ckpt", tmp_path / "r"))


def test_the_task_report_names_the_runs_that_needed_refit_epochs():
    from wsss.stages.reproduce import format_task_report

    fits = [{"task": 1, "seed": "1/0", "label_acc": 0.97, "fits": True},
            {"task": 2, "seed": "2/1", "label_acc": 0.955, "fits": True,
             "before_refit": {"label_acc": 0.927, "fits": False}},
            {"task": 2, "seed": "2/2", "label_acc": 0.94, "fits": False,
             "before_refit": {"label_acc": 0.91, "fits": False}}]
    md = format_task_report({"dataset": "luad", "preset": "cpu", "gate_mode": "mask", "difficulty": 0.5, "size": 112,
                             "mpp": 1.0, "tasks": [1, 2], "seeds": [0, 1, 2], "summary": {}, "fits": fits,
                             "machine": {"platform": "p", "cpu_count": 2, "torch": "t", "cuda": None}})
    assert ("Stage 1 fits its training labels (label accuracy ≥ 0.95) in 2 of 3 runs: not in task/seed 2/2 (0.940). "
            "Refit epochs ran in task/seed 2/1 (0.927 → 0.955), task/seed 2/2 (0.910 → 0.940).") in md
