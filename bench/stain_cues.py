"""What each Reinhard variant leaves of the colour cues between classes, and of another lab's stain.

Two measurements on synthetic patches, no training (a minute on one core):

* **Class cues.** On default-look training patches whose true mask is one tissue class, a
  nearest-class-mean rule (leave-one-out) on each patch's LAB channel means and standard deviations
  (standardised): how well the colour statistics alone tell the classes apart, before and after each
  normalisation. Full Reinhard gives every patch the target's spread, so what the spread told is gone.
* **Stain left over.** The same tissue drawn in each stain/scanner look (`wsss synth --look`) and in
  the default look, both normalised: the mean absolute difference in grey levels per pixel.

    python bench/stain_cues.py --root runs/stain-cues
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from wsss.data import stain
from wsss.data.png import read_mask
from wsss.data.synth import generate, resolve_look

VARIANTS = ("none", "reinhard", "reinhard-mean")
LOOKS = ("lab-b", "pale", "dark", "jpeg", "blur")


def normalised(image: np.ndarray, target: stain.StainNorm | None) -> np.ndarray:
    return image if target is None else target.transform(image)


def class_cue_accuracy(features: np.ndarray, labels: np.ndarray) -> float:
    """Leave-one-out nearest-class-mean accuracy on standardised ``features``."""
    f = (features - features.mean(0)) / (features.std(0) + 1e-9)
    classes = np.unique(labels)
    right = 0
    for i in range(len(f)):
        rest = np.ones(len(f), bool)
        rest[i] = False
        means = np.stack([f[rest & (labels == c)].mean(0) for c in classes])
        right += classes[np.argmin(((means - f[i]) ** 2).sum(1))] == labels[i]
    return right / len(f)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("runs/stain-cues"))
    parser.add_argument("--patches", type=int, default=600, help="default-look training patches")
    parser.add_argument("--size", type=int, default=112)
    args = parser.parse_args()
    folders = {}
    for look in ("default", *LOOKS):
        folders[look] = args.root / look
        if not (folders[look] / "synth.json").is_file():
            n = args.patches if look == "default" else min(args.patches, 120)
            generate(folders[look], n_train=n, n_val=1, n_test=1, size=args.size, seed=0, workers=1, progress=False,
                     look=resolve_look(look))
    paths = sorted((folders["default"] / "train").glob("*.png"))
    targets = {v: None if v == "none" else stain.fit_training_set(v, paths, None) for v in VARIANTS}

    features: dict[str, list] = {v: [] for v in VARIANTS}
    labels = []
    for path in paths:
        classes = np.unique(read_mask(folders["default"] / "train_gt" / path.name))
        if len(classes) != 1 or classes[0] >= 4:
            continue
        image = np.asarray(Image.open(path).convert("RGB"))
        try:
            outs = {v: normalised(image, t) for v, t in targets.items()}
            stats = {v: np.concatenate(stain.reinhard_fit(o)) for v, o in outs.items()}
        except stain.FitFailed:
            continue
        for v in VARIANTS:
            features[v].append(stats[v])
        labels.append(int(classes[0]))
    labels_a = np.array(labels)
    print(f"class cues: {len(labels)} single-class patches, nearest-class-mean accuracy on LAB means and spreads")
    for v in VARIANTS:
        print(f"  {v:14s} {class_cue_accuracy(np.stack(features[v]), labels_a):.3f}")

    print("stain left over: mean |default - look| in grey levels, both normalised (100 patches)")
    print("  " + " " * 14 + "".join(f"{look:>8s}" for look in LOOKS))
    for v, target in targets.items():
        cells = []
        for look in LOOKS:
            diffs = []
            for path in paths[:100]:
                a = np.asarray(Image.open(path).convert("RGB"))
                b = np.asarray(Image.open(folders[look] / "train" / path.name).convert("RGB"))
                try:
                    diffs.append(np.abs(normalised(a, target).astype(float) - normalised(b, target).astype(float)).mean())
                except stain.FitFailed:
                    continue
            cells.append(f"{np.mean(diffs):8.1f}")
        print(f"  {v:14s}" + "".join(cells))


if __name__ == "__main__":
    main()
