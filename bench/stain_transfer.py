"""The stain transfer matrix: trained on the default synthetic look, tested on each stain/scanner look.

For every configuration (training options per stage: none, a stain normalisation, an augmentation)
and training seed, the `cpu` preset chain is trained on the default look (train-stage1,
generate-pm, train-stage2 with the gate), then `wsss evaluate --gate` scores the stage-2 model on the
test split of every look of `wsss synth` that changes stain or scanner only (lab-b, pale, dark, jpeg,
blur), whose test patches show exactly the tissue and masks of the default look's test patches.

    python bench/stain_transfer.py --root runs/stain                              # the defaults below
    python bench/stain_transfer.py --root runs/stain --seeds 0,1,2 --configs none,macenko
    python bench/stain_transfer.py --root runs/stain --counts 1000,100,100 --size 224  # make reproduce's data
    python bench/stain_transfer.py --root runs/stain-task1 --task-seed 1 --mpp 1 --counts 800,60,80  # a random task

Every step is a `wsss` command whose outputs are kept: rerunning skips what is done (delete a run's
folder to redo it). Writes ROOT/transfer.json and ROOT/transfer.md (stage 2 + gate test mIoU: mean
over seeds, worst seed in brackets; the drop from the configuration's own default-look score).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

LOOKS = ("default", "lab-b", "pale", "dark", "jpeg", "blur")

NORM = {m: ["--stain-norm", m] for m in ("macenko", "reinhard", "reinhard-mean", "reinhard-set")}
HED = ["--hed-scale", "0.3", "--hed-shift", "0.05"]
SCANNER = ["--light-jitter", "0.15", "--blur-jitter", "1.5", "--jpeg-jitter", "40"]
AUG = [*HED, "--lab-jitter", "1", *SCANNER]
BLUR_JPEG = ["--blur-jitter", "1.5", "--jpeg-jitter", "40"]  # the scanner's sharpness and compression, no light

# Training options per configuration: (stage 1, stage 2). A stain target is each model's own; a "2"
# suffix means the augmentation is given to stage 2 only (strong augmentation keeps the thin stage-1
# classifier from fitting its labels in 12 epochs: `aug` on both stages measured label accuracy 0.85).
# Every configuration starts from none of these (whatever the preset turns on), then adds its own.
NEUTRAL = ["--stain-norm", "none", "--stain-jitter", "0", "--hed-scale", "0", "--hed-shift", "0", "--lab-jitter", "0",
           "--light-jitter", "0", "--blur-jitter", "0", "--jpeg-jitter", "0"]
CONFIGS: dict[str, tuple[list[str], list[str]]] = {
    "none": ([], []),
    "macenko": (NORM["macenko"], NORM["macenko"]),
    "reinhard": (NORM["reinhard"], NORM["reinhard"]),
    "hed": (HED, HED),
    "randstain": (["--lab-jitter", "1"], ["--lab-jitter", "1"]),
    "scanner": (SCANNER, SCANNER),
    "aug": (AUG, AUG),
    "macenko+scanner": (NORM["macenko"] + SCANNER, NORM["macenko"] + SCANNER),
    "reinhard+scanner": (NORM["reinhard"] + SCANNER, NORM["reinhard"] + SCANNER),
    "scanner2": ([], SCANNER),
    "aug2": ([], AUG),
    "reinhard+scanner2": (NORM["reinhard"], NORM["reinhard"] + SCANNER),
    "macenko+scanner2": (NORM["macenko"], NORM["macenko"] + SCANNER),
    "reinhard-mean": (NORM["reinhard-mean"], NORM["reinhard-mean"]),
    "reinhard-mean+scanner": (NORM["reinhard-mean"] + SCANNER, NORM["reinhard-mean"] + SCANNER),
    "reinhard-mean+scanner2": (NORM["reinhard-mean"], NORM["reinhard-mean"] + SCANNER),
    # trains exactly as none: bench/colour_alignment.py scores it on none's weights without training
    "reinhard-set": (NORM["reinhard-set"], NORM["reinhard-set"]),
    "reinhard-set+blur-jpeg": (NORM["reinhard-set"] + BLUR_JPEG, NORM["reinhard-set"] + BLUR_JPEG),
    # the gate's classifier sees blur and JPEG, the segmenter JPEG only (blur costs it texture cues)
    "reinhard-set+blur-jpeg1+jpeg2": (NORM["reinhard-set"] + BLUR_JPEG, NORM["reinhard-set"] + ["--jpeg-jitter", "40"]),
    # milder: the gate's classifier needs blur only (JPEG does not fool it), σ up to 1 px (the blur look's
    # 1.5 px at 224 px is 0.75 px at 112); the segmenter JPEG
    "reinhard-set+blur1+jpeg2": (NORM["reinhard-set"] + ["--blur-jitter", "1"],
                                 NORM["reinhard-set"] + ["--jpeg-jitter", "40"]),
}


def wsss(args: list, log: Path) -> None:
    """Run ``python -m wsss ARGS``, its output appended to ``log``; a failure stops the bench."""
    cmd = [sys.executable, "-m", "wsss", *map(str, args)]
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(cmd[2:])}\n")
        f.flush()
        started = time.perf_counter()
        # one torch thread per process unless told otherwise: on a shared 2-core machine two OpenMP threads
        # mostly wait on each other, and CPU training is deterministic for a given thread count
        env = {"OMP_NUM_THREADS": "1", **os.environ, "PYTHONUNBUFFERED": "1"}
        code = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
        f.write(f"[exit {code}, {time.perf_counter() - started:.0f} s]\n")
    if code != 0:
        sys.exit(f"failed ({code}): {' '.join(map(str, args))}; see {log}")


def make_data(root: Path, counts: tuple[int, int, int], size: int, data_seed: int, log: Path,
              task: list[str] = ()) -> dict[str, Path]:
    """The default look with all splits, every other look with its test split (same seed and task: same
    tissue); ``task``: ``wsss synth`` options of a random task (``--task-seed K --mpp M``)."""
    folders = {}
    for look in LOOKS:
        folder = root / "data" / look
        folders[look] = folder
        if (folder / "synth.json").is_file():
            continue
        train, val, test = counts if look == "default" else (1, 1, counts[2])
        wsss(["synth", folder, "--look", look, "--train", train, "--val", val, "--test", test, "--size", size,
              "--seed", data_seed, *task, "--workers", 2, "--force"], log)
    return folders


def train_chain(run: Path, data: Path, options: tuple[list[str], list[str]], seed: int, precision: list[str],
                log: Path) -> tuple[Path, Path]:
    """Stage 1, pseudo-masks and stage 2 (cpu preset) of one configuration (its options per stage) and
    seed; returns the checkpoints."""
    s1 = run / "stage1" / "stage1_checkpoint_trained_on_luad.pth"
    s2 = run / "stage2" / "stage2_checkpoint_trained_on_luad.pth"
    common = ["--dataset", "luad", "--data", data, "--preset", "cpu", "--seed", seed, *precision]
    if not s1.is_file():
        wsss(["train-stage1", *common, "--out", run / "stage1", "--force", *NEUTRAL, *options[0]], log)
    if not (run / "report" / "metrics.json").is_file():
        wsss(["generate-pm", "--data", data, "--checkpoint", s1, "--out", run / "pm", "--preset", "cpu",
              "--workers", 0], log)
        wsss(["train-stage2", *common, "--out", run / "stage2", "--report", run / "report", "--pm-dir", run / "pm",
              "--stage1-checkpoint", s1, "--gate", "--force", *NEUTRAL, *options[1]], log)
    return s1, s2


def evaluate(run: Path, s1: Path, s2: Path, folders: dict[str, Path], log: Path) -> dict[str, dict]:
    """``{look: {"stage2": mIoU, "gate": mIoU}}`` on each look's test split."""
    scores = {}
    for look, folder in folders.items():
        out = run / "eval" / f"{look}.json"
        if not out.is_file():
            out.parent.mkdir(parents=True, exist_ok=True)
            wsss(["evaluate", "--data", folder, "--checkpoint", s2, "--gate", "--stage1-checkpoint", s1,
                  "--split", "test", "--json", out], log)
        metrics = json.loads(out.read_text())
        scores[look] = {"stage2": metrics["test"]["mIoU"], "gate": metrics["test_gate"]["mIoU"]}
    return scores


