import json
import math

import numpy as np
import pytest

from wsss.metrics import ConfusionMeter, confusion_matrix, format_table, scores, scores_to_json


def test_confusion_matrix_counts_and_ignores_background():
    gt = np.array([[0, 0, 1], [1, 4, 2]])
    pred = np.array([[0, 1, 1], [1, 3, 2]])
    cm = confusion_matrix(pred, gt, num_classes=4, ignore_index=4)
    expected = np.zeros((4, 4), int)
    expected[0, 0] = 1
    expected[0, 1] = 1
    expected[1, 1] = 2
    expected[2, 2] = 1
    # the pixel with gt 4 (predicted 3) is not counted
    assert np.array_equal(cm, expected)


def test_scores_hand_computed():
    # 3 classes. rows = gt, cols = pred
    cm = np.array([[3, 1, 0], [2, 4, 0], [0, 0, 0]])
    s = scores(cm)
    # class 0: tp 3, fp 2, fn 1 -> IoU 3/6, Dice 6/9
    # class 1: tp 4, fp 1, fn 2 -> IoU 4/7, Dice 8/11
    # class 2: absent from gt and prediction -> NaN
    assert s["iou"][0] == pytest.approx(0.5)
    assert s["iou"][1] == pytest.approx(4 / 7)
    assert math.isnan(s["iou"][2]) and math.isnan(s["dice"][2])
    assert s["dice"][0] == pytest.approx(6 / 9)
    assert s["dice"][1] == pytest.approx(8 / 11)
    assert s["mIoU"] == pytest.approx((0.5 + 4 / 7) / 2)
    assert s["pixel_acc"] == pytest.approx(7 / 10)
    assert s["mean_class_acc"] == pytest.approx((3 / 4 + 4 / 6) / 2)
    # fwIoU: frequencies 4/10 and 6/10
    assert s["fwIoU"] == pytest.approx(0.4 * 0.5 + 0.6 * 4 / 7)


def test_class_predicted_but_absent_from_gt_counts_as_zero_iou():
    cm = np.array([[2, 1], [0, 0]])  # class 1 predicted once, never in gt
    s = scores(cm)
    assert s["iou"][1] == 0.0
    assert s["mIoU"] == pytest.approx((2 / 3 + 0) / 2)
    assert s["mean_class_acc"] == pytest.approx(2 / 3)  # recall of class 1 undefined
    assert s["fwIoU"] == pytest.approx(2 / 3)


def test_empty_matrix_gives_nan_everywhere():
    s = scores(np.zeros((2, 2), int))
    assert all(math.isnan(s[k]) for k in ("mIoU", "fwIoU", "pixel_acc", "mean_class_acc"))


def test_json_keys_and_nan_as_null():
    cm = np.array([[3, 1, 0], [2, 4, 0], [0, 0, 0]])
    out = scores_to_json(cm, ["A", "B", "C"])
    assert set(out) >= {"mIoU", "fwIoU", "pixel_acc", "mean_class_acc", "per_class"}
    assert out["per_class"]["C"] == {"iou": None, "dice": None}
    assert out["per_class"]["A"]["iou"] == pytest.approx(0.5)
    json.loads(json.dumps(out, allow_nan=False))  # valid strict JSON
    table = format_table(out, "test")
    assert "mIoU 0.5357" in table and "C" in table


def test_meters_merge_like_one_big_batch():
    rng = np.random.default_rng(0)
    gt = rng.integers(0, 5, (4, 8, 8))
    pred = rng.integers(0, 4, (4, 8, 8))
    whole = ConfusionMeter(4, 4)
    whole.update(pred, gt)
    a, b = ConfusionMeter(4, 4), ConfusionMeter(4, 4)
    a.update(pred[:2], gt[:2])
    b.update(pred[2:], gt[2:])
    a.merge(b)
    assert np.array_equal(a.cm, whole.cm)
    a.all_reduce()  # no process group: unchanged
    assert np.array_equal(a.cm, whole.cm)


def test_bad_values_raise():
    with pytest.raises(ValueError):
        confusion_matrix(np.array([0]), np.array([7]), 4, 4)
    with pytest.raises(ValueError):
        confusion_matrix(np.array([4]), np.array([0]), 4, 4)
