"""--print-config writes the resolved configuration as a --config file's table; --config reads it
back (over the preset, under the command line), and the same run comes out bit for bit. Bad files
end in one line naming the file and the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers import run_cli
from wsss.runtime import load_checkpoint

TINY = ["--epochs", "1", "--batch-size", "8", "--width", "0.125", "--image-size", "32", "--workers", "0",
        "--device", "cpu", "--pda-first-epoch", "1", "--seed", "5"]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    from wsss.data.synth import generate

    root = tmp_path_factory.mktemp("synth") / "data"
    generate(root, n_train=16, n_val=2, n_test=2, size=48, seed=4, workers=1, progress=False)
    return root


def printed(capsys, monkeypatch, *args) -> str:
    code, out, err = run_cli(capsys, monkeypatch, *args, "--print-config")
    assert code == 0, err
    return out


def test_print_config_given_back_trains_the_same_model(tiny_data, tmp_path, capsys, monkeypatch):
    base = ["train-stage1", "--dataset", "luad", "--data", tiny_data, "--preset", "cpu"]
    text = printed(capsys, monkeypatch, *base, *TINY, "--out", tmp_path / "a")
    assert text.startswith("[stage1]\n") and 'preset = "cpu"' in text and "epochs = 1\n" in text
    (tmp_path / "run.toml").write_text(text)
    # the same run from the file alone (what the command line requires, and another --out)
    code, _, err = run_cli(capsys, monkeypatch, *base, *TINY, "--out", tmp_path / "a")
    assert code == 0, err
    code, _, err = run_cli(capsys, monkeypatch, "train-stage1", "--dataset", "luad", "--data", tiny_data,
                           "--config", tmp_path / "run.toml", "--out", tmp_path / "b")
    assert code == 0, err
    a = load_checkpoint(tmp_path / "a" / "stage1_checkpoint_trained_on_luad.pth")
    b = load_checkpoint(tmp_path / "b" / "stage1_checkpoint_trained_on_luad.pth")
    assert a["model"].keys() == b["model"].keys()
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    assert {k: v for k, v in a["config"].items() if k != "out"} == {k: v for k, v in b["config"].items() if k != "out"}


def test_the_file_sits_between_the_preset_and_the_command_line(tmp_path, capsys, monkeypatch):
    (tmp_path / "c.toml").write_text('[stage1]\npreset = "cpu"\nepochs = 3\nlr = 0.5\n\n'
                                     '[stage2]\nepochs = 4\nmosaic = 0.25\npm_layers = ["bn7"]\npm_weights = [1]\n')
    stage1 = ["train-stage1", "--dataset", "luad", "--data", tmp_path, "--config", tmp_path / "c.toml"]
    text = printed(capsys, monkeypatch, *stage1)
    # the file's preset (cpu: width 0.125, momentum 0.9) under the file's own keys
    assert "epochs = 3\n" in text and "lr = 0.5\n" in text and "width = 0.125\n" in text and "momentum = 0.9\n" in text
    text = printed(capsys, monkeypatch, *stage1, "--epochs", "2", "--preset", "paper")
    assert "epochs = 2\n" in text and "lr = 0.5\n" in text and "width = 1.0\n" in text and 'preset = "paper"' in text
    text = printed(capsys, monkeypatch, "train-stage2", "--dataset", "luad", "--data", tmp_path, "--config",
                   tmp_path / "c.toml", "--preset", "cpu")
    assert text.startswith("[stage2]\n") and "epochs = 4\n" in text and "mosaic = 0.25\n" in text
    assert 'pm_layers = [\n    "bn7",\n]' in text and "pm_weights = [\n    1.0,\n]" in text
    # a table the command does not read changes nothing
    text = printed(capsys, monkeypatch, "generate-pm", "--data", tmp_path, "--checkpoint", tmp_path / "x.pth",
                   "--config", tmp_path / "c.toml")
    assert text.startswith("[pseudo_masks]\n") and "batch_size = 8\n" in text and 'white_rule = "grey"' in text


def test_generate_pm_and_stage2_print_what_they_read(tmp_path, capsys, monkeypatch):
    for command, extra in (("generate-pm", ["--checkpoint", tmp_path / "s1.pth", "--preset", "cpu", "--flip"]),
                           ("train-stage2", ["--dataset", "luad", "--preset", "cpu", "--ema", "0.9"])):
        first = printed(capsys, monkeypatch, command, "--data", tmp_path, *extra)
        (tmp_path / f"{command}.toml").write_text(first)
        dataset = ["--dataset", "luad"] if command == "train-stage2" else []
        again = printed(capsys, monkeypatch, command, "--data", tmp_path, *dataset,
                        *(["--checkpoint", tmp_path / "s1.pth"] if command == "generate-pm" else []),
                        "--config", tmp_path / f"{command}.toml")
        assert again == first


@pytest.mark.parametrize("content, words", [
    ("[stage1]\nlrr = 0.1\n", "[stage1] has no key 'lrr'"),
    ("[stage1]\nepochs = \"ten\"\n", "[stage1] epochs = 'ten' has the wrong type"),
    ("[stage1]\naugment = 4\n", "[stage1] augment = 4 has the wrong type"),
    ("[stage_1]\nepochs = 2\n", "unknown table or key 'stage_1'"),
    ("epochs = 2\n", "unknown table or key 'epochs'"),
    ("[stage1\nepochs = 2\n", "is not a TOML file"),
])
def test_a_bad_config_file_is_one_line_naming_it(content, words, tmp_path, capsys, monkeypatch):
    path = tmp_path / "bad.toml"
    path.write_text(content)
    code, out, err = run_cli(capsys, monkeypatch, "train-stage1", "--dataset", "luad", "--data", tmp_path,
                             "--config", path, "--out", tmp_path / "out")
    assert code == 1 and words in err and str(path) in err
    assert err.count("\n") == 1 and "Traceback" not in err and not (tmp_path / "out").exists()
    code, _, err = run_cli(capsys, monkeypatch, "train-stage1", "--dataset", "luad", "--data", tmp_path,
                           "--config", tmp_path / "missing.toml")
    assert code == 1 and "missing.toml not found" in err


def test_the_presets_are_config_files_a_user_can_copy(tmp_path, capsys, monkeypatch):
    """Each preset is a TOML file in the package with the tables of a --config file: given as
    --config it resolves to what --preset gives (the preset's name aside), and the cpu preset holds
    the values written here by hand."""
    import tomllib

    from wsss.config import IMPROVEMENTS, PRESET_DIR

    cpu = tomllib.loads((PRESET_DIR / "cpu.toml").read_text(encoding="utf-8"))
    assert cpu["stage1"] == {"stain_norm": "reinhard-set", "blur_jitter": 1.0, "width": 0.125, "epochs": 12, "refit_epochs": 6, "batch_size": 16, "workers": 0, "pda_norm": "max",
                             "head_lr_mult": 1.0, "momentum": 0.9, "augment": "d4", "pda": False, "dropout": 0.0,
                             "lr": 0.02, "cam_tie_rule": "ours", "precision": "auto"}
    assert cpu["pseudo_masks"] == {"workers": 0, "white_rule": "glass", "tie_rule": "ours", "precision": "auto"}
    assert cpu["stage2"] == {"stain_norm": "reinhard-set", "jpeg_jitter": 40, "backbone": "resnet18", "head_channels": 64, "epochs": 12, "batch_size": 16,
                             "workers": 0, "loss_reduction": "mean", "augment": "d4", "mosaic": 0.5,
                             "gate_mode": "mask", "drop_last": True, "precision": "auto"}
    # the ablation rows: what cpu changes from cpu-paper, our tie/gate/batch rules, how it runs and
    # reinhard-set (it trains exactly as none) aside
    assert IMPROVEMENTS == {"stage1": {"blur_jitter": 1.0, "refit_epochs": 6, "momentum": 0.9, "augment": "d4",
                                       "pda": False, "dropout": 0.0, "lr": 0.02},
                            "pm": {"white_rule": "glass"},
                            "stage2": {"jpeg_jitter": 40, "loss_reduction": "mean", "augment": "d4", "mosaic": 0.5}}
    base = ["train-stage1", "--dataset", "luad", "--data", tmp_path, "--out", tmp_path / "o"]
    for name in ("paper", "cpu-paper", "cpu", "best"):
        by_name = printed(capsys, monkeypatch, *base, "--preset", name)
        by_file = printed(capsys, monkeypatch, *base, "--config", PRESET_DIR / f"{name}.toml")
        assert by_name.replace(f'preset = "{name}"\n', "") == by_file, name
    two = ["train-stage2", "--dataset", "luad", "--data", tmp_path, "--out", tmp_path / "o"]
    assert (printed(capsys, monkeypatch, *two, "--preset", "cpu").replace('preset = "cpu"\n', "")
            == printed(capsys, monkeypatch, *two, "--config", PRESET_DIR / "cpu.toml"))


def test_the_layers_default_is_the_gradcam_layers():
    from wsss.cam.gradcam import GRADCAM_LAYERS
    from wsss.config import PseudoMaskConfig

    assert PseudoMaskConfig(dataset=None, data=Path("d"), checkpoint=Path("c")).layers == tuple(GRADCAM_LAYERS) \
        == ("b4_5", "b5_2", "bn7")


def test_predict_and_predict_wsi_read_their_tables(tmp_path, capsys, monkeypatch):
    """predict's [predict] and predict-wsi's [predict_wsi] tables fill the options not given on the
    command line; the printed configuration given back prints itself again; a key that is not an
    option of the command is one line."""
    from helpers import tiny_checkpoint

    ckpt = tiny_checkpoint(tmp_path / "s2.pth", 2)
    image = tmp_path / "a.png"
    image.write_bytes(b"")
    mine = tmp_path / "mine.toml"
    mine.write_text('[predict]\ntta = "flip"\ntile = 96\nbatch_size = 3\n\n[predict_wsi]\nmin_tissue = 0.25\n'
                    'geojson = true\ntta = "d4"\n')
    base = ["predict", image, "--checkpoint", ckpt, "--out", tmp_path / "o", "--device", "cpu"]
    text = printed(capsys, monkeypatch, *base, "--config", mine)
    assert text.startswith("[predict]\n") and 'tta = "flip"\n' in text and "tile = 96\n" in text
    assert "batch_size = 3\n" in text and 'precision = "fp32"\n' in text
    assert 'tta = "d4"\n' in printed(capsys, monkeypatch, *base, "--config", mine, "--tta", "d4")  # the line wins
    (tmp_path / "printed.toml").write_text(text)
    assert printed(capsys, monkeypatch, *base, "--config", tmp_path / "printed.toml") == text

    wsi = ["predict-wsi", tmp_path / "s.tif", "--checkpoint", ckpt, "--out", tmp_path / "w", "--device", "cpu"]
    text = printed(capsys, monkeypatch, *wsi, "--config", mine)
    assert text.startswith("[predict_wsi]\n") and "min_tissue = 0.25\n" in text and "geojson = true\n" in text
    assert "batch_size = 8\n" in text  # not in the table: the CPU's default
    (tmp_path / "printed.toml").write_text(text)
    assert printed(capsys, monkeypatch, *wsi, "--config", tmp_path / "printed.toml") == text

    mine.write_text("[predict]\nlevel = 1\n")
    code, _, err = run_cli(capsys, monkeypatch, *base, "--config", mine)
    assert code == 1 and err.count("error:") == 1 and "[predict] has no key 'level'" in err
