"""Dataset specs: the shipped luad/bcss specs, spec files, every bad spec as one error line, specs of
1, 2, 3, 5 and 16 classes through palette IO, metrics, the loss ignore value, the gate and GeoJSON,
and specs recorded in checkpoints."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import run_cli
from wsss.data.png import read_class_mask, write_class_mask, write_mask
from wsss.data.specs import BCSS, LUAD, DatasetSpec, get_spec, recorded_spec, resolve_with_checkpoint, spec_difference
from wsss.errors import WsssError
from wsss.gate import gate_logits
from wsss.losses import build_multi_mask_loss, get_loss
from wsss.metrics import ConfusionMeter, confusion_matrix
from wsss.wsi.geojson import class_features

CONTRACT = """
name = "wsss4luad"
classes = ["tumor", "stroma", "normal"]          # label order, 1 to at least 16 classes
colors = [[205, 51, 51], [255, 165, 0], [0, 255, 0]]
white_is_background = true                       # the luad rule; false = the bcss rule
background_index = 3                             # optional; default = number of classes
background_color = [255, 255, 255]               # optional; default white
"""

CLASS_COUNTS = (1, 2, 3, 5, 16)


def make_spec(n: int, background: int | None = None, **kw) -> DatasetSpec:
    """A spec of ``n`` classes named c0..c{n-1} with distinct colours (i, 2i, 3i)·8 + 1."""
    colours = [((8 * i + 1) % 256, (16 * i + 1) % 256, (24 * i + 1) % 256) for i in range(n)]
    return DatasetSpec(f"s{n}", tuple(f"c{i}" for i in range(n)), tuple(colours), True, background, **kw)


def write_spec(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# --------------------------------------------------------------------------- shipped and file specs


def test_shipped_specs_are_the_published_datasets():
    # DESIGN.md, "Datasets and formats"
    assert LUAD.classes == ("TE", "NEC", "LYM", "TAS") and BCSS.classes == ("TUM", "STR", "LYM", "NEC")
    assert LUAD.colors == ((205, 51, 51), (0, 255, 0), (65, 105, 225), (255, 165, 0))
    assert BCSS.colors == ((255, 0, 0), (0, 255, 0), (0, 0, 255), (153, 0, 255))
    assert LUAD.white_is_background and not BCSS.white_is_background
    for spec in (LUAD, BCSS):
        assert spec.background_index == 4 and spec.background_color == (255, 255, 255)
        assert spec.mask_encoding == "index" and spec.labels_csv is None
    # the PNG palette as before specs existed: classes, white at 4, black after
    assert LUAD.flat_palette() == [205, 51, 51, 0, 255, 0, 65, 105, 225, 255, 165, 0, 255, 255, 255] + [0] * 753
    assert get_spec("LUAD") == LUAD and get_spec("bcss") == BCSS


def test_contract_spec_file(tmp_path):
    spec = get_spec(write_spec(tmp_path / "w.toml", CONTRACT))
    assert spec.name == "wsss4luad" and spec.classes == ("tumor", "stroma", "normal") and spec.num_classes == 3
    assert spec.colors == ((205, 51, 51), (255, 165, 0), (0, 255, 0))
    assert spec.white_is_background and spec.background_index == 3 and spec.background_color == (255, 255, 255)
    # the optional keys default to the number of classes and white
    short = CONTRACT.replace("background_index = 3", "").replace("background_color = [255, 255, 255]", "")
    assert get_spec(write_spec(tmp_path / "s.toml", short)).background_index == 3
    assert get_spec(write_spec(tmp_path / "s.toml", short)).background_color == (255, 255, 255)


def test_example_specs_in_the_repository_load():
    examples = Path(__file__).resolve().parents[2] / "datasets"
    assert get_spec(examples / "wsss4luad.toml").classes == ("tumor", "stroma", "normal")
    assert get_spec(examples / "crc6.toml").num_classes == 6


BAD_SPECS = [
    ('classes = ["a", "b", "a"]', "duplicate class name 'a'"),
    ('colors = [[1, 2, 3], [4, 5, 6]]', "2 colors for 3 classes"),
    ("background_index = 1", "background_index 1 collides with class 1 (stroma)"),
    ('flavour = "vanilla"', "unknown key flavour"),
    ('colors = [[1, 2, 3], [4, 5, 6], [7, 8, 300]]', "a colour is three integers 0-255"),
    ("background_index = 256", "background_index must be an integer 0-255"),
    ('classes = []\ncolors = []', "classes is empty"),
    ('classes = ["a", "background", "c"]', "'background' cannot be a class name"),
    ('name = "my data"', "name must be letters, digits"),
    ('mask_encoding = "jpeg"', "mask_encoding must be 'index' or 'rgb'"),
    ('mask_encoding = "rgb"\nbackground_color = [0, 255, 0]', "distinct colours, but class normal and the background"),
    ('white_is_background = "yes"', "white_is_background must be true or false"),
    ("classes = [1, 2, 3]", "class names must be non-empty strings"),
    ('classes = ["a,b", "c", "d"]', "holds a comma"),
]


def _with(line: str) -> str:
    """The contract spec with the keys of ``line`` replaced (or added)."""
    keys = {part.split("=")[0].strip() for part in line.splitlines()}
    kept = [row for row in CONTRACT.strip().splitlines() if row.split("=")[0].strip() not in keys]
    return "\n".join(kept + line.splitlines()) + "\n"


@pytest.mark.parametrize("line, fragment", BAD_SPECS)
def test_every_bad_spec_is_one_error_line(tmp_path, capsys, monkeypatch, line, fragment):
    path = write_spec(tmp_path / "bad.toml", _with(line))
    with pytest.raises(WsssError, match="bad.toml") as err:
        get_spec(path)
    assert fragment in str(err.value)
    (tmp_path / "data").mkdir()
    code, out, err_text = run_cli(capsys, monkeypatch, "check-data", tmp_path / "data", "--dataset", path)
    assert code == 1 and out == "" and err_text.startswith("error: dataset spec") and fragment in err_text
    assert len(err_text.strip().splitlines()) == 1


@pytest.mark.parametrize("text, fragment", [
    ('name = "x"\nclasses = ["a"]\n', "missing keys colors, white_is_background"),
    ('name = "x"\nclasses = ["a"\n', "is not valid TOML"),
])
def test_missing_keys_and_bad_toml(tmp_path, text, fragment):
    with pytest.raises(WsssError, match=fragment):
        get_spec(write_spec(tmp_path / "x.toml", text))


def test_unknown_dataset_and_missing_file(tmp_path):
    with pytest.raises(WsssError, match="unknown dataset 'kidney': use luad, bcss or the path of a TOML spec file"):
        get_spec("kidney")
    with pytest.raises(WsssError, match="dataset spec file not found"):
        get_spec(tmp_path / "nope.toml")


# --------------------------------------------------------------------------- 1, 2, 3, 5 and 16 classes


@pytest.mark.parametrize("n", CLASS_COUNTS)
def test_palette_png_round_trip(tmp_path, n):
    spec = make_spec(n)
    mask = (np.arange(12 * 12).reshape(12, 12) % (n + 1)).astype(np.uint8)  # every class and the background n
    write_mask(tmp_path / "m.png", mask, spec.flat_palette())
    with Image.open(tmp_path / "m.png") as img:
        pal = img.getpalette()
    entries = [tuple(pal[3 * i : 3 * i + 3]) for i in range(n + 1)]
    assert entries == [*spec.colors, (255, 255, 255)]
    assert np.array_equal(read_class_mask(tmp_path / "m.png", spec), mask)
    # RGB encoding: colours back to classes
    rgb = make_spec(n, mask_encoding="rgb")
    write_class_mask(tmp_path / "rgb.png", mask, rgb)
    with Image.open(tmp_path / "rgb.png") as img:
        assert img.mode == "RGB"
    assert np.array_equal(read_class_mask(tmp_path / "rgb.png", rgb), mask)


def test_background_index_away_from_the_classes(tmp_path):
    spec = make_spec(3, background=255, background_color=(10, 20, 30))
    flat = spec.flat_palette()
    assert flat[9:12] == [0, 0, 0] and flat[3 * 255 :] == [10, 20, 30]
    mask = np.array([[0, 1, 2, 255]], dtype=np.uint8)
    write_mask(tmp_path / "m.png", mask, flat)
    assert np.array_equal(read_class_mask(tmp_path / "m.png", spec), mask)
    write_mask(tmp_path / "bad.png", np.array([[0, 3]], dtype=np.uint8), flat)
    with pytest.raises(WsssError, match=r"bad.png holds value 3, neither a class \(0-2\) nor the background \(255\)"):
        read_class_mask(tmp_path / "bad.png", spec)


def test_unknown_rgb_colour_is_named(tmp_path):
    spec = make_spec(2, mask_encoding="rgb")
    Image.fromarray(np.array([[[1, 1, 1], [7, 7, 7]]], dtype=np.uint8)).save(tmp_path / "m.png")
    with pytest.raises(WsssError, match=r"m.png holds colour \[7, 7, 7\], neither a class colour nor the background"):
        read_class_mask(tmp_path / "m.png", spec)


def _cm_by_definition(pred: np.ndarray, gt: np.ndarray, n: int, ignore: int) -> np.ndarray:
    cm = np.zeros((n, n), np.int64)
    for p, g in zip(pred.ravel(), gt.ravel()):
        if g != ignore:
            cm[g, p] += 1
    return cm


@pytest.mark.parametrize("n", CLASS_COUNTS)
def test_metrics_count_every_class_and_ignore_only_the_background(n):
    spec = make_spec(n)
    rng = np.random.default_rng(n)
    gt = rng.integers(0, n + 1, (3, 9, 9))  # n is the background
    pred = rng.integers(0, n, (3, 9, 9))
    meter = ConfusionMeter(spec.num_classes, spec.background_index)
    meter.update(pred, gt)
    assert np.array_equal(meter.cm, _cm_by_definition(pred, gt, n, n))
    assert meter.cm.sum() == (gt != n).sum()
    names = list(meter.to_json(spec.classes)["per_class"])
    assert names == list(spec.classes)


def test_a_fifth_class_is_counted_not_ignored():
    five = make_spec(5)  # background 5
    gt = np.array([[4, 4, 5, 0]])
    pred = np.array([[4, 0, 1, 0]])
    cm = confusion_matrix(pred, gt, 5, five.background_index)
    assert cm[4, 4] == 1 and cm[4, 0] == 1 and cm.sum() == 3  # class 4 counted; 5 ignored
    assert ConfusionMeter(5, 5).to_json(five.classes)["per_class"]["c4"] == {"iou": None, "dice": None}
    with pytest.raises(ValueError, match="ignore value 4 is one of the 5 classes"):
        ConfusionMeter(5, 4)


@pytest.mark.parametrize("n", CLASS_COUNTS)
def test_loss_ignores_the_spec_background_and_nothing_else(n):
    spec = make_spec(n)
    target = torch.tensor([[[n - 1, spec.background_index]]])  # the last class, then the background
    logits = torch.zeros(1, n, 1, 2, requires_grad=True)
    for name in ("ce", "focal", "dice", "lovasz"):
        loss = get_loss(name, spec.background_index)(logits, target)
        (grad,) = torch.autograd.grad(loss, logits)
        assert torch.all(grad[..., 1] == 0), name  # the background pixel trains nothing
        if n > 1:
            assert grad[..., 0].abs().sum() > 0, name  # the last class is a real class
    # cross-entropy by hand: one evaluated pixel, uniform logits → log n
    ce = build_multi_mask_loss("ce", "mean", (1.0,), spec.background_index)(logits, target[:, None])
    assert ce.item() == pytest.approx(math.log(n))
    # the reference's appended background logit: the background pixel is the extra class (≈ 0 loss),
    # the class pixel has n + 1 logits of which the extra one is 0 → log(n + 1), over 2 pixels, / batch 1
    ref = build_multi_mask_loss("ce", "reference", (1.0,), spec.background_index)(logits, target[:, None])
    assert ref.item() == pytest.approx(math.log(n + 1) / 2, rel=1e-5)


@pytest.mark.parametrize("n", CLASS_COUNTS)
def test_gate_removes_the_rejected_classes_of_any_spec(n):
    logits = torch.arange(n, dtype=torch.float32).view(1, n, 1, 1).repeat(1, 1, 2, 2)  # the last class wins
    probs = torch.full((1, n), 0.9)
    probs[0, n - 1] = 0.05  # rejected
    gated = gate_logits(logits, probs, 0.1).argmax(dim=1)
    assert torch.all(gated == (n - 2 if n > 1 else 0))  # n = 1: every class rejected → the best stays
    ref = gate_logits(logits, probs, 0.1, "reference")
    assert torch.all(ref[:, n - 1] == 0)


@pytest.mark.parametrize("n", CLASS_COUNTS)
def test_geojson_names_and_colours_come_from_the_spec(n):
    spec = make_spec(n)
    labels = np.full((4, 4 * n), spec.background_index, np.uint8)
    for c in range(n):
        labels[1:3, 4 * c : 4 * c + 2] = c  # one 2x2 block per class, background around it
    features = class_features(labels, spec, lambda xy: xy)
    assert [f["properties"]["classification"]["name"] for f in features] == list(spec.classes)
    assert [f["properties"]["classification"]["color"] for f in features] == [list(c) for c in spec.colors]
    assert features[-1]["geometry"]["coordinates"][0][0] == [4 * (n - 1), 1]


# --------------------------------------------------------------------------- specs in checkpoints


def test_spec_survives_a_weights_only_checkpoint(tmp_path):
    spec = make_spec(5, background=200, mask_encoding="rgb", labels_csv="train/labels.csv")
    torch.save({"stage": 1, "spec": spec.to_dict()}, tmp_path / "c.pth")
    ckpt = torch.load(tmp_path / "c.pth", weights_only=True)
    assert recorded_spec(ckpt, "c.pth") == spec


def test_old_checkpoints_map_to_the_shipped_spec_and_published_ones_need_dataset():
    assert recorded_spec({"stage": 2, "dataset": "luad", "class_names": ["TE", "NEC", "LYM", "TAS"]}, "x") == LUAD
    assert recorded_spec({"stage": 2, "dataset": "bcss"}, "x") == BCSS
    assert recorded_spec({"model.weight": 1}, "x") is None
    with pytest.raises(WsssError, match="does not record its dataset; pass --dataset"):
        resolve_with_checkpoint(None, None, "pub.pth")
    assert resolve_with_checkpoint("bcss", None, "pub.pth") == BCSS


def test_a_different_spec_with_a_checkpoint_is_refused_naming_the_difference():
    three = make_spec(3)
    other = DatasetSpec("s3", ("c0", "c1", "cX"), three.colors, True)
    assert spec_difference(three, other) == "classes [c0, c1, c2] vs [c0, c1, cX]"
    with pytest.raises(WsssError) as err:
        resolve_with_checkpoint(other, three, "m.pth")
    assert str(err.value) == ("m.pth was trained on dataset spec 's3', not the 's3' given "
                              "(checkpoint vs given: classes [c0, c1, c2] vs [c0, c1, cX])")
    # how a copy of the data is stored is not part of what a model learned
    stored_otherwise = make_spec(3, mask_encoding="rgb", labels_csv="l.csv")
    assert spec_difference(three, stored_otherwise) == ""
    assert resolve_with_checkpoint(None, three, "m.pth") == three
