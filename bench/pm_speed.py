"""Batched multi-layer Grad-CAM pseudo-masks against the reference's one-at-a-time loop.

Same random-init model, same patches, one run. Two settings:

* ``full``: ResNet38 at full width on a few 224-px synthetic patches (``--full-patches``, default 4);
* ``cpu``:  the ``cpu`` stage-1 preset's width (``wsss.config.STAGE1_PRESETS``) on ``--cpu-patches``
  (default 64) synthetic patches of make reproduce's 112 px.

Every patch is fed at its own size, as no preset resizes.

Three ways to get the same pseudo-masks of 3 layers × C classes:

* ``batched``: ours — one forward per batch, one input-gradient pass per class down to ``b4_5``,
  no pass at all for ``bn7`` (``wsss.cam.gradcam.multi_layer_gradcam``);
* ``loop-reference``: WSSS-Tissue's cost model — per image, class and layer a forward pass and a
  full ``backward()`` (it calls ``model.zero_grad()``; weight gradients of every layer included);
* ``loop-inputgrad``: the same 3·C passes per image with ``autograd.grad`` to the layer only (no
  weight gradients) — the cheapest one-at-a-time loop, the definition used by the tests.

The ratios are loop seconds over batched seconds; masks of all three are compared pixel by pixel.

    python bench/pm_speed.py                       # both settings
    python bench/pm_speed.py --only cpu --threads 1
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DATASET_PATCH_SIZE, REPRODUCE_PATCH_SIZE  # noqa: E402

from wsss.cam.gradcam import GRADCAM_LAYERS, fuse_pseudo_mask, multi_layer_gradcam  # noqa: E402
from wsss.config import STAGE1_PRESETS  # noqa: E402
from wsss.data.background import white_mask  # noqa: E402
from wsss.data.datasets import InputNorm, to_tensor  # noqa: E402
from wsss.data.layout import list_train  # noqa: E402
from wsss.data.png import read_rgb  # noqa: E402
from wsss.data.specs import LUAD  # noqa: E402
from wsss.models.resnet38 import ResNet38Classifier  # noqa: E402

Patches = tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[int, int]]  # x, labels, white, size


def load_patches(root: Path, n: int) -> Patches:
    """``n`` training patches: model inputs (n, 3, H, W), labels (n, C) bool, white (n, H, W), (H, W)."""
    samples = list_train(root, LUAD.num_classes)[:n]
    images = [read_rgb(s.path) for s in samples]
    x = torch.stack([to_tensor(im, InputNorm()) for im in images])
    labels = torch.tensor([s.label for s in samples], dtype=torch.bool)
    white = torch.stack([torch.from_numpy(white_mask(im)) for im in images])
    return x, labels, white, images[0].shape[:2]


def batched(model, patches: Patches, batch_size: int) -> torch.Tensor:
    """(n, L, H, W) masks the way ``wsss generate-pm`` computes them."""
    x, labels, white, size = patches
    out = []
    for i in range(0, len(x), batch_size):
        cams = multi_layer_gradcam(model, x[i:i + batch_size], GRADCAM_LAYERS, size=size)
        out.append(torch.stack([fuse_pseudo_mask(cams[layer], labels[i:i + batch_size], white[i:i + batch_size],
                                                 LUAD.background_index) for layer in GRADCAM_LAYERS], dim=1))
    return torch.cat(out)


def _one_cam_reference(model, x1, layer: str, cls: int) -> torch.Tensor:
    """The reference's pass: forward, ``zero_grad``, ``backward()`` of one logit (weight grads too)."""
    features = model.forward_features(x1)
    features[layer].retain_grad()
    logit = model.forward_head(features["bn7"])[0, cls]
    model.zero_grad(set_to_none=True)
    logit.backward()
    alpha = features[layer].grad[0].mean(dim=(1, 2))
    return (alpha[:, None, None] * features[layer][0].detach()).sum(dim=0)


