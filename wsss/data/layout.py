"""Where things live in a dataset folder, and listing the samples of each split.

Both LUAD-HistoSeg and BCSS-WSSS use (and so does any dataset given by a spec file)::

    ROOT/train/*.png                 labels in the file names (or in the spec's label CSV)
    ROOT/val/img, ROOT/val/mask      (some copies call it valid/)
    ROOT/test/img, ROOT/test/mask
    ROOT/train_PM/PM_<layer>/*.png   pseudo-masks written by ``wsss generate-pm``
    ROOT/train_gt/*.png              synthetic data only: true masks of the training patches

``scan_*`` functions collect problems instead of raising, for ``wsss check-data``; ``list_*``
functions raise :class:`WsssError` on the first problem, for the training stages.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from wsss.data.labels import parse_label, read_label_csv
from wsss.data.specs import DatasetSpec
from wsss.errors import WsssError

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"})

_SPLIT_ALIASES = {
    "train": ("train", "training"),
    "val": ("val", "valid", "validation"),
    "test": ("test",),
}


@dataclass(frozen=True)
class TrainSample:
    """A training patch and its multi-hot label from the file name."""

    path: Path
    label: tuple[int, ...]


@dataclass(frozen=True)
class MaskedSample:
    """An evaluation patch and its class-index mask."""

    image: Path
    mask: Path


@dataclass
class Scan:
    """Samples found in a split plus every problem met on the way (empty when all is well)."""

    samples: list = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def raise_if_problems(self) -> None:
        if self.problems:
            more = f" (and {len(self.problems) - 1} more problems)" if len(self.problems) > 1 else ""
            raise WsssError(self.problems[0] + more)


def list_images(folder: Path) -> list[Path]:
    """Image files directly inside ``folder``, sorted by name (hidden and temp files skipped)."""
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
    )


def split_dir(root: Path, split: str) -> Path | None:
    """The folder of ``split`` under ``root`` (accepting aliases such as ``valid/``), or None."""
    for name in _SPLIT_ALIASES.get(split, (split,)):
        candidate = Path(root) / name
        if candidate.is_dir():
            return candidate
    return None


def _require_root(root: Path) -> None:
    if not Path(root).is_dir():
        raise WsssError(f"dataset folder not found: {root}")


def train_image_dir(root: Path) -> Path | None:
    """``ROOT/train`` (or ``ROOT/train/img`` in copies that nest the images one level deeper)."""
    folder = split_dir(root, "train")
    if folder is not None and not list_images(folder) and (folder / "img").is_dir():
        return folder / "img"
    return folder


def scan_train(root: Path, spec: DatasetSpec | int) -> Scan:
    """Training patches with their labels; every bad or missing label becomes a problem.

    Labels come from exactly one source: the spec's label CSV when it names one (then the file names
    are not read for labels), else the file names. ``spec`` may be a class count: file-name labels.
    """
    _require_root(root)
    scan = Scan()
    folder = train_image_dir(root)
    if folder is None:
        scan.problems.append(f"missing training folder: {Path(root) / 'train'}")
        return scan
    images = list_images(folder)
    csv_path = spec.labels_csv_path(root) if isinstance(spec, DatasetSpec) else None
    if csv_path is not None:
        _labels_from_csv(scan, images, csv_path, spec, folder)
    else:
        num_classes = spec.num_classes if isinstance(spec, DatasetSpec) else spec
        for path in images:
            try:
                scan.samples.append(TrainSample(path, parse_label(path.name, num_classes)))
            except WsssError as exc:
                scan.problems.append(str(exc))
    if not scan.samples and not scan.problems:
        scan.problems.append(f"no images in {folder}")
    return scan


def _labels_from_csv(scan: Scan, images: list[Path], csv_path: Path, spec: DatasetSpec, folder: Path) -> None:
    """Fill ``scan`` from a label CSV: images it does not list, and files it lists that are not in
    ``folder``, are problems naming them."""
    try:
        labels = read_label_csv(csv_path, spec.classes)
    except WsssError as exc:
        scan.problems.append(str(exc))
        return
    found = {p.name for p in images}
    for path in images:
        if path.name in labels:
            scan.samples.append(TrainSample(path, labels[path.name]))
        else:
            scan.problems.append(f"no label for {path.name}: it is not listed in {csv_path}")
    for name in labels:
        if name not in found:
            scan.problems.append(f"{name} is listed in {csv_path} but missing from {folder}")


def scan_masked(root: Path, split: str) -> Scan:
    """``img/`` + ``mask/`` pairs of an evaluation split, matched by file stem."""
    _require_root(root)
    scan = Scan()
    folder = split_dir(root, split)
    if folder is None:
        scan.problems.append(f"missing {split} folder: {Path(root) / split}")
        return scan
    img_dir, mask_dir = folder / "img", folder / "mask"
    for sub in (img_dir, mask_dir):
        if not sub.is_dir():
            scan.problems.append(f"missing folder: {sub}")
    if scan.problems:
        return scan
    masks = {p.stem: p for p in list_images(mask_dir)}
    for image in list_images(img_dir):
        mask = masks.pop(image.stem, None)
        if mask is None:
            scan.problems.append(f"image without mask: {image}")
        else:
            scan.samples.append(MaskedSample(image, mask))
    for mask in masks.values():
        scan.problems.append(f"mask without image: {mask}")
    if not scan.samples and not scan.problems:
        scan.problems.append(f"no images in {img_dir}")
    return scan


def has_masks(root: Path, split: str) -> bool:
    """Whether ``split`` comes with pixel masks: its folder holds ``mask/``. A dataset of labelled
    training patches alone (or with val/test patches but no masks) trains all the same; what needs
    masks (mIoU, the best-on-val choice) is left out. A ``mask/`` folder that does not match ``img/``
    is a problem :func:`scan_masked` reports."""
    folder = split_dir(root, split)
    return folder is not None and (folder / "mask").is_dir()


def masked_splits(root: Path, splits: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """Those of ``splits`` that have masks (:func:`has_masks`), in order."""
    return tuple(s for s in splits if has_masks(root, s))


def without_masks(root: Path, splits: tuple[str, ...] | list[str], left_out: str) -> str | None:
    """One line saying which of ``splits`` have no masks in ``root`` and what is ``left_out`` for
    that; None when all have masks."""
    missing = [s for s in splits if not has_masks(root, s)]
    if not missing:
        return None
    where = " or ".join(f"{Path(root) / s}/mask" for s in missing)
    return f"no masks in {where}: {left_out}"


def list_train(root: Path, spec: DatasetSpec | int) -> list[TrainSample]:
    """Like :func:`scan_train` but raises on the first problem."""
    scan = scan_train(root, spec)
    scan.raise_if_problems()
    return scan.samples


def list_masked(root: Path, split: str) -> list[MaskedSample]:
    """Like :func:`scan_masked` but raises on the first problem."""
    scan = scan_masked(root, split)
    scan.raise_if_problems()
    return scan.samples


def pseudo_mask_path(pm_dir: Path, layer: str, image: Path) -> Path:
    """Where the pseudo-mask of training ``image`` for ``layer`` lives: ``PM_DIR/PM_<layer>/<name>.png``.

    The name keeps the image's stem (brackets and spaces included) with a ``.png`` suffix.
    """
    return Path(pm_dir) / f"PM_{layer}" / f"{image.stem}.png"


def default_pm_dir(root: Path) -> Path:
    return Path(root) / "train_PM"


def train_gt_dir(root: Path) -> Path:
    return Path(root) / "train_gt"
