import json

import numpy as np
import pytest

from helpers import run_cli, write_palette_mask, write_rgb
from wsss.data.check import check_dataset
from wsss.data.layout import list_masked, list_train, pseudo_mask_path, scan_train
from wsss.data.specs import BCSS, LUAD
from wsss.errors import WsssError


def test_luad_readers(luad_root):
    train = list_train(luad_root, 4)
    assert [s.label for s in train] == [(1, 0, 0, 1), (0, 1, 1, 0), (0, 0, 1, 0)]
    val = list_masked(luad_root, "val")
    assert [(s.image.name, s.mask.parent.name) for s in val] == [("val-0.png", "mask"), ("val-1.png", "mask")]


def test_bcss_readers_accept_valid_folder(bcss_root):
    train = list_train(bcss_root, 4)
    assert [s.label for s in train] == [(1, 1, 0, 1), (0, 1, 0, 0)]
    assert len(list_masked(bcss_root, "val")) == 2  # found under valid/
    assert len(list_masked(bcss_root, "test")) == 2


def test_pseudo_mask_path_keeps_name(tmp_path):
    img = tmp_path / "train" / "1031280-2300-27920-[1 0 0 1].png"
    assert pseudo_mask_path(tmp_path / "train_PM", "b4_5", img) == (
        tmp_path / "train_PM" / "PM_b4_5" / "1031280-2300-27920-[1 0 0 1].png"
    )


def test_missing_root_and_split(tmp_path):
    with pytest.raises(WsssError, match="dataset folder not found"):
        list_train(tmp_path / "nope", 4)
    (tmp_path / "empty").mkdir()
    with pytest.raises(WsssError, match="missing training folder"):
        list_train(tmp_path / "empty", 4)
    with pytest.raises(WsssError, match="missing test folder"):
        list_masked(tmp_path / "empty", "test")


def test_list_train_raises_on_unlabelled_name(luad_root):
    write_rgb(luad_root / "train" / "no-label.png")
    with pytest.raises(WsssError, match="no-label.png"):
        list_train(luad_root, 4)
    assert len(scan_train(luad_root, 4).samples) == 3


def test_check_clean_dataset(luad_root):
    report = check_dataset(luad_root, LUAD, progress=False)
    assert report.ok, report.problems
    train, val, test = report.splits
    assert (train.count, val.count, test.count) == (3, 2, 2)
    assert train.label_counts == [1, 1, 2, 1]
    # masks hold values arange % 5 over 16x16 = 256 px: 52 zeros, then 51 each
    assert val.pixel_counts == [104, 102, 102, 102, 102]


def test_check_finds_every_kind_of_problem(luad_root):
    write_rgb(luad_root / "train" / "unlabelled.png")
    (luad_root / "train" / "x-[1 0 0 0].png").write_bytes(b"garbage")
    write_rgb(luad_root / "val" / "img" / "lonely.png")
    write_rgb(luad_root / "test" / "img" / "test-0.png", size=20)  # image 20 px, mask 16 px
    write_palette_mask(luad_root / "test" / "mask" / "test-1.png", np.full((16, 16), 7))
    report = check_dataset(luad_root, LUAD, progress=False)
    text = "\n".join(report.problems)
    assert "carries no label" in text and "unlabelled.png" in text
    assert "cannot read image" in text and "x-[1 0 0 0].png" in text
    assert "image without mask" in text and "lonely.png" in text
    assert "size mismatch" in text and "test-0.png" in text
    assert "holds value 7, neither a class (0-3) nor the background (4)" in text
    assert len(report.problems) == 5


def test_check_empty_split(tmp_path):
    root = tmp_path / "d"
    for sub in ("train", "val/img", "val/mask", "test/img", "test/mask"):
        (root / sub).mkdir(parents=True)
    report = check_dataset(root, BCSS, progress=False)
    assert any("no images in" in p for p in report.problems)
    assert len(report.problems) == 3


def test_check_data_cli(luad_root, tmp_path, capsys, monkeypatch):
    code, out, _ = run_cli(capsys, monkeypatch, "check-data", luad_root, "--dataset", "luad",
                           "--json", tmp_path / "r.json")
    assert code == 0 and "no problems found" in out and "train: 3 patches" in out
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["ok"] and data["splits"]["train"]["label_counts"] == {"TE": 1, "NEC": 1, "LYM": 2, "TAS": 1}
    write_rgb(luad_root / "train" / "unlabelled.png")
    code, out, _ = run_cli(capsys, monkeypatch, "check-data", luad_root, "--dataset", "luad")
    assert code == 1 and "1 problem(s)" in out


def test_cli_errors_are_one_line(tmp_path, capsys, monkeypatch):
    code, out, err = run_cli(capsys, monkeypatch, "check-data", tmp_path / "missing", "--dataset", "luad")
    assert code == 1
    assert err.strip().count("\n") == 0 and err.startswith("error: dataset folder not found")
    code, _, err = run_cli(capsys, monkeypatch, "check-data", tmp_path, "--dataset", "voc")
    assert code == 1 and "unknown dataset 'voc'" in err and "Traceback" not in err
