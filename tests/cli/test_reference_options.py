"""The options that choose between the reference's recipe and ours (SGD momentum and decay, presets, the keys
train-stage2 records): bad values end in one clear line, and each reaches the computation it names."""

from __future__ import annotations

import json

import pytest

from helpers import run_cli
from wsss.config import STAGE1_PRESETS, STAGE2_PRESETS, Stage1Config, Stage2Config, resolve
from wsss.errors import WsssError


@pytest.mark.parametrize(
    "args, fragment",
    [
        (("train-stage1", "--momentum", "1.0"), "--momentum must be in [0, 1)"),
        (("train-stage1", "--momentum", "-0.1"), "--momentum must be in [0, 1)"),
        (("train-stage1", "--weight-decay", "-1e-4"), "--weight-decay must be 0 or more"),
        (("train-stage1", "--augment", "d8"), "--augment must be one of flip, d4"),
        (("train-stage2", "--loss-reduction", "sum"), "--loss-reduction must be one of reference, mean"),
        (("train-stage2", "--loss", "dice"), "--loss-reduction reference is the reference's cross-entropy"),
        (("train-stage2", "--gate-mode", "multiply"), "--gate-mode must be one of mask, reference"),
        (("train-stage2", "--gate-threshold", "2"), "--gate-threshold is a probability in [0, 1)"),
        (("train-stage2", "--momentum", "1.5"), "--momentum must be in [0, 1)"),
        (("train-stage2", "--weight-decay", "-1"), "--weight-decay must be 0 or more"),
        (("evaluate", "--checkpoint", "x.pth", "--gate-mode", "multiply"), "--gate-mode must be one of"),
        (("evaluate", "--checkpoint", "x.pth", "--gate-threshold", "-5"), "--gate-threshold is a probability"),
        (("eval-cam", "--checkpoint", "x.pth", "--tie-rule", "first"), "--tie-rule must be one of ours, reference"),
        (("generate-pm", "--checkpoint", "x.pth", "--tie-rule", "first"), "--tie-rule must be one of ours, reference"),
        (("predict", "img.png", "--checkpoint", "x.pth", "--out", "o", "--gate-mode", "x"), "--gate-mode must be one of"),
        (("predict-wsi", "s.tif", "--checkpoint", "x.pth", "--out", "o", "--gate-threshold", "1"),
         "--gate-threshold is a probability"),
        (("reproduce", "--gate-mode", "x"), "--gate-mode must be one of"),
        (("reproduce", "--seeds", "1,1"), "--seeds needs distinct non-negative seeds"),
    ],
)
def test_bad_fidelity_options_are_one_line(args, fragment, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    command, *rest = args
    data = () if command in ("predict", "predict-wsi") else ("--data", tmp_path)
    code, out, err = run_cli(capsys, monkeypatch, command, "--dataset", "luad", *data, *rest)
    assert code == 1
    assert fragment in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_presets_give_the_reference_recipe_or_the_corrected_one(tmp_path):
    paper1 = resolve(Stage1Config, STAGE1_PRESETS, "paper", dataset="luad", data=tmp_path)
    paper2 = resolve(Stage2Config, STAGE2_PRESETS, "paper", dataset="luad", data=tmp_path)
    assert (paper1.momentum, paper1.weight_decay) == (0.0005, 5e-4)
    assert (paper2.momentum, paper2.weight_decay, paper2.loss_reduction) == (0.9, 5e-4, "reference")
    assert paper2.gate_mode == "reference"  # the paper preset is the reference's gate too
    cpu1 = resolve(Stage1Config, STAGE1_PRESETS, "cpu", dataset="luad", data=tmp_path)
    cpu2 = resolve(Stage2Config, STAGE2_PRESETS, "cpu", dataset="luad", data=tmp_path)
    assert cpu1.momentum == 0.9 and cpu2.loss_reduction == "mean" and cpu2.gate_mode == "mask"
    # an option given explicitly beats the preset
    assert resolve(Stage1Config, STAGE1_PRESETS, "cpu", dataset="luad", data=tmp_path, momentum=0.5).momentum == 0.5


def test_stage1_optimizer_gets_the_configured_momentum_and_decay(tmp_path):
    from wsss.models.resnet38 import ResNet38Classifier
    from wsss.stages.stage1 import build_optimizer

    model = ResNet38Classifier(4, width=0.0625)
    cfg = resolve(Stage1Config, STAGE1_PRESETS, "paper", dataset="luad", data=tmp_path, weight_decay=1e-3)
    optimizer, _ = build_optimizer(model, cfg, 10)
    assert {g["momentum"] for g in optimizer.param_groups} == {0.0005}
    decays = {g["name"]: g["weight_decay"] for g in optimizer.param_groups}
    assert decays["backbone_weight"] == 1e-3 and decays["head_weight"] == 1e-3
    assert decays["backbone_bias"] == 0.0


def test_train_stage2_records_the_contract_keys(tmp_path):
    """``momentum``/``weight_decay`` (and the new ``loss_reduction``/``gate_mode``) are saved configs' keys."""
    from wsss.config import save_json

    cfg = resolve(Stage2Config, STAGE2_PRESETS, "cpu", dataset="luad", data=tmp_path, momentum=0.8, weight_decay=1e-4)
    save_json(cfg, tmp_path / "c.json")
    saved = json.loads((tmp_path / "c.json").read_text())
    assert (saved["momentum"], saved["weight_decay"], saved["loss_reduction"], saved["gate_mode"]) == (
        0.8, 1e-4, "mean", "mask")
    with pytest.raises(WsssError, match="--loss-reduction"):
        resolve(Stage2Config, STAGE2_PRESETS, None, dataset="luad", data=tmp_path, loss_reduction="total")
