"""Stage-1 training throughput and the fraction of the machine's fp32 GEMM FLOP/s it reaches.

    python bench/stage1_speed.py [--preset cpu] [--batch-size N] [--steps N]

Both numbers come from the same run: a training step (forward, with PDA where the preset uses it,
+ backward + SGD step) of the preset's model (its width and dropout) on random images of the patch
size it trains on (the cpu presets: make reproduce's 112 px; the others: 224 px), and a large matrix
multiply.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import count_flops, gemm_flops_per_second, machine, patch_size, time_calls  # noqa: E402

from wsss.config import STAGE1_PRESETS, Stage1Config, resolve  # noqa: E402
from wsss.data.specs import LUAD  # noqa: E402
from wsss.stages.stage1 import build_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default="cpu", choices=sorted(STAGE1_PRESETS))
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--pda-gamma", type=float, default=None,
                        help="PDA gamma (default: 0.9, as after epoch 3, where the preset uses PDA); negative: off")
    args = parser.parse_args()
    cfg = resolve(Stage1Config, STAGE1_PRESETS, args.preset, dataset="luad", data=Path("."))
    width, size = cfg.width, patch_size(args.preset)
    batch = args.batch_size or cfg.batch_size
    if args.pda_gamma is None:
        gamma = 0.9 if cfg.pda else None
    else:
        gamma = None if args.pda_gamma < 0 else args.pda_gamma

    torch.manual_seed(0)
    model = build_model(cfg, LUAD).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x = torch.rand(batch, 3, size, size)
    y = (torch.rand(batch, LUAD.num_classes) > 0.5).float()

    def step() -> None:
        loss = F.multilabel_soft_margin_loss(model(x, pda_gamma=gamma, pda_norm=cfg.pda_norm), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    flops = count_flops(step)
    seconds = time_calls(step, args.steps)
    peak = gemm_flops_per_second()
    achieved = flops / seconds
    print(f"machine: {machine()}")
    print(f"stage 1, preset {args.preset}: width {width}, {size}px, batch {batch}, PDA gamma {gamma}")
    print(f"  step {seconds * 1000:.0f} ms  ->  {batch / seconds:.1f} images/s")
    print(f"  {flops / 1e9:.2f} GFLOP per step (fwd+bwd)  ->  {achieved / 1e9:.1f} GFLOP/s")
    print(f"  fp32 GEMM peak measured now: {peak / 1e9:.1f} GFLOP/s")
    print(f"  fraction of GEMM FLOP/s reached: {achieved / peak:.2f}")


if __name__ == "__main__":
    main()
