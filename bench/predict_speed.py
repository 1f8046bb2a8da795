"""`wsss predict` throughput (windows/s, and the fraction of the machine's fp32 GEMM FLOP/s it reaches),
then the wall time and peak memory of a whole large image.

    python bench/predict_speed.py [--preset cpu|paper] [--backbone NAME --head-channels N --image-size N]
                                  [--tile N --overlap 32 --batch-size 8] [--size 10000] [--threads N]
                                  [--pipeline]

Part 1 times the tile predictor (resize, normalise, DeepLab forward, softmax) on a batch of random
windows of a randomly initialised model of the preset's architecture. The windows are, as ``wsss
predict`` picks them, the size of the patches the model trained on (``--tile``; default: the cpu
presets' 112 px of make reproduce, the others' 224 px), fed at that size unless ``--image-size``.
Part 2 (``--size N``, 0 skips it) writes an N × N synthetic PNG (a random H&E-coloured texture with
white glass) and runs ``python -m wsss predict`` on it in a child process, so the peak resident
memory reported (the child's ``ru_maxrss``) is the command's own, from interpreter start to the last
PNG written; the same command on a 224-px image gives the fixed part (Python, torch, the model).

Part 3 (``--pipeline``) times the whole sliding window (``wsss.tiling.predict_mask``) on a narrow and
a wide synthetic image, batching as before this change (within one row of windows, no prefetch
thread) and as now (rows grouped to fill a batch, the next group prepared in a background thread),
alternating the two so that both see the same machine load; windows/s and GEMM fraction side by side.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import count_flops, gemm_flops_per_second, machine, patch_size, time_calls  # noqa: E402

from wsss.models import loading  # noqa: E402
from wsss.config import STAGE2_PRESETS, Stage2Config, resolve  # noqa: E402
from wsss.data.specs import LUAD  # noqa: E402
from wsss.models.deeplab import DeepLabArch, DeepLabV3Plus  # noqa: E402
from wsss.runtime import save_checkpoint  # noqa: E402
from wsss.stages import stage2  # noqa: E402
from wsss.inference import TilePredictor  # noqa: E402
from wsss.tiling import predict_mask, tiles_of  # noqa: E402


def make_checkpoint(path: Path, cfg: Stage2Config) -> None:
    """A randomly initialised stage-2 checkpoint of ``cfg``'s architecture (speed does not need training)."""
    torch.manual_seed(0)
    model = DeepLabV3Plus(DeepLabArch(cfg.backbone, cfg.out_stride, LUAD.num_classes, cfg.head_channels))
    save_checkpoint(path, stage2.checkpoint_state(model, cfg, LUAD, 0, {}))


def bench_tiles(path: Path, tile: int, batch: int, repeats: int) -> float:
    """Print windows/s and the GEMM fraction of the tile predictor; returns windows/s."""
    seg = loading.load_segmenter(path)
    predict = TilePredictor(seg, tile, torch.device("cpu"))
    rng = np.random.default_rng(0)
    tiles = [rng.integers(0, 256, (tile, tile, 3), dtype=np.uint8) for _ in range(batch)]
    flops = count_flops(lambda: predict(tiles))
    seconds = time_calls(lambda: predict(tiles), repeats)
    peak = gemm_flops_per_second()
    print(f"  windows of {tile}px -> model input {seg.image_size or tile}px, batch {batch}: "
          f"{seconds * 1000:.0f} ms per batch -> {batch / seconds:.1f} windows/s")
    print(f"  {flops / batch / 1e9:.3f} GFLOP per window -> {flops / seconds / 1e9:.1f} GFLOP/s; "
          f"fp32 GEMM peak measured now {peak / 1e9:.1f} GFLOP/s; fraction reached {flops / seconds / peak:.2f}")
    return batch / seconds


