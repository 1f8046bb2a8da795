"""``--stain-norm reinhard-set`` in the stain transfer matrix, without training anything again.

A chain trained with ``--stain-norm reinhard-set`` trains exactly as one trained with ``none``: the
training set is its own colour reference, shifted by zero (tests/cli/test_stain_set.py checks the
weights are identical). So the ``none`` configuration's models of a ``bench/stain_transfer.py`` root,
given the colour reference that training would have recorded (the training set's mean LAB, fitted
here by the same function), *are* the ``reinhard-set`` models. Each is scored with ``wsss evaluate
--gate`` on every look's test split, which measures that split's colour and shifts it onto the
reference (the real code path, nothing copied or pre-shifted here).

    python bench/colour_alignment.py --root runs/stain-task1 --seeds 0,1,2

Writes ROOT/runs/reinhard-set/seed<K>/ (the two checkpoints and eval/<look>.json), adds the
``reinhard-set`` rows to ROOT/transfer.json and rewrites ROOT/transfer.md.
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

NAME = "reinhard-set"


def with_reference(src: Path, dst: Path, train: list[Path]) -> Path:
    """``src`` (a checkpoint trained without a stain option) as trained with ``--stain-norm reinhard-set``:
    the colour reference of its training set recorded, nothing else changed."""
    if dst.is_file():
        return dst
    ckpt = load_checkpoint(src)
    if ckpt["input_norm"].get("stain") or ckpt["config"].get("stain_norm", "none") != "none":
        sys.exit(f"{src} was trained with a stain option; only the none configuration's models can be used")
    target = stain.fit_training_set(NAME, train, ckpt.get("image_size"))
    ckpt["input_norm"]["stain"] = target.to_dict()
    ckpt["config"]["stain_norm"] = NAME
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(dst, ckpt)
    return dst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, required=True, help="a bench/stain_transfer.py root")
    parser.add_argument("--seeds", default="0", help="seeds of its none configuration, comma-separated")
    args = parser.parse_args()
    data = args.root / "data"
    folders = {look: data / look for look in LOOKS}
    train = [s.path for s in list_train(folders["default"], LUAD)]
    results_path = args.root / "transfer.json"
    results = json.loads(results_path.read_text())
    log = args.root / "log.txt"
    for seed in (int(s) for s in args.seeds.split(",")):
        none = args.root / "runs" / "none" / f"seed{seed}"
        run = args.root / "runs" / NAME / f"seed{seed}"
        s1 = with_reference(none / "stage1" / "stage1_checkpoint_trained_on_luad.pth",
                            run / "stage1" / "stage1_checkpoint_trained_on_luad.pth", train)
        s2 = with_reference(none / "stage2" / "stage2_checkpoint_trained_on_luad.pth",
                            run / "stage2" / "stage2_checkpoint_trained_on_luad.pth", train)
        results.setdefault(NAME, {})[str(seed)] = evaluate(run, s1, s2, folders, log)
        results_path.write_text(json.dumps(results, indent=2) + "\n")
        print(f"{NAME} seed {seed}: " + ", ".join(f"{k} {v['gate']:.3f}" for k, v in results[NAME][str(seed)].items()),
              flush=True)
    order = [*CONFIGS, NAME]
    text = table({name: results[name] for name in order if name in results})
    md = args.root / "transfer.md"
    settings = md.read_text().split("\n\n")[0] if md.is_file() else ""
    md.write_text(f"{settings}\n\n{text}\n")
    print(text)


if __name__ == "__main__":
    main()
