"""Colour-only baseline on a synthetic (or any LUAD-layout) data set.

Each image is blurred slightly, the mean RGB of every tissue class is taken over the training
pixels (labelled by ``train_gt``), and every test pixel gets the class with the nearest mean.
If this reaches a high mIoU, the synthetic classes are separable by colour alone and the data set
no longer tests texture learning; the generator is tuned to keep it well below 0.5.

    python bench/colour_baseline.py --data DIR        # DIR written by `wsss synth`
    python bench/colour_baseline.py                   # makes 1000 train / 100 test in a temp dir
    python bench/colour_baseline.py --dataset datasets/crc6.toml    # the synthetic data of another spec
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from scipy import ndimage

from wsss.data.png import read_class_mask, read_mask, read_rgb
from wsss.data.specs import DatasetSpec, get_spec

Pair = tuple[np.ndarray, np.ndarray]  # image (H, W, 3) uint8, mask (H, W) uint8


def blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian-blur ``(H, W, 3)`` uint8 per channel; returns ``(H, W, 3)`` float32."""
    return ndimage.gaussian_filter(image.astype(np.float32), sigma=(sigma, sigma, 0))


def class_means(pairs: Iterable[Pair], sigma: float, num_classes: int) -> np.ndarray:
    """Mean blurred RGB per tissue class ``(C, 3)`` over pixels whose mask is ``< C``."""
    sums = np.zeros((num_classes, 3))
    counts = np.zeros(num_classes)
    for image, mask in pairs:
        rgb, m = blur(image, sigma).reshape(-1, 3), mask.ravel()
        keep = m < num_classes
        counts += np.bincount(m[keep], minlength=num_classes)
        for ch in range(3):
            sums[:, ch] += np.bincount(m[keep], rgb[keep, ch], minlength=num_classes)
    return sums / np.maximum(counts, 1)[:, None]


def predict(image: np.ndarray, means: np.ndarray, sigma: float) -> np.ndarray:
    """Nearest-class-mean labels ``(H, W)`` of an image ``(H, W, 3)``; ``means`` is ``(C, 3)``."""
    rgb = blur(image, sigma)
    d2 = ((rgb[:, :, None, :] - means[None, None].astype(np.float32)) ** 2).sum(-1)
    return d2.argmin(-1)


def confusion(gt: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
    """``(C, C)`` confusion matrix (rows: ground truth), pixels with ``gt >= C`` ignored."""
    keep = gt < num_classes
    idx = gt[keep].astype(np.int64) * num_classes + pred[keep]
    return np.bincount(idx, minlength=num_classes**2).reshape(num_classes, num_classes)


def iou_scores(conf: np.ndarray) -> tuple[np.ndarray, float]:
    """Per-class IoU ``TP / (TP + FP + FN)`` (NaN for classes absent from GT and prediction)
    and their mean over the classes present."""
    tp = np.diag(conf).astype(float)
    denom = conf.sum(0) + conf.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(denom > 0, tp / denom, np.nan)
    return iou, float(np.nanmean(iou))


def colour_baseline(
    train: Iterable[Pair], test: Iterable[Pair], sigma: float = 2.0, num_classes: int = 4
) -> dict:
    """Fit class means on ``train`` pairs and score nearest-mean prediction on ``test`` pairs."""
    means = class_means(train, sigma, num_classes)
    conf = np.zeros((num_classes, num_classes), np.int64)
    for image, mask in test:
        conf += confusion(mask, predict(image, means, sigma), num_classes)
    iou, miou = iou_scores(conf)
    return {"miou": miou, "iou": iou.tolist(), "means": means.round(1).tolist()}


def load_pairs(img_dir: Path, mask_dir: Path, spec: DatasetSpec | None = None) -> Iterable[Pair]:
    """Yield ``(image, mask)`` for every PNG in ``img_dir`` with a same-named mask (read as ``spec``
    encodes its masks; None: palette PNGs, as ``train_gt``)."""
    for path in sorted(img_dir.glob("*.png")):
        mask = mask_dir / path.name
        yield read_rgb(path), read_mask(mask) if spec is None else read_class_mask(mask, spec)


def _parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--data", type=Path, help="LUAD-layout root with train/, train_gt/, test/")
    ap.add_argument("--dataset", default="luad", help="luad, bcss or a TOML spec file (default luad)")
    ap.add_argument("--n-train", type=int, default=1000, help="when generating (no --data)")
    ap.add_argument("--n-test", type=int, default=100, help="when generating (no --data)")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--sigma", type=float, default=2.0, help="Gaussian blur before classifying")
    return ap.parse_args()


def _evaluate(root: Path, sigma: float, spec: DatasetSpec) -> dict:
    train = load_pairs(root / "train", root / "train_gt")
    test = load_pairs(root / "test" / "img", root / "test" / "mask", spec)
    return colour_baseline(train, test, sigma, spec.num_classes)


def main() -> None:
    args = _parse()
    start = time.perf_counter()
    spec = get_spec(args.dataset)
    if args.data is not None:
        result = _evaluate(args.data, args.sigma, spec)
    else:
        from wsss.data.synth import generate

        with tempfile.TemporaryDirectory() as tmp:
            generate(Path(tmp), args.n_train, 0, args.n_test, args.size, args.seed, args.workers, spec=spec)
            result = _evaluate(Path(tmp), args.sigma, spec)
    names = spec.classes
    print("class means (RGB):", dict(zip(names, result["means"])))
    print("per-class IoU:", {n: round(v, 3) for n, v in zip(names, result["iou"])})
    seconds = time.perf_counter() - start
    print(f"colour-only baseline test mIoU = {result['miou']:.4f}  ({seconds:.1f} s)")


if __name__ == "__main__":
    main()
