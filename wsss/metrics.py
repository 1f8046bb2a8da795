"""Segmentation metrics from a confusion matrix over the tissue classes.

Rows are ground truth, columns are predictions. Pixels whose ground truth is the background index
(the dataset spec's; 4 for luad and bcss) are not evaluated. A class absent from both ground truth
and prediction has no IoU/Dice (NaN) and is skipped in every mean.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch


def confusion_matrix(
    pred: np.ndarray | torch.Tensor,
    gt: np.ndarray | torch.Tensor,
    num_classes: int,
    ignore_index: int,
) -> np.ndarray:
    """``(C, C)`` int64 counts of (ground truth, prediction) pairs; ``gt == ignore_index`` skipped.

    ``pred`` and ``gt`` are integer arrays of the same shape, e.g. ``(B, H, W)``. Ground-truth
    values other than ``0..C-1`` and ``ignore_index`` are an error, as are predictions outside
    ``0..C-1`` on evaluated pixels.
    """
    _check_ignore(num_classes, ignore_index)
    pred = torch.as_tensor(pred).reshape(-1).long()
    gt = torch.as_tensor(gt).reshape(-1).long()
    if pred.shape != gt.shape:
        raise ValueError(f"prediction has {pred.numel()} pixels, ground truth {gt.numel()}")
    keep = gt != ignore_index
    pred, gt = pred[keep], gt[keep]
    if gt.numel() and (gt.min() < 0 or gt.max() >= num_classes):
        raise ValueError(f"ground truth holds values outside 0..{num_classes - 1} and {ignore_index}")
    if pred.numel() and (pred.min() < 0 or pred.max() >= num_classes):
        raise ValueError(f"prediction holds values outside 0..{num_classes - 1}")
    counts = torch.bincount(gt * num_classes + pred, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).cpu().numpy().astype(np.int64)


def _check_ignore(num_classes: int, ignore_index: int) -> None:
    """The ignored (background) value must not be a class: that class would silently vanish."""
    if 0 <= ignore_index < num_classes:
        raise ValueError(f"ignore value {ignore_index} is one of the {num_classes} classes")


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """``num / den`` with NaN where ``den == 0``."""
    num = num.astype(np.float64)
    den = den.astype(np.float64)
    out = np.full_like(num, np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out


def _nanmean(values: np.ndarray) -> float:
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if finite.size else math.nan


def scores(cm: np.ndarray) -> dict[str, np.ndarray | float]:
    """All scores of a ``(C, C)`` confusion matrix.

    Returns ``iou`` and ``dice`` (per class, NaN when the class is in neither ground truth nor
    prediction), ``class_acc`` (per class recall, NaN when absent from ground truth), ``mIoU``,
    ``fwIoU`` (IoU weighted by ground-truth frequency), ``pixel_acc`` and ``mean_class_acc``.
    """
    cm = np.asarray(cm, dtype=np.int64)
    tp = np.diag(cm)
    gt_total = cm.sum(axis=1)
    pred_total = cm.sum(axis=0)
    union = gt_total + pred_total - tp
    iou = _ratio(tp, union)
    dice = _ratio(2 * tp, gt_total + pred_total)
    class_acc = _ratio(tp, gt_total)
    total = cm.sum()
    freq = gt_total / total if total else np.zeros(len(tp))
    present = freq > 0
    return {
        "iou": iou,
        "dice": dice,
        "class_acc": class_acc,
        "mIoU": _nanmean(iou),
        "fwIoU": float((freq[present] * iou[present]).sum()) if total else math.nan,
        "pixel_acc": float(tp.sum() / total) if total else math.nan,
        "mean_class_acc": _nanmean(class_acc),
    }


def _json_float(value: float) -> float | None:
    return None if math.isnan(value) else round(float(value), 6)


def scores_to_json(cm: np.ndarray, class_names: Sequence[str]) -> dict:
    """The metrics as a JSON-ready dict (NaN becomes ``null``).

    Keys: ``mIoU``, ``fwIoU``, ``pixel_acc``, ``mean_class_acc``, ``per_class``
    (``{name: {"iou", "dice"}}``), ``confusion_matrix`` and ``pixels``.
    """
    s = scores(cm)
    if len(class_names) != len(s["iou"]):
        raise ValueError(f"{len(class_names)} class names for a {len(s['iou'])}-class matrix")
    return {
        "mIoU": _json_float(s["mIoU"]),
        "fwIoU": _json_float(s["fwIoU"]),
        "pixel_acc": _json_float(s["pixel_acc"]),
        "mean_class_acc": _json_float(s["mean_class_acc"]),
        "per_class": {
            name: {"iou": _json_float(i), "dice": _json_float(d)}
            for name, i, d in zip(class_names, s["iou"], s["dice"])
        },
        "confusion_matrix": np.asarray(cm).tolist(),
        "pixels": int(np.asarray(cm).sum()),
    }


def _fmt(value: float | None) -> str:
    return "   -  " if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:6.4f}"


def format_table(metrics: dict, title: str = "") -> str:
    """A plain-text table of :func:`scores_to_json` output."""
    lines = [title] if title else []
    lines.append(f"{'class':<10} {'IoU':>6} {'Dice':>6}")
    for name, row in metrics["per_class"].items():
        lines.append(f"{name:<10} {_fmt(row['iou'])} {_fmt(row['dice'])}")
    lines.append(
        f"mIoU {_fmt(metrics['mIoU'])}  fwIoU {_fmt(metrics['fwIoU'])}  "
        f"pixel acc {_fmt(metrics['pixel_acc'])}  mean class acc {_fmt(metrics['mean_class_acc'])}"
    )
    return "\n".join(lines)


class ConfusionMeter:
    """Accumulates a confusion matrix over batches, and across processes under DDP."""

    def __init__(self, num_classes: int, ignore_index: int) -> None:
        _check_ignore(num_classes, ignore_index)
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.cm = np.zeros((num_classes, num_classes), dtype=np.int64)

    def update(self, pred: np.ndarray | torch.Tensor, gt: np.ndarray | torch.Tensor) -> None:
        self.cm += confusion_matrix(pred, gt, self.num_classes, self.ignore_index)

    def merge(self, other: "ConfusionMeter") -> None:
        self.cm += other.cm

    def all_reduce(self) -> None:
        """Sum the matrices of all processes (no-op outside ``torch.distributed``)."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            t = torch.from_numpy(self.cm.copy())
            if dist.get_backend() == "nccl":
                t = t.cuda()
            dist.all_reduce(t)
            self.cm = t.cpu().numpy()

    def to_json(self, class_names: Sequence[str]) -> dict:
        return scores_to_json(self.cm, class_names)


def write_json(path: str | Path, data: dict) -> None:
    """Write ``data`` as indented JSON, atomically."""
    from wsss.runtime import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")
