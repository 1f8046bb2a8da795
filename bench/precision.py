"""fp32 against bf16, side by side in one run: each stage's throughput, the fraction of the GEMM peak
it reaches, the training loaders' images/s per worker, and how many pseudo-mask pixels bf16 flips.

    python bench/precision.py [--threads N] [--rounds 5] [--data DIR] [--checkpoint STAGE1.pth]
                              [--train-patches 400] [--train-epochs 12] [--pm-patches 96]

Throughput (the ``cpu`` presets' models on random inputs of make reproduce's 112 px, the size they
train at; fp32 and bf16 timed in alternating rounds so that both see the same machine load, median of
the rounds):

* stage-1 training step (forward, with PDA where the preset uses it; backward, SGD step) and stage-2's;
* a generate-pm batch (Grad-CAM at b4_5, b5_2, bn7 and the fusion, ``wsss.stages.pseudo_masks``);
* a batch of predict windows of the training patch size (normalise, DeepLab, softmax:
  ``wsss.inference.TilePredictor``).

Each row gives images/s in both precisions, their ratio, and FLOP/s as a fraction of the matrix
multiply peak measured in the same run (fp32 rows against the fp32 peak, bf16 rows against bf16's).

Loaders: one worker's images/s (items prepared in this process, as a worker does) of the stage-1
and stage-2 training sets as train-stage1/2 build them (``training_set``: every augmentation of the
preset, its blur, JPEG and stain normalisation included), at the cpu presets' settings (make
reproduce's 112-px patches at their own size) and at the paper's (224-px patches, flips), and how
many such workers ~3000 images/s (what an H100 trains on at 224 px) would take. ``--loaders-only``
measures these alone.

Pseudo-mask agreement: a stage-1 classifier (``--checkpoint``, or one trained here in fp32 with the
cpu preset on 400 synthetic 112-px patches, about 5 minutes on one core) makes the pseudo-masks of
``--pm-patches`` training patches in fp32 and in bf16 (each in the layout generate-pm gives it); the
fraction of pixels whose class differs, per layer. generate-pm runs Grad-CAM in bf16 because this
stays below 0.5 % for classifiers that fit their labels (0.17-0.31 % measured); a classifier that
does not (label accuracy 0.65 after 6 epochs on 160 patches) flipped 2.2 % at b4_5.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DATASET_PATCH_SIZE, REPRODUCE_PATCH_SIZE, count_flops, machine  # noqa: E402

from wsss.models import loading  # noqa: E402
from wsss.config import STAGE1_PRESETS, STAGE2_PRESETS, Stage1Config, Stage2Config, resolve  # noqa: E402
from wsss.data.datasets import ClassificationDataset, DecodedCache, InputNorm, normalise  # noqa: E402
from wsss.data.layout import list_train  # noqa: E402
from wsss.data.png import read_rgb  # noqa: E402
from wsss.data.scale import training_patch_size  # noqa: E402
from wsss.data.seg_datasets import PseudoMaskDataset  # noqa: E402
from wsss.data.specs import LUAD  # noqa: E402
from wsss.inference import TilePredictor  # noqa: E402
from wsss.losses import build_multi_mask_loss  # noqa: E402
from wsss.models.deeplab import DeepLabArch, DeepLabV3Plus  # noqa: E402
from wsss.models.resnet38 import ResNet38Classifier  # noqa: E402
from wsss.runtime import autocast, cpu_has_bf16, memory_format  # noqa: E402
from wsss.cam.pseudo_mask import PmMethod, patch_item, pseudo_masks  # noqa: E402
from wsss.stages.stage1 import build_model, training_format  # noqa: E402
from wsss.models.loading import LoadedSegmenter  # noqa: E402

CPU = torch.device("cpu")
PRECISIONS = ("fp32", "bf16")
GPU_IMAGES_PER_SECOND = 3000


def gemm_peak(dtype: torch.dtype, n: int = 1024, repeats: int = 10) -> float:
    """Best-of-``repeats`` FLOP/s of an n × n matrix product in ``dtype``."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def dispatch_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call of ``fn`` from torch's FLOP formulas, counted at the dispatcher without
    FlopCounterMode's module hooks (which refuse Grad-CAM's ``autograd.grad`` to a hooked leaf)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import flop_registry

    class Count(TorchDispatchMode):
        total = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            formula = flop_registry.get(func._overloadpacket)
            if formula is not None:
                Count.total += formula(*args, **kwargs, out_val=out)
            return out

    with Count():
        fn()
    return Count.total


