"""Set-level colour alignment at test time, measured on models trained without any stain option.

An experiment, not a wsss feature yet: every test patch of a look is shifted in CIE LAB by one vector,
the training set's mean LAB minus this test set's mean LAB (each the mean of per-patch LAB means;
wsss's ``reinhard-mean`` transform with a per-set target), then ``wsss evaluate --gate`` scores the
unchanged models on the shifted copy. One shift for the whole set keeps the differences between
patches (the class cues a per-patch normalisation removes) and removes a lab's overall colour cast.

Reads a ``bench/stain_transfer.py`` root (its data and the ``none`` configuration's models):

    python bench/colour_alignment.py --root runs/stain-task1 --seed 0

Writes ROOT/alignment/<look>/ (the shifted test split) and ROOT/alignment.json: stage 2 + gate test
mIoU per look, with and without the alignment (the latter from the stain_transfer run).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from wsss.data.stain import FitFailed, StainNorm, reinhard_fit

LOOKS = ("default", "lab-b", "pale", "dark", "jpeg", "blur")


def mean_lab(paths: list[Path]) -> np.ndarray:
    """The mean over ``paths`` of each patch's LAB channel means (only patches under 1% stained skipped).

    Not :func:`wsss.data.stain.lab_statistics`: it skips patches under 30% stained, as a stain fit must,
    which biases a set's mean colour; with it the default look lost 0.003 / 0.002 (tasks 1 / 2) and pale
    recovered less (0.826 / 0.779 against 0.841 / 0.797)."""
    means = []
    for path in paths:
        try:
            means.append(reinhard_fit(np.asarray(Image.open(path).convert("RGB")))[0])
        except FitFailed:
            pass
    return np.mean(means, axis=0)


def aligned_copy(src: Path, out: Path, shift: np.ndarray) -> None:
    """``src``'s test split with every image's LAB shifted by ``shift`` (masks copied as they are)."""
    if out.exists():
        shutil.rmtree(out)
    (out / "test" / "img").mkdir(parents=True)
    shutil.copytree(src / "test" / "mask", out / "test" / "mask")
    shutil.copy(src / "synth.json", out / "synth.json")
    for path in sorted((src / "test" / "img").glob("*.png")):
        image = np.asarray(Image.open(path).convert("RGB"))
        try:
            mean, std = reinhard_fit(image)
            image = StainNorm("reinhard-mean", lab_mean=tuple(mean + shift), lab_std=tuple(std)).transform(image)
        except FitFailed:  # glass: as it is
            pass
        Image.fromarray(image).save(out / "test" / "img" / path.name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, required=True, help="a bench/stain_transfer.py root")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--config", default="none", help="the configuration whose models are scored")
    args = parser.parse_args()
    run = args.root / "runs" / args.config / f"seed{args.seed}"
    s1 = run / "stage1" / "stage1_checkpoint_trained_on_luad.pth"
    s2 = run / "stage2" / "stage2_checkpoint_trained_on_luad.pth"
    data = args.root / "data"
    reference = mean_lab(sorted((data / "default" / "train").glob("*.png"))[::4])
    results = {}
    for look in LOOKS:
        src = data / look
        shift = reference - mean_lab(sorted((src / "test" / "img").glob("*.png")))
        out = args.root / "alignment" / look
        aligned_copy(src, out, shift)
        scores = out / "eval.json"
        subprocess.run([sys.executable, "-m", "wsss", "evaluate", "--data", out, "--checkpoint", s2, "--gate",
                        "--stage1-checkpoint", s1, "--split", "test", "--json", scores], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        before = json.loads((run / "eval" / f"{look}.json").read_text())["test_gate"]["mIoU"]
        after = json.loads(scores.read_text())["test_gate"]["mIoU"]
        results[look] = {"shift": [round(float(v), 2) for v in shift], "without": before, "aligned": after}
        print(f"{look}: shift L/a/b {np.round(shift, 1)}, stage 2 + gate {before:.3f} -> {after:.3f}", flush=True)
    (args.root / "alignment.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
