"""Shared bench helpers: the patch sizes the presets train on, the machine's fp32 GEMM FLOP/s and
FLOP counts of a step, measured in-run."""

from __future__ import annotations

import platform
import time
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

# No preset resizes: a model sees its patches at their own size. `make reproduce` runs the cpu
# presets on 112-px synthetic patches (`wsss synth --size 112`), so that is what their models are fed;
# the paper's datasets (and the paper and best presets) have 224-px patches.
REPRODUCE_PATCH_SIZE = 112
DATASET_PATCH_SIZE = 224


def patch_size(preset: str | None) -> int:
    """Side in px of the patches ``preset`` trains on, as fed to its model."""
    return REPRODUCE_PATCH_SIZE if preset in ("cpu", "cpu-paper") else DATASET_PATCH_SIZE


def gemm_flops_per_second(n: int = 1024, repeats: int = 10) -> float:
    """Best-of-``repeats`` fp32 matrix-multiply throughput, FLOP/s (2·n³ per product)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call of ``fn`` as counted by ``torch.utils.flop_counter`` (matmul/conv ops)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def time_calls(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median seconds per call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2]


def machine() -> str:
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"
