"""Patch-level labels: the three file-name styles for any class count, and label CSVs."""

import pytest

from helpers import build_layout, run_cli
from wsss.data.check import check_dataset
from wsss.data.labels import format_label, parse_label, parse_label_csv
from wsss.data.layout import list_train, scan_train
from wsss.data.specs import DatasetSpec
from wsss.errors import WsssError


@pytest.mark.parametrize(
    "name, expected",
    [
        ("1031280-2300-27920-[1 0 0 1].png", (1, 0, 0, 1)),
        ("TCGA-A1-A0SK-DX1_xmin45749_ymin25055_MPP-0.2500+0[1101].png", (1, 1, 0, 1)),
        ("a/b/c/x-[0 1 1 0].png", (0, 1, 1, 0)),
        # spaced style in a BCSS-like name and packed style in a LUAD-like name both parse
        ("TCGA-XX_MPP-0.2500+1[0 0 1 0].png", (0, 0, 1, 0)),
        ("1031280-2300-27920-[0001].png", (0, 0, 0, 1)),
        # only the last bracket group counts
        ("slide[2]-[1 1 1 1].png", (1, 1, 1, 1)),
    ],
)
def test_parse_both_styles(name, expected):
    assert parse_label(name, 4) == expected


@pytest.mark.parametrize(
    "name, fragment",
    [
        ("1031280-2300-27920.png", "carries no label"),
        ("x-[1 2 0 1].png", "carries no label"),
        ("x-[1 0 1].png", "has 3 digits, expected 4"),
        ("x-[0 0 0 0].png", "names no class"),
    ],
)
def test_bad_names_raise_with_file_name(name, fragment):
    with pytest.raises(WsssError) as err:
        parse_label(f"/data/train/{name}", 4)
    assert fragment in str(err.value)
    assert name in str(err.value)


def test_format_round_trip():
    assert format_label((1, 0, 0, 1)) == "[1 0 0 1]"
    assert format_label([1, 1, 0, 1], spaced=False) == "[1101]"
    assert parse_label(f"p-{format_label((0, 1, 0, 1))}.png", 4) == (0, 1, 0, 1)


# --------------------------------------------------------------------------- any class count, CSV labels


@pytest.mark.parametrize("label", [(1,), (0, 1), (1, 0, 1), (1, 0, 0, 1, 1), tuple(int(i % 3 == 0) for i in range(16))])
@pytest.mark.parametrize("style", ["spaced", "packed", "commas", "commas-tight"])
def test_three_styles_for_any_class_count(label, style):
    digits = [str(d) for d in label]
    inside = {"spaced": " ".join(digits), "packed": "".join(digits), "commas": ", ".join(digits),
              "commas-tight": ",".join(digits)}[style]
    assert parse_label(f"436219-7159-48057-[{inside}].png", len(label)) == label


def test_wsss4luad_name_and_width_errors():
    assert parse_label("436219-7159-48057-[1, 0, 0].png", 3) == (1, 0, 0)
    with pytest.raises(WsssError, match=r"label in 436219-7159-48057-\[1, 0, 0\].png has 3 digits, expected 4"):
        parse_label("436219-7159-48057-[1, 0, 0].png", 4)
    with pytest.raises(WsssError, match="has 16 digits, expected 5"):
        parse_label("p-[" + "1" * 16 + "].png", 5)


CLASSES = ("tumor", "stroma", "normal")


def test_csv_maps_columns_by_class_name():
    text = "file,normal,tumor,stroma\na.png,1,0,0\nsub/b.png,0,1,1\n"
    assert parse_label_csv(text, CLASSES, "l.csv") == {"a.png": (0, 0, 1), "b.png": (1, 1, 0)}


