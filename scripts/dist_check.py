"""`make dist-check`'s last step, run by the Python of a fresh venv that has only the built wsss (and
its dependencies) installed, from a folder outside the source tree: the package imports from its
install, its spec files are there, and `wsss predict` runs on a tiny untrained model.

Usage: python dist_check.py WORK_FOLDER  (the wsss command of the same venv must be on PATH)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import wsss
from wsss.config import Stage2Config
from wsss.data.specs import LUAD, get_spec
from wsss.models.deeplab import DeepLabArch, DeepLabV3Plus
from wsss.runtime import save_checkpoint
from wsss.stages import stage2


def main(work: Path) -> None:
    here = Path(wsss.__file__).resolve()
    assert "site-packages" in here.parts, f"wsss imported from {here}, not from the installed package"
    assert get_spec("bcss").name == "bcss"  # the spec TOML files are package data
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = DeepLabV3Plus(DeepLabArch("resnet18", 16, 4, 8))
    cfg = Stage2Config(dataset="luad", data=Path("."), backbone="resnet18", head_channels=8, image_size=32)
    save_checkpoint(work / "s2.pth", stage2.checkpoint_state(model, cfg, LUAD, 0, {}))
    rng = np.random.default_rng(0)
    Image.fromarray((rng.integers(0, 60, (96, 80, 3)) + [170, 40, 150]).astype(np.uint8)).save(work / "a.png")
    subprocess.run(["wsss", "predict", str(work / "a.png"), "--checkpoint", str(work / "s2.pth"), "--out",
                    str(work / "out"), "--tile", "64", "--device", "cpu", "--save-probs"], check=True)
    mask = np.asarray(Image.open(work / "out" / "a_mask.png"))
    result = wsss.load_model(work / "s2.pth", device="cpu", tile=64).predict(work / "a.png")
    assert mask.shape == (96, 80) and np.array_equal(result.labels, mask)
    print(f"dist-check: wsss {wsss.__version__} from {here.parent}: predict and the API agree on a 96×80 image")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