def _one_cam_inputgrad(model, x1, layer: str, cls: int) -> torch.Tensor:
    """One pass with the gradient w.r.t. the layer's output only."""
    features = model.forward_features(x1)
    logit = model.forward_head(features["bn7"])[0, cls]
    (grad,) = torch.autograd.grad(logit, features[layer])
    alpha = grad[0].mean(dim=(1, 2))
    return (alpha[:, None, None] * features[layer][0].detach()).sum(dim=0)


def loop(model, patches: Patches, one_cam: Callable) -> torch.Tensor:
    """(n, L, H, W) masks from 3 layers × C classes single-image passes per patch."""
    x, labels, white, size = patches
    out = []
    for b in range(len(x)):
        per_layer = []
        for layer in GRADCAM_LAYERS:
            cams = torch.stack([one_cam(model, x[b:b + 1], layer, c) for c in range(model.num_classes)])
            cams = F.interpolate(cams[None], size=size, mode="bilinear", align_corners=False)
            per_layer.append(fuse_pseudo_mask(cams, labels[b:b + 1], white[b:b + 1], LUAD.background_index)[0])
        out.append(torch.stack(per_layer))
    return torch.stack(out)


def timed(fn: Callable) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def run_setting(name: str, width: float, size: int, folder: Path, n: int, batch_size: int) -> dict:
    """Time the three ways on ``n`` synthetic patches of ``size`` px made under ``folder``."""
    from wsss.data.synth import generate

    root = folder / f"data{size}"
    generate(root, n_train=n, n_val=1, n_test=1, size=size, seed=0, workers=2, progress=False)
    torch.manual_seed(0)
    model = ResNet38Classifier(LUAD.num_classes, width=width).eval()
    patches = load_patches(root, n)
    print(f"\n[{name}] width {width}, model input {patches[0].shape[-1]} px, patches {n} "
          f"({patches[3][0]} px), batch {batch_size}, threads {torch.get_num_threads()}", flush=True)
    batched(model, (patches[0][:1], patches[1][:1], patches[2][:1], patches[3]), 1)  # warm-up
    t_batched, masks = timed(lambda: batched(model, patches, batch_size))
    print(f"  batched         {t_batched:8.2f} s  {t_batched / n:7.3f} s/patch", flush=True)
    row = {"setting": name, "patches": n, "batched_s": t_batched}
    for label, one_cam in (("loop-inputgrad", _one_cam_inputgrad), ("loop-reference", _one_cam_reference)):
        seconds, loop_masks = timed(lambda: loop(model, patches, one_cam))
        differ = int((loop_masks != masks).sum())
        print(f"  {label:<15} {seconds:8.2f} s  {seconds / n:7.3f} s/patch   ratio {seconds / t_batched:5.2f}x   "
              f"mask pixels differing from batched: {differ}", flush=True)
        row[label] = seconds
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=("full", "cpu"), help="Run one setting only.")
    parser.add_argument("--full-patches", type=int, default=4)
    parser.add_argument("--cpu-patches", type=int, default=64)
    parser.add_argument("--cpu-batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice).")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    preset = STAGE1_PRESETS["cpu"]
    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        if args.only in (None, "full"):
            rows.append(run_setting("full", 1.0, DATASET_PATCH_SIZE, Path(tmp), args.full_patches, args.full_patches))
        if args.only in (None, "cpu"):
            rows.append(run_setting("cpu preset", preset["width"], REPRODUCE_PATCH_SIZE, Path(tmp), args.cpu_patches,
                                    args.cpu_batch_size))
    print("\nsetting      patches  batched s/patch  loop-inputgrad ratio  loop-reference ratio")
    for r in rows:
        print(f"{r['setting']:<12} {r['patches']:>7}  {r['batched_s'] / r['patches']:15.3f}  "
              f"{r['loop-inputgrad'] / r['batched_s']:20.2f}  {r['loop-reference'] / r['batched_s']:20.2f}")


if __name__ == "__main__":
    main()