def side_by_side(calls: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Median seconds per call of each of ``calls``, timed in alternating rounds (one warm-up each)."""
    for fn in calls.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, fn in calls.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


@dataclasses.dataclass
class Row:
    name: str
    images: int  # per call
    flops: int  # per call
    seconds: dict[str, float]

    def line(self, peaks: dict[str, float]) -> str:
        fp32, bf16 = (self.images / self.seconds[p] for p in PRECISIONS)
        frac = {p: self.flops / self.seconds[p] / peaks[p] for p in PRECISIONS}
        return (f"  {self.name:<28} fp32 {fp32:7.1f} img/s ({frac['fp32']:.2f} of fp32 peak)   "
                f"bf16 {bf16:7.1f} img/s ({frac['bf16']:.2f} of bf16 peak)   bf16/fp32 {bf16 / fp32:.2f}x")


# --------------------------------------------------------------------------- stage throughput


def copies(make: Callable[[], torch.nn.Module], layout: Callable[[str], torch.memory_format]) -> dict:
    """One model per precision, the same weights, each in the layout the commands give it."""
    models = {}
    for precision in PRECISIONS:
        torch.manual_seed(0)
        models[precision] = make().to(memory_format=layout(precision))
    return models


def stage1_row(rounds: int) -> Row:
    cfg = resolve(Stage1Config, STAGE1_PRESETS, "cpu", dataset="luad", data=Path("."))
    size, batch = REPRODUCE_PATCH_SIZE, cfg.batch_size
    gamma = 0.9 if cfg.pda else None  # PDA as after epoch 3, where the preset uses it
    models = copies(lambda: build_model(cfg, LUAD).train(), lambda p: training_format(CPU, p))
    opts = {p: torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9) for p, m in models.items()}
    x, y = torch.rand(batch, 3, size, size), (torch.rand(batch, LUAD.num_classes) > 0.5).float()

    def step(precision: str) -> None:
        model, opt = models[precision], opts[precision]
        with autocast(CPU, precision):
            logits = model(x.contiguous(memory_format=training_format(CPU, precision)), pda_gamma=gamma,
                           pda_norm=cfg.pda_norm)
        loss = F.multilabel_soft_margin_loss(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    flops = count_flops(lambda: step("fp32"))
    seconds = side_by_side({p: (lambda p=p: step(p)) for p in PRECISIONS}, rounds)
    return Row(f"stage-1 train step ({size}px)", batch, flops, seconds)


def stage2_row(rounds: int) -> Row:
    cfg = resolve(Stage2Config, STAGE2_PRESETS, "cpu", dataset="luad", data=Path("."))
    models = copies(lambda: DeepLabV3Plus(DeepLabArch(cfg.backbone, cfg.out_stride, 4, cfg.head_channels)).train(),
                    lambda p: memory_format(CPU, p))
    opts = {p: torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9) for p, m in models.items()}
    loss_fn = build_multi_mask_loss(cfg.loss, cfg.loss_reduction, cfg.pm_weights, LUAD.background_index)
    size, batch = REPRODUCE_PATCH_SIZE, cfg.batch_size
    x = torch.rand(batch, 3, size, size)
    masks = torch.randint(0, LUAD.background_index + 1, (batch, len(cfg.pm_layers), size, size))

    def step(precision: str) -> None:
        model, opt = models[precision], opts[precision]
        with autocast(CPU, precision):
            logits = model(x.contiguous(memory_format=memory_format(CPU, precision)))["out"]
        loss = loss_fn(logits.float(), masks)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    flops = count_flops(lambda: step("fp32"))
    seconds = side_by_side({p: (lambda p=p: step(p)) for p in PRECISIONS}, rounds)
    return Row(f"stage-2 train step ({size}px)", batch, flops, seconds)


def pm_row(model: ResNet38Classifier, items: list[dict], rounds: int) -> Row:
    layers = ("b4_5", "b5_2", "bn7")
    models = copies(lambda: copy.deepcopy(model).eval(), lambda p: memory_format(CPU, p))

    def batch(precision: str) -> None:
        pseudo_masks(models[precision], items, layers, LUAD, CPU, PmMethod(white_rule="glass"), precision)

    flops = dispatch_flops(lambda: batch("fp32"))
    seconds = side_by_side({p: (lambda p=p: batch(p)) for p in PRECISIONS}, rounds)
    return Row(f"generate-pm batch ({len(items)})", len(items), flops, seconds)


def predict_row(rounds: int, tile: int = REPRODUCE_PATCH_SIZE, batch: int = 8) -> Row:
    cfg = resolve(Stage2Config, STAGE2_PRESETS, "cpu", dataset="luad", data=Path("."))
    models = copies(lambda: DeepLabV3Plus(DeepLabArch(cfg.backbone, cfg.out_stride, 4, cfg.head_channels)).eval(),
                    lambda p: memory_format(CPU, p))
    rng = np.random.default_rng(0)
    tiles = [rng.integers(0, 256, (tile, tile, 3), dtype=np.uint8) for _ in range(batch)]
    predictors = {p: TilePredictor(LoadedSegmenter(models[p], InputNorm(), cfg.image_size, list(LUAD.classes)), tile,
                                   CPU, precision=p) for p in PRECISIONS}
    flops = count_flops(lambda: predictors["fp32"](tiles))
    seconds = side_by_side({p: (lambda p=p: predictors[p](tiles)) for p in PRECISIONS}, rounds)
    return Row(f"predict windows ({tile}px, {batch})", batch, flops, seconds)


# --------------------------------------------------------------------------- loaders


def items_per_second(dataset, n: int) -> float:
    """Items of ``dataset`` prepared per second in this process (one loader worker's rate)."""
    torch.manual_seed(0)
    dataset[0]
    t = time.perf_counter()
    for i in range(n):
        dataset[i % len(dataset)]
    return n / (time.perf_counter() - t)


def loader_lines(cpu_root: Path, paper_root: Path, n: int) -> list[str]:
    """Loader rates of the cpu presets on ``cpu_root``'s patches and the paper's on ``paper_root``'s."""

    def training_sets(root: Path, preset: str, cache: bool = False, **changes
                      ) -> tuple[int | None, ClassificationDataset, PseudoMaskDataset]:
        # the recipes' own training sets: every augmentation the preset turns on (blur, JPEG, stain
        # normalisation included), as the workers of train-stage1/2 prepare them
        from wsss.stages import stage1, stage2
        from wsss.stages.common import input_pipeline

        samples = list_train(root, LUAD)
        paths = [s.path for s in samples]
        pm = [[root / "train_gt" / s.path.name] * 3 for s in samples]  # true masks stand in for 3 PM layers
        s1 = resolve(Stage1Config, STAGE1_PRESETS, preset, dataset="luad", data=root, **changes)
        s2 = resolve(Stage2Config, STAGE2_PRESETS, preset, dataset="luad", data=root, **changes)
        return (training_patch_size(root),
                stage1.training_set(s1, samples, input_pipeline(s1, paths, None), DecodedCache() if cache else None),
                stage2.training_set(s2, LUAD, samples, pm, input_pipeline(s2, paths, None),
                                    DecodedCache() if cache else None))

    cpu_size, cpu_s1, cpu_s2 = training_sets(cpu_root, "cpu")
    paper_size, paper_s1, paper_s2 = training_sets(paper_root, "paper")
    sets = {
        f"stage-1, cpu preset ({cpu_size}px, d4, blur)": cpu_s1,
        f"stage-1, paper ({paper_size}px, flips)": paper_s1,
        f"stage-2, cpu preset ({cpu_size}px, d4, mosaic, JPEG)": cpu_s2,
        f"stage-2, paper ({paper_size}px, hflip, blur)": paper_s2,
    }
    # what the presets' blur (stage 1) and JPEG (stage 2) cost a worker, measured beside them
    _, plain_s1, plain_s2 = training_sets(cpu_root, "cpu", blur_jitter=0.0, jpeg_jitter=0)
    lines = []
    for name, dataset, plain in (("stage-1 blur", cpu_s1, plain_s1), ("stage-2 JPEG", cpu_s2, plain_s2)):
        rates = [(items_per_second(dataset, n), items_per_second(plain, n)) for _ in range(3)]
        with_it, without = (statistics.median(r[i] for r in rates) for i in (0, 1))
        lines.append(f"  cpu preset's {name}: {1e3 / with_it - 1e3 / without:+.2f} ms an image a worker "
                     f"({without:.0f} -> {with_it:.0f} img/s; median of 3 alternating rounds)")
    for name, dataset in sets.items():
        rate = items_per_second(dataset, n)
        lines.append(f"  {name:<42} {rate:6.1f} img/s per worker; {GPU_IMAGES_PER_SECOND} img/s takes "
                     f"{GPU_IMAGES_PER_SECOND / rate:5.1f} workers (cores)")
    # The cpu preset trains without workers: from the second epoch on, the patches and masks come
    # decoded from memory (DecodedCache), the same items to the bit.
    _, cached_s1, cached_s2 = training_sets(cpu_root, "cpu", cache=True)
    for name, dataset, plain in (("stage-1", cached_s1, cpu_s1), ("stage-2", cached_s2, cpu_s2)):
        for i in range(len(dataset)):  # the first epoch fills the cache
            dataset[i]
        cold, warm = items_per_second(plain, n), items_per_second(dataset, n)
        lines.append(f"  {name}, cpu preset, no workers, epochs 2+ (decoded cache) {warm:6.1f} img/s, "
                     f"{warm / cold:.1f}x the first epoch's {cold:.1f}")
    x = torch.stack([paper_s2[i][0] for i in range(8)])
    bytes_u8, bytes_f32 = x.numel(), x.numel() * 4
    lines.append(f"  a stage-2 batch of 8 at {x.shape[-1]}px: images {bytes_u8 / 1e6:.1f} MB as uint8 (float32 "
                 f"{bytes_f32 / 1e6:.1f} MB); 3 masks {3 * x[:, 0].numel() / 1e6:.1f} MB as uint8 (int64 "
                 f"{24 * x[:, 0].numel() / 1e6:.1f} MB)")
    return lines


# --------------------------------------------------------------------------- pseudo-mask agreement


def trained_classifier(root: Path, out: Path, epochs: int) -> tuple[ResNet38Classifier, dict]:
    """A cpu-preset stage-1 classifier trained for ``epochs`` on ``root`` (fp32), and its fit."""
    from wsss.stages import stage1

    cfg = resolve(Stage1Config, STAGE1_PRESETS, "cpu", dataset="luad", data=root, out=out, epochs=epochs,
                  eval_splits=(), device="cpu")
    summary = stage1.train(cfg)
    clf = loading.load_classifier(Path(summary["checkpoint"]))
    return clf.model.eval(), {"fit": summary["fit"], "checkpoint": summary["checkpoint"]}


def pm_items(root: Path, n: int) -> list[dict]:
    """generate-pm's items of ``n`` training patches, each fed at its own size."""
    return [patch_item(read_rgb(s.path), s.label, LUAD, InputNorm(), None, "glass")
            for s in list_train(root, LUAD)[:n]]


def agreement_lines(model: ResNet38Classifier, items: list[dict], batch: int = 8) -> tuple[list[str], float]:
    """Per layer: fraction of pseudo-mask pixels whose class bf16 changes; returns the lines and the worst."""
    layers = ("b4_5", "b5_2", "bn7")
    models = copies(lambda: copy.deepcopy(model).eval(), lambda p: memory_format(CPU, p))
    flipped = {layer: 0 for layer in layers}
    pixels = 0
    for i in range(0, len(items), batch):
        group = items[i:i + batch]
        masks = {p: pseudo_masks(models[p], group, layers, LUAD, CPU, PmMethod(white_rule="glass"), p)
                 for p in PRECISIONS}
        for layer in layers:
            flipped[layer] += int((masks["fp32"][layer] != masks["bf16"][layer]).sum())
        pixels += masks["fp32"][layers[0]].numel()
    lines = [f"  PM_{layer:<5} {100 * flipped[layer] / pixels:6.3f} % of {pixels} pixels differ" for layer in layers]
    return lines, max(flipped.values()) / pixels


def synthetic(root: Path, n_train: int, size: int) -> Path:
    from wsss.data.synth import generate

    generate(root, n_train=n_train, n_val=4, n_test=4, size=size, seed=0, workers=1, progress=False)
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--rounds", type=int, default=5, help="alternating timing rounds per row")
    parser.add_argument("--data", type=Path, default=None, help="synthetic dataset with train_gt/ (default: made here)")
    parser.add_argument("--checkpoint", type=Path, default=None, help="stage-1 checkpoint for the PM agreement")
    parser.add_argument("--train-epochs", type=int, default=12, help="epochs of the classifier trained here")
    parser.add_argument("--train-patches", type=int, default=400, help="patches of the synthetic data made here")
    parser.add_argument("--pm-patches", type=int, default=96)
    parser.add_argument("--loader-items", type=int, default=64)
    parser.add_argument("--loaders-only", action="store_true", help="only the training loaders' rates")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import logging

    logging.basicConfig(level=logging.WARNING)
    started = time.perf_counter()
    print(f"machine: {machine()}; native bf16: {cpu_has_bf16()}")
    if args.loaders_only:
        with tempfile.TemporaryDirectory() as tmp:
            root = args.data or synthetic(Path(tmp) / "data", args.train_patches, REPRODUCE_PATCH_SIZE)
            paper_root = synthetic(Path(tmp) / "paper_data", max(args.loader_items, 8), DATASET_PATCH_SIZE)
            print("\ntraining loaders (uint8 items, one process = one worker):")
            for line in loader_lines(root, paper_root, args.loader_items):
                print(line)
        return
    peaks = {"fp32": gemm_peak(torch.float32), "bf16": gemm_peak(torch.bfloat16)}
    print(f"GEMM peak (1024², best of 10): fp32 {peaks['fp32'] / 1e9:.0f} GFLOP/s, bf16 {peaks['bf16'] / 1e9:.0f} "
          f"GFLOP/s ({peaks['bf16'] / peaks['fp32']:.1f}x)")

    with tempfile.TemporaryDirectory() as tmp:
        root = args.data or synthetic(Path(tmp) / "data", args.train_patches, REPRODUCE_PATCH_SIZE)
        paper_root = synthetic(Path(tmp) / "paper_data", max(args.loader_items, 8), DATASET_PATCH_SIZE)
        if args.checkpoint is not None:
            from wsss.models.loading import load_classifier

            model, about = load_classifier(args.checkpoint).model.eval(), {"checkpoint": str(args.checkpoint)}
        else:
            model, about = trained_classifier(root, Path(tmp) / "s1", args.train_epochs)

        print("\nthroughput, fp32 vs bf16 (cpu presets' models; median of alternating rounds):")
        rows = [stage1_row(args.rounds), stage2_row(args.rounds),
                pm_row(model, pm_items(root, 8), args.rounds), predict_row(args.rounds)]
        for row in rows:
            print(row.line(peaks))

        print("\ntraining loaders (uint8 items, one process = one worker):")
        for line in loader_lines(root, paper_root, args.loader_items):
            print(line)

        fit = about.get("fit")
        what = (f"trained here: {args.train_epochs} epochs on {args.train_patches} synthetic patches, label accuracy "
                f"{fit['label_acc']:.3f}" if fit else f"{about['checkpoint']}")
        print(f"\npseudo-masks, bf16 vs fp32 ({min(args.pm_patches, len(list_train(root, LUAD)))} patches; "
              f"classifier {what}):")
        lines, worst = agreement_lines(model, pm_items(root, args.pm_patches))
        for line in lines:
            print(line)
        print(f"  worst layer {100 * worst:.3f} % flipped: {'within' if worst <= 0.005 else 'ABOVE'} the 0.5 % "
              "bound under which generate-pm runs Grad-CAM in bf16")
    print(f"\n{time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
