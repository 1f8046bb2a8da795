"""Stage-2 training throughput and the fraction of the machine's fp32 GEMM FLOP/s it reaches.

    python bench/stage2_speed.py [--preset cpu|paper|all] [--batch-size N] [--steps N] [--threads N]

Both numbers come from the same run: a training step (DeepLab v3+ forward, the three-mask weighted
cross-entropy, backward, SGD step) of the preset's model on random images and pseudo-masks of the
patch size it trains on (cpu: make reproduce's 112 px; paper: 224 px), and a large matrix multiply.
The paper setting (ResNet-101, 224 px) runs at batch 2 unless told otherwise, so that it finishes in
a minute on a CPU; images/s hardly depends on the batch size there.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import count_flops, gemm_flops_per_second, machine, patch_size, time_calls  # noqa: E402

from wsss.config import STAGE2_PRESETS, Stage2Config, resolve  # noqa: E402
from wsss.data.specs import LUAD  # noqa: E402
from wsss.losses import build_multi_mask_loss  # noqa: E402
from wsss.models.deeplab import DeepLabArch, DeepLabV3Plus  # noqa: E402

PAPER_BENCH_BATCH = 2


def bench(preset: str, batch: int | None, steps: int) -> float:
    """Print the numbers of one preset; returns images/s."""
    cfg = resolve(Stage2Config, STAGE2_PRESETS, preset, dataset="luad", data=Path("."))
    size = patch_size(preset)
    batch = batch or (PAPER_BENCH_BATCH if preset == "paper" else cfg.batch_size)
    torch.manual_seed(0)
    model = DeepLabV3Plus(DeepLabArch(cfg.backbone, cfg.out_stride, LUAD.num_classes, cfg.head_channels)).train()
    optimizer = torch.optim.SGD(model.param_groups(1e-3, cfg.head_lr_mult), lr=1e-3, momentum=cfg.momentum)
    loss_fn = build_multi_mask_loss(cfg.loss, cfg.loss_reduction, cfg.pm_weights, LUAD.background_index)
    x = torch.rand(batch, 3, size, size)
    masks = torch.randint(0, LUAD.background_index + 1, (batch, len(cfg.pm_layers), size, size))  # background ignored

    def step() -> None:
        loss = loss_fn(model(x)["out"], masks)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    flops = count_flops(step)
    seconds = time_calls(step, steps)
    peak = gemm_flops_per_second()
    achieved = flops / seconds
    print(f"stage 2, preset {preset}: {cfg.backbone} OS{cfg.out_stride}, head {cfg.head_channels} ch, "
          f"{size}px, batch {batch}")
    print(f"  step {seconds * 1000:.0f} ms  ->  {batch / seconds:.1f} images/s")
    print(f"  {flops / 1e9:.2f} GFLOP per step (fwd+bwd)  ->  {achieved / 1e9:.1f} GFLOP/s")
    print(f"  fp32 GEMM peak measured now: {peak / 1e9:.1f} GFLOP/s")
    print(f"  fraction of GEMM FLOP/s reached: {achieved / peak:.2f}")
    return batch / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="all", choices=[*sorted(STAGE2_PRESETS), "all"])
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"machine: {machine()}")
    presets = ["cpu", "paper"] if args.preset == "all" else [args.preset]
    for preset in presets:
        bench(preset, args.batch_size, args.steps)


if __name__ == "__main__":
    main()
