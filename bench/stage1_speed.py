"""Stage-1 training throughput and the fraction of the machine's fp32 GEMM FLOP/s it reaches.

    python bench/stage1_speed.py [--preset cpu] [--batch-size N] [--steps N]

Both numbers come from the same run: a training step (forward with PDA + backward + SGD step)
of the preset's model on random images, and a large matrix multiply.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import count_flops, gemm_flops_per_second, machine, time_calls  # noqa: E402

from wsss.config import STAGE1_PRESETS  # noqa: E402
from wsss.models.resnet38 import ResNet38Classifier  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default="cpu", choices=sorted(STAGE1_PRESETS))
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--pda-gamma", type=float, default=0.9, help="PDA on (as after epoch 3); negative: off")
    args = parser.parse_args()
    preset = STAGE1_PRESETS[args.preset]
    width = preset.get("width", 1.0)
    size = preset.get("image_size") or 224
    batch = args.batch_size or preset.get("batch_size", 20)
    gamma = None if args.pda_gamma < 0 else args.pda_gamma

    torch.manual_seed(0)
    model = ResNet38Classifier(4, width=width).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x = torch.rand(batch, 3, size, size)
    y = (torch.rand(batch, 4) > 0.5).float()

    def step() -> None:
        loss = F.multilabel_soft_margin_loss(model(x, pda_gamma=gamma), y)
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
