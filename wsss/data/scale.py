"""Magnification: the µm per pixel of a dataset's patches and their size in pixels.

A model sees tissue at the scale of the patches it was trained on, so both travel with it: every
checkpoint records ``mpp`` (µm per pixel of its training patches) and ``patch_size`` (their side in
pixels), and ``wsss predict`` / ``predict-wsi`` resample images and slides to that ``mpp`` and use
windows of that size unless told otherwise.

A dataset's µm/px is, the first one found:

1. the spec's ``mpp`` (a TOML spec file may set it);
2. ``DATA/dataset.json``'s ``mpp`` (written by ``wsss extract-patches``);
3. ``DATA/synth.json``'s ``mpp`` (written by ``wsss synth``: the pixel size the tissue is drawn at).

Two of them that disagree by more than :data:`MPP_TOLERANCE` are a user error: the patches cannot
be at both.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from wsss.data.specs import MPP_RANGE, DatasetSpec
from wsss.errors import WsssError

MPP_TOLERANCE = 0.05
"""Two pixel sizes within 5% of each other count as the same magnification (scanners of one nominal
objective differ by about that much: 0.2425 to 0.2527 µm/px at 40×); a slide level that close to the
wanted µm/px is read as it is."""

DATASET_JSON = "dataset.json"
"""Written last into a folder by ``wsss extract-patches``: the dataset's µm/px, patch size, slides, counts."""
SYNTH_JSON = "synth.json"


def same_mpp(a: float, b: float, tolerance: float = MPP_TOLERANCE) -> bool:
    """Whether pixel sizes ``a`` and ``b`` are within ``tolerance`` (relative) of each other."""
    return max(a, b) <= min(a, b) * (1 + tolerance)


def _recorded_mpp(path: Path) -> float | None:
    """The ``mpp`` of a dataset's JSON record, or None when the file or the entry is absent."""
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8")).get("mpp")
    except (OSError, ValueError, AttributeError) as exc:
        raise WsssError(f"cannot read {path}: {exc}") from None
    if value is None:
        return None
    lo, hi = MPP_RANGE
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not lo <= value <= hi:
        raise WsssError(f"{path}: mpp must be µm per pixel, a number from {lo:g} to {hi:g}, not {value!r}")
    return float(value)


def dataset_mpp(spec: DatasetSpec, root: str | Path) -> float | None:
    """The µm/px of the patches in ``root`` (module doc: the spec, then ``dataset.json``, then
    ``synth.json``); None when nothing says. Sources that disagree are a user error naming both."""
    found = [(f"the spec {spec.source or spec.name}", spec.mpp)]
    found += [(str(Path(root) / name), _recorded_mpp(Path(root) / name)) for name in (DATASET_JSON, SYNTH_JSON)]
    found = [(where, mpp) for where, mpp in found if mpp is not None]
    for where, mpp in found[1:]:
        if not same_mpp(mpp, found[0][1]):
            raise WsssError(f"{found[0][0]} says the patches are at {found[0][1]:g} µm/px, {where} says {mpp:g}: "
                            "correct the one that is wrong")
    return found[0][1] if found else None


def training_patch_size(root: str | Path) -> int | None:
    """The side in pixels of the training patches in ``root`` (the first one's; the shorter side of a
    patch that is not square), or None when there are none."""
    from PIL import Image

    from wsss.data.layout import list_images, train_image_dir

    folder = train_image_dir(Path(root)) if Path(root).is_dir() else None
    images = list_images(folder) if folder is not None else []
    if not images:
        return None
    try:
        with Image.open(images[0]) as img:
            return min(img.size)
    except OSError:
        return None  # an unreadable patch is reported by the checks that read them all


def dataset_scale(spec: DatasetSpec, root: str | Path) -> dict[str, Any]:
    """``{"mpp", "patch_size"}`` of the dataset in ``root``: what a checkpoint trained on it records."""
    return {"mpp": dataset_mpp(spec, root), "patch_size": training_patch_size(root)}


def recorded_scale(ckpt: Mapping[str, Any]) -> tuple[float | None, int | None]:
    """``(mpp, patch_size)`` recorded in a checkpoint; None for what it does not record (checkpoints
    older than these records, published weights)."""
    mpp, patch = ckpt.get("mpp"), ckpt.get("patch_size")
    mpp = float(mpp) if isinstance(mpp, (int, float)) and not isinstance(mpp, bool) and mpp > 0 else None
    patch = int(patch) if isinstance(patch, int) and not isinstance(patch, bool) and patch > 0 else None
    return mpp, patch


def resample_factor(image_mpp: float | None, model_mpp: float | None) -> float | None:
    """Model pixels per image pixel (``image_mpp / model_mpp``); 1 when the two are within
    :data:`MPP_TOLERANCE`; None when either is unknown."""
    if image_mpp is None or model_mpp is None:
        return None
    return 1.0 if same_mpp(image_mpp, model_mpp) else image_mpp / model_mpp


def resampled_size(size: tuple[int, int], factor: float) -> tuple[int, int]:
    """``(w, h)`` of a ``size`` image resampled by ``factor``, at least 1 px a side."""
    return tuple(max(1, int(math.floor(side * factor + 0.5))) for side in size)


def image_side(model_side: int, factor: float | None) -> int:
    """The image pixels a window of ``model_side`` model pixels covers when the image is resampled by
    ``factor`` (model pixels per image pixel; None: as it is)."""
    return max(1, round(model_side / factor)) if factor else model_side
