"""What test-time augmentation (``--tta``) does to a trained stage-2 model: mIoU on a test split and
windows/s, for ``none``, ``flip`` and ``d4``, side by side in one run.

    python bench/tta_effect.py --checkpoint stage2.pth --data DATASET [--dataset SPEC] [--split test] [--tile 224]
                               [--batch-size 8] [--repeats 2] [--threads N]

Every test patch is segmented as ``wsss predict`` segments a window of ``--tile`` px (resized by the
checkpoint's ``image_size`` / ``--tile`` where it records one; no preset sets one now, so a patch is fed
at its own size and ``--tile`` does not matter; softmax, TTA averaged, the argmax over the tissue
classes) and scored against its mask (background pixels not evaluated), exactly as ``wsss evaluate``
scores. Times are the median over ``--repeats`` passes over the split, the modes alternating.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402

from wsss.models import loading  # noqa: E402
from wsss.data.datasets import read_masked  # noqa: E402
from wsss.data.layout import list_masked  # noqa: E402
from wsss.data.specs import LUAD, get_spec  # noqa: E402
from wsss.inference import TTA_MODES, TilePredictor, model_size  # noqa: E402
from wsss.metrics import confusion_matrix, scores  # noqa: E402
from wsss.stages import stage2  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--dataset", default=None,
                        help="luad, bcss or a TOML spec file (default: the checkpoint's; luad if it records none)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--tile", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    seg = loading.load_segmenter(args.checkpoint)
    spec = get_spec(args.dataset) if args.dataset else seg.spec or LUAD
    samples = list_masked(args.data, args.split)
    pairs = [read_masked(s, spec) for s in samples]  # masks as wsss evaluate reads them
    images = [image for image, _ in pairs]
    masks = np.stack([mask for _, mask in pairs])
    num_classes = seg.model.num_classes
    print(f"machine: {machine()}")
    h, w = model_size(images[0].shape[:2], args.tile, seg.image_size)
    print(f"{args.checkpoint.name}: {len(samples)} {args.split} patches of {images[0].shape[0]} px, windows of "
          f"{args.tile} px -> model input {h} x {w} px, batch {args.batch_size}")
    predictors = {mode: TilePredictor(seg, args.tile, torch.device("cpu"), tta=mode) for mode in TTA_MODES}
    times: dict[str, list[float]] = {mode: [] for mode in TTA_MODES}
    preds: dict[str, np.ndarray] = {}
    for _ in range(args.repeats):
        for mode, predict in predictors.items():
            start = time.perf_counter()
            out = [predict(images[i : i + args.batch_size]).argmax(dim=1).numpy()
                   for i in range(0, len(images), args.batch_size)]
            times[mode].append(time.perf_counter() - start)
            preds[mode] = np.concatenate(out)
    base = None
    for mode in TTA_MODES:
        s = scores(confusion_matrix(preds[mode], masks, num_classes, spec.background_index))
        seconds = sorted(times[mode])[len(times[mode]) // 2]
        rate = len(images) / seconds
        base = base or rate
        per_class = " ".join(f"{v:.4f}" for v in s["iou"])
        print(f"  tta {mode:5s} mIoU {s['mIoU']:.4f}  pixel acc {s['pixel_acc']:.4f}  IoU per class {per_class}  "
              f"{rate:6.1f} windows/s ({base / rate:.1f}x the time of none)")


if __name__ == "__main__":
    main()