def table(results: dict) -> str:
    """Markdown: one row per configuration, one column per look (gate mIoU, mean (worst) over seeds),
    then the mean and worst drop from the configuration's own default-look score."""
    lines = ["| configuration | " + " | ".join(LOOKS) + " | mean drop | worst drop |",
             "|---|" + "---:|" * (len(LOOKS) + 2)]
    for name, per_seed in results.items():
        cells, drops = [], []
        for look in LOOKS:
            values = [s[look]["gate"] for s in per_seed.values()]
            cells.append(f"{sum(values) / len(values):.3f} ({min(values):.3f})" if len(values) > 1
                         else f"{values[0]:.3f}")
            if look != "default":
                drops += [s["default"]["gate"] - s[look]["gate"] for s in per_seed.values()]
        mean_drop = sum(drops) / len(drops)
        lines.append(f"| {name} ({len(per_seed)} seed{'s' if len(per_seed) > 1 else ''}) | " + " | ".join(cells)
                     + f" | {mean_drop:.3f} | {max(drops):.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("runs/stain"))
    parser.add_argument("--seeds", default="0", help="training seeds, comma-separated")
    parser.add_argument("--configs", default="none,macenko,reinhard,aug", help=f"of {', '.join(CONFIGS)}")
    parser.add_argument("--counts", default="1000,60,80", help="train,val,test patches of the synthetic data")
    parser.add_argument("--size", type=int, default=112, help="patch side of the synthetic data")
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--task-seed", type=int, help="a random task (wsss synth --task-seed) instead of the "
                        "fixed textures: tissue no preset was tuned to, in every look")
    parser.add_argument("--mpp", type=float, help="µm/px of the synthetic patches (wsss synth --mpp)")
    parser.add_argument("--precision", help="fp32, bf16, ... for both stages (default: the preset's, auto: bf16 "
                        "where the CPU has it natively, else fp32)")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    configs = args.configs.split(",")
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        sys.exit(f"unknown configuration(s) {unknown}; choose from {', '.join(CONFIGS)}")
    counts = tuple(int(c) for c in args.counts.split(","))
    root = args.root
    root.mkdir(parents=True, exist_ok=True)
    log = root / "log.txt"
    task = [*(["--task-seed", args.task_seed] if args.task_seed is not None else []),
            *(["--mpp", args.mpp] if args.mpp is not None else [])]
    folders = make_data(root, counts, args.size, args.data_seed, log, task)
    from wsss.runtime import atomic_path

    results_path = root / "transfer.json"
    for name in configs:
        for seed in seeds:
            run = root / "runs" / name / f"seed{seed}"
            started = time.perf_counter()
            precision = ["--precision", args.precision] if args.precision else []
            s1, s2 = train_chain(run, folders["default"], CONFIGS[name], seed, precision, log)
            scores = evaluate(run, s1, s2, folders, log)
            # read again just before writing: another invocation on the same root (other seeds or
            # configurations, run beside this one) may have added its results since this one started
            results = json.loads(results_path.read_text()) if results_path.is_file() else {}
            results.setdefault(name, {})[str(seed)] = scores
            with atomic_path(results_path, owned=False) as tmp:
                tmp.write_text(json.dumps(results, indent=2) + "\n")
            print(f"{name} seed {seed}: " + ", ".join(f"{k} {v['gate']:.3f}" for k, v in results[name][str(seed)].items())
                  + f" ({time.perf_counter() - started:.0f} s)", flush=True)
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    ordered = {name: results[name] for name in CONFIGS if name in results}
    text = table(ordered)
    settings = (f"synthetic data {args.counts} at {args.size} px (seed {args.data_seed}"
                f"{'' if args.task_seed is None else f', task {args.task_seed}'}"
                f"{'' if args.mpp is None else f', {args.mpp} µm/px'}), cpu preset"
                f"{f' --precision {args.precision}' if args.precision else ''}; stage 2 + gate test mIoU, mean (worst) over seeds")
    (root / "transfer.md").write_text(f"{settings}\n\n{text}\n")
    print(settings)
    print(text)


if __name__ == "__main__":
    main()
