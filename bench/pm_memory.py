"""Peak memory of ``wsss generate-pm`` over 200 vs 2,000 synthetic patches.

Streaming generation keeps no graph or mask between batches, so peak RSS should not grow with
the number of patches (target: the 2,000-patch run within 1.5× of the 200-patch run). Each run is
a fresh child process generating all three layers with a random-init model of the ``cpu`` stage-1
preset (its width from ``wsss.config.STAGE1_PRESETS``) on synthetic patches fed at their own size
(default: make reproduce's 112 px); it reports its own peak RSS (``ru_maxrss``) and that of its
DataLoader workers.

    python bench/pm_memory.py                         # 200 vs 2000 patches of 112 px
    python bench/pm_memory.py --counts 100 1000 --size 96
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPRODUCE_PATCH_SIZE  # noqa: E402


def child(data: Path, checkpoint: Path, workers: int, batch_size: int) -> None:
    """Generate the pseudo-masks of ``data`` and print peak RSS (MiB) as JSON."""
    from wsss.config import PM_PRESETS
    from wsss.stages.pseudo_masks import PseudoMaskConfig, generate

    cfg = PseudoMaskConfig(dataset="luad", data=data, checkpoint=checkpoint, out=data / "train_PM",
                           batch_size=batch_size, device="cpu", workers=workers, force=True, **PM_PRESETS["cpu"])
    summary = generate(cfg, progress=False)
    # ru_maxrss is in KiB on Linux
    print(json.dumps({
        "patches": summary["patches"],
        "seconds": summary["seconds"],
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "workers_peak_rss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    }))


def make_checkpoint(path: Path) -> None:
    import torch

    from wsss.config import STAGE1_PRESETS, Stage1Config
    from wsss.data.specs import LUAD
    from wsss.models.resnet38 import ResNet38Classifier
    from wsss.runtime import save_checkpoint
    from wsss.stages.stage1 import checkpoint_state

    preset = STAGE1_PRESETS["cpu"]
    torch.manual_seed(0)
    model = ResNet38Classifier(LUAD.num_classes, width=preset["width"])
    cfg = Stage1Config(dataset="luad", data=path.parent, width=preset["width"])
    save_checkpoint(path, checkpoint_state(model, cfg, LUAD, 0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--counts", type=int, nargs=2, default=(200, 2000), metavar=("SMALL", "LARGE"))
    parser.add_argument("--size", type=int, default=REPRODUCE_PATCH_SIZE, help="Synthetic patch side.")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--child", nargs=2, metavar=("DATA", "CHECKPOINT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(Path(args.child[0]), Path(args.child[1]), args.workers, args.batch_size)
        return
    from wsss.data.synth import generate

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(tmp) / "stage1_cpu_preset.pth"
        make_checkpoint(checkpoint)
        results = []
        for n in args.counts:
            data = Path(tmp) / f"data{n}"
            generate(data, n_train=n, n_val=1, n_test=1, size=args.size, seed=0, workers=2, progress=False)
            proc = subprocess.run(
                [sys.executable, __file__, "--child", str(data), str(checkpoint), "--workers", str(args.workers),
                 "--batch-size", str(args.batch_size)],
                capture_output=True, text=True, check=True,
            )
            results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            r = results[-1]
            print(f"{r['patches']:>6} patches: {r['seconds']:7.1f} s, peak RSS {r['peak_rss_mib']:7.1f} MiB "
                  f"(workers {r['workers_peak_rss_mib']:.1f} MiB)", flush=True)
    small, large = results
    print(f"peak RSS ratio {large['patches']} / {small['patches']} patches: "
          f"{large['peak_rss_mib'] / small['peak_rss_mib']:.3f} (target <= 1.5); "
          f"workers {large['workers_peak_rss_mib'] / small['workers_peak_rss_mib']:.3f}")


if __name__ == "__main__":
    main()