@pytest.mark.parametrize("text, fragment", [
    ("file,tumor,stroma\na.png,1,0\n", "class columns do not match the spec (missing normal)"),
    ("file,tumor,stroma,normal,fat\na.png,1,0,0,0\n", "(unknown fat)"),
    ("file,tumor,stroma,normal,normal\na.png,1,0,0,0\n", "(repeated normal)"),
    ("file,tumor,stroma,normal\na.png,1,2,0\n", "line 2: label values are 0 or 1, not '2'"),
    ("file,tumor,stroma,normal\na.png,1,0,0\na.png,0,1,0\n", "line 3: a.png is listed twice"),
    ("file,tumor,stroma,normal\na.png,0,0,0\n", "label in a.png (label CSV l.csv, line 2) names no class"),
    ("file,tumor,stroma,normal\na.png,1,0\n", "line 2: 3 columns, the header has 4"),
    ("", "label CSV l.csv is empty"),
])
def test_bad_csv_is_one_clear_error(text, fragment):
    with pytest.raises(WsssError) as err:
        parse_label_csv(text, CLASSES, "l.csv")
    assert fragment in str(err.value) and "\n" not in str(err.value)


def _csv_dataset(tmp_path, rows: str):
    spec = DatasetSpec("w3", CLASSES, ((1, 1, 1), (2, 2, 2), (3, 3, 3)), True, labels_csv="train/labels.csv")
    root = build_layout(tmp_path / "ds", ["a.png", "b.png", "c.png"], spec)
    (root / "train" / "labels.csv").write_text("file,tumor,stroma,normal\n" + rows)
    return root, spec


def test_csv_labels_and_names_of_missing_or_unlabelled_files(tmp_path, capsys, monkeypatch):
    root, spec = _csv_dataset(tmp_path, "a.png,1,0,0\nb.png,0,1,1\nc.png,0,0,1\n")
    assert [(s.path.name, s.label) for s in list_train(root, spec)] == [
        ("a.png", (1, 0, 0)), ("b.png", (0, 1, 1)), ("c.png", (0, 0, 1))]
    # the CSV is the one source: a label in a name is not read
    (root / "train" / "d-[1 1 1].png").write_bytes((root / "train" / "a.png").read_bytes())
    (root / "train" / "labels.csv").write_text("file,tumor,stroma,normal\na.png,1,0,0\nb.png,0,1,1\n"
                                               "c.png,0,0,1\ngone.png,1,0,0\n")
    problems = scan_train(root, spec).problems
    assert problems == [f"no label for d-[1 1 1].png: it is not listed in {root / 'train' / 'labels.csv'}",
                        f"gone.png is listed in {root / 'train' / 'labels.csv'} but missing from {root / 'train'}"]
    with pytest.raises(WsssError, match=r"no label for d-\[1 1 1\].png.*\(and 1 more problems\)"):
        list_train(root, spec)
    report = check_dataset(root, spec, progress=False)
    assert not report.ok and any("gone.png is listed" in p for p in report.problems)


def test_labels_csv_option_replaces_file_name_labels(tmp_path, capsys, monkeypatch):
    root = build_layout(tmp_path / "ds", ["a-[1 0 0].png", "b-[0 1 0].png"], DatasetSpec(
        "w3", CLASSES, ((1, 1, 1), (2, 2, 2), (3, 3, 3)), True))
    spec_file = tmp_path / "w3.toml"
    spec_file.write_text('name = "w3"\nclasses = ["tumor", "stroma", "normal"]\n'
                         'colors = [[1, 1, 1], [2, 2, 2], [3, 3, 3]]\nwhite_is_background = true\n')
    code, out, err = run_cli(capsys, monkeypatch, "check-data", root, "--dataset", spec_file)
    assert code == 0, out + err
    assert "labels: tumor 1 (50.0%)  stroma 1 (50.0%)  normal 0 (0.0%)" in out
    (tmp_path / "l.csv").write_text("file,tumor,stroma,normal\na-[1 0 0].png,0,0,1\nb-[0 1 0].png,0,0,1\n")
    code, out, err = run_cli(capsys, monkeypatch, "check-data", root, "--dataset", spec_file,
                             "--labels-csv", tmp_path / "l.csv")
    assert code == 0, out + err
    assert "labels: tumor 0 (0.0%)  stroma 0 (0.0%)  normal 2 (100.0%)" in out
    (tmp_path / "l.csv").write_text("file,tumor,stroma\na-[1 0 0].png,0,1\n")
    code, out, err = run_cli(capsys, monkeypatch, "check-data", root, "--dataset", spec_file,
                             "--labels-csv", tmp_path / "l.csv")
    assert code == 1 and "class columns do not match the spec (missing normal)" in out