def bench_pipeline(path: Path, args) -> None:
    """Print windows/s of the sliding window batched within rows (before) and across rows with
    prefetch (now), on a narrow image (fewer windows a row than a batch) and a wide one."""
    seg = loading.load_segmenter(path)
    predict = TilePredictor(seg, args.tile, torch.device("cpu"))
    stride = args.tile - args.overlap
    peak = gemm_flops_per_second()
    rng = np.random.default_rng(0)
    per_window = count_flops(lambda: predict([rng.integers(0, 256, (args.tile, args.tile, 3), dtype=np.uint8)]))
    for name, (cols, rows) in (("narrow", (2, 12)), ("wide", (12, 2))):
        h, w = args.tile + stride * (rows - 1), args.tile + stride * (cols - 1)
        image = synthetic_image(max(h, w))[:h, :w]
        n = tiles_of(h, w, args.tile, args.overlap)
        modes = {"within rows, no prefetch (before)": dict(group=1, depth=0), "across rows + prefetch (now)": {}}
        times = {mode: [] for mode in modes}
        predict_mask(image, predict, args.tile, args.overlap, args.batch_size)  # warm-up
        for _ in range(args.repeats):
            for mode, kw in modes.items():
                t = time.perf_counter()
                predict_mask(image, predict, args.tile, args.overlap, args.batch_size, **kw)
                times[mode].append(time.perf_counter() - t)
        print(f"  {name} image {w} x {h} px ({cols} windows a row, {n} windows, batch {args.batch_size}):")
        for mode, ts in times.items():
            best = sorted(ts)[len(ts) // 2]
            print(f"    {mode:36s} {n / best:7.1f} windows/s, GEMM fraction {per_window * n / best / peak:.2f}")
    print(f"  fp32 GEMM peak measured now {peak / 1e9:.1f} GFLOP/s")


def synthetic_image(size: int, seed: int = 0) -> np.ndarray:
    """``size × size`` RGB: pink/purple blotches repeated from a 256-px random texture, a white band."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 60, (256, 256, 3), dtype=np.uint8) + np.array([150, 60, 130], dtype=np.uint8)
    image = np.tile(base, (size // 256 + 1, size // 256 + 1, 1))[:size, :size]
    image[:, : size // 10] = 245  # glass
    return image


def run_predict(image: Path, checkpoint: Path, out: Path, args) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of ``python -m wsss predict`` on ``image`` in a child process."""
    cmd = [sys.executable, "-m", "wsss", "predict", str(image), "--checkpoint", str(checkpoint), "--out", str(out),
           "--tile", str(args.tile), "--overlap", str(args.overlap), "--batch-size", str(args.batch_size),
           "--device", "cpu"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    seconds = time.perf_counter() - start
    # RUSAGE_CHILDREN's maxrss is the largest child's; run the big image after the small one.
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return seconds, max(peak, before) * 1024


def bench_image(checkpoint: Path, folder: Path, args) -> None:
    """Print the time and peak memory of ``wsss predict`` on a 224-px and an ``args.size``² image."""
    for size in (224, args.size):
        path = folder / f"synthetic_{size}.png"
        Image.fromarray(synthetic_image(size)).save(path, compress_level=1)
        seconds, peak = run_predict(path, checkpoint, folder / "out", args)
        n = tiles_of(size, size, args.tile, args.overlap)
        print(f"  {size} x {size} px ({n} windows): {seconds:.1f} s wall (with startup), "
              f"peak RSS {peak / 2**30:.2f} GiB; RGB image alone {size * size * 3 / 2**30:.2f} GiB")
        path.unlink()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cpu", choices=sorted(STAGE2_PRESETS))
    parser.add_argument("--backbone", default=None)
    parser.add_argument("--head-channels", type=int, default=None)
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--tile", type=int, default=None, help="window side (default: the preset's patch size)")
    parser.add_argument("--overlap", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size", type=int, default=0, help="also run wsss predict on an N x N image (0: skip)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--pipeline", action="store_true", help="also time the whole sliding window, before/now")
    args = parser.parse_args()
    args.tile = args.tile or patch_size(args.preset)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = resolve(Stage2Config, STAGE2_PRESETS, args.preset, dataset="luad", data=Path("."), backbone=args.backbone,
                  head_channels=args.head_channels, image_size=args.image_size)
    print(f"machine: {machine()}")
    print(f"predict, preset {args.preset}: {cfg.backbone} OS{cfg.out_stride}, head {cfg.head_channels} ch, "
          f"trained-at {cfg.image_size or 'native'} px")
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(tmp) / "stage2.pth"
        make_checkpoint(checkpoint, cfg)
        bench_tiles(checkpoint, args.tile, args.batch_size, args.repeats)
        if args.pipeline:
            bench_pipeline(checkpoint, args)
        if args.size:
            bench_image(checkpoint, Path(tmp), args)


if __name__ == "__main__":
    main()
