"""``--stain-norm reinhard-set`` in the stain transfer matrix, without training anything again.

A chain trained with ``--stain-norm reinhard-set`` trains exactly as one trained without it: the
training set is its own colour reference, shifted by zero (tests/cli/test_stain_set.py checks the
weights are identical). So the models of a ``bench/stain_transfer.py`` configuration without a stain
normalisation (``none``, ``scanner``, ...), given the colour reference that training would have
recorded (the training set's mean LAB, fitted here by the same function), *are* the models of
``reinhard-set`` plus that configuration's options. Each is scored with ``wsss evaluate
--gate`` on every look's test split, which measures that split's colour and shifts it onto the
reference (the real code path, nothing copied or pre-shifted here).

    python bench/colour_alignment.py --root runs/stain-task1 --seeds 0,1,2
    python bench/colour_alignment.py --root runs/stain-task1 --config scanner   # reinhard-set+scanner

Writes ROOT/runs/<name>/seed<K>/ (the two checkpoints and eval/<look>.json; name ``reinhard-set``, or
``reinhard-set+<config>``), adds its rows to ROOT/transfer.json and rewrites ROOT/transfer.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from stain_transfer import CONFIGS, LOOKS, evaluate, table  # noqa: E402

from wsss.data import stain  # noqa: E402
from wsss.data.layout import list_train  # noqa: E402
from wsss.data.specs import LUAD  # noqa: E402
from wsss.runtime import load_checkpoint, save_checkpoint  # noqa: E402

METHOD = "reinhard-set"


def with_reference(src: Path, dst: Path, train: list[Path]) -> Path:
    """``src`` (a checkpoint trained without a stain option) as trained with ``--stain-norm reinhard-set``:
    the colour reference of its training set recorded, nothing else changed."""
    if dst.is_file():
        return dst
    if not src.is_file():
        sys.exit(f"{src} is missing: run bench/stain_transfer.py with that configuration and seed first")
    ckpt = load_checkpoint(src)
    if ckpt["input_norm"].get("stain") or ckpt["config"].get("stain_norm", "none") != "none":
        sys.exit(f"{src} was trained with a stain normalisation; only configurations without one can be used")
    target = stain.fit_training_set(METHOD, train, ckpt.get("image_size"))
    ckpt["input_norm"]["stain"] = target.to_dict()
    ckpt["config"]["stain_norm"] = METHOD
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(dst, ckpt)
    return dst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, required=True, help="a bench/stain_transfer.py root")
    parser.add_argument("--seeds", default="0", help="seeds of the configuration, comma-separated")
    parser.add_argument("--config", default="none", help="a configuration of that root without a stain normalisation")
    args = parser.parse_args()
    name = METHOD if args.config == "none" else f"{METHOD}+{args.config}"
    data = args.root / "data"
    if not (args.root / "transfer.json").is_file():
        sys.exit(f"{args.root} is not a bench/stain_transfer.py root (no transfer.json): run that first")
    folders = {look: data / look for look in LOOKS}
    train = [s.path for s in list_train(folders["default"], LUAD)]
    results_path = args.root / "transfer.json"
    results = json.loads(results_path.read_text())
    log = args.root / "log.txt"
    for seed in (int(s) for s in args.seeds.split(",")):
        source = args.root / "runs" / args.config / f"seed{seed}"
        run = args.root / "runs" / name / f"seed{seed}"
        s1 = with_reference(source / "stage1" / "stage1_checkpoint_trained_on_luad.pth",
                            run / "stage1" / "stage1_checkpoint_trained_on_luad.pth", train)
        s2 = with_reference(source / "stage2" / "stage2_checkpoint_trained_on_luad.pth",
                            run / "stage2" / "stage2_checkpoint_trained_on_luad.pth", train)
        results.setdefault(name, {})[str(seed)] = evaluate(run, s1, s2, folders, log)
        results_path.write_text(json.dumps(results, indent=2) + "\n")
        print(f"{name} seed {seed}: " + ", ".join(f"{k} {v['gate']:.3f}" for k, v in results[name][str(seed)].items()),
              flush=True)
    order = [*CONFIGS, *sorted(k for k in results if k not in CONFIGS)]
    text = table({k: results[k] for k in order if k in results})
    md = args.root / "transfer.md"
    settings = md.read_text().split("\n\n")[0] if md.is_file() else ""
    md.write_text(f"{settings}\n\n{text}\n")
    print(text)


if __name__ == "__main__":
    main()
