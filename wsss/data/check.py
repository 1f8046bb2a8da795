"""``wsss check-data``: look at every file of a dataset and list what is wrong with it."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from wsss.data.layout import masked_splits, scan_masked, scan_train, without_masks
from wsss.data.png import read_class_mask, read_rgb
from wsss.data.scale import dataset_mpp
from wsss.data.specs import DatasetSpec
from wsss.data.validate import allowed_label_styles, label_style_problem
from wsss.errors import WsssError


@dataclass
class SplitStats:
    """What one split holds."""

    name: str
    count: int = 0
    label_counts: list[int] | None = None  # train: patches carrying each class
    pixel_counts: list[int] | None = None  # val/test: mask pixels of each class, then of the background
    sizes: Counter = field(default_factory=Counter)  # (width, height) -> patches


@dataclass
class CheckReport:
    splits: list[SplitStats]
    problems: list[str]
    notes: list[str] = field(default_factory=list)  # facts worth knowing that are not problems
    mpp: float | None = None  # µm per pixel of the patches (wsss.data.scale), None: not recorded

    @property
    def ok(self) -> bool:
        return not self.problems


def _read_image(path: Path, problems: list[str]) -> np.ndarray | None:
    try:
        return read_rgb(path)
    except WsssError as exc:
        problems.append(str(exc))
        return None


def _check_train(root: Path, spec: DatasetSpec, progress: bool) -> tuple[SplitStats, list[str]]:
    scan = scan_train(root, spec)
    stats = SplitStats("train", label_counts=[0] * spec.num_classes)
    problems = list(scan.problems)
    styles = allowed_label_styles(spec)
    for sample in tqdm(scan.samples, desc="train", disable=not progress, leave=False):
        style = label_style_problem(sample.path, styles, spec.name)
        if style:
            problems.append(style)
        image = _read_image(sample.path, problems)
        if image is None:
            continue
        stats.count += 1
        stats.sizes[(image.shape[1], image.shape[0])] += 1
        for c, present in enumerate(sample.label):
            stats.label_counts[c] += present
    return stats, problems


def _check_masked(root: Path, split: str, spec: DatasetSpec, progress: bool) -> tuple[SplitStats, list[str]]:
    scan = scan_masked(root, split)
    values = [*range(spec.num_classes), spec.background_index]
    stats = SplitStats(split, pixel_counts=[0] * len(values))
    problems = list(scan.problems)
    for sample in tqdm(scan.samples, desc=split, disable=not progress, leave=False):
        image = _read_image(sample.image, problems)
        try:
            mask = read_class_mask(sample.mask, spec)  # a value that is not a class or the background is a problem
        except WsssError as exc:
            problems.append(str(exc))
            continue
        if image is None:
            continue
        if image.shape[:2] != mask.shape:
            problems.append(
                f"size mismatch: {sample.image.name} is {image.shape[1]}x{image.shape[0]}, "
                f"its mask {mask.shape[1]}x{mask.shape[0]}"
            )
            continue
        hist = np.bincount(mask.ravel(), minlength=256)
        stats.count += 1
        stats.sizes[(image.shape[1], image.shape[0])] += 1
        for i, v in enumerate(values):
            stats.pixel_counts[i] += int(hist[v])
    return stats, problems


def _size_problems(stats: SplitStats) -> list[str]:
    """Patches of a split are batched together, so one odd size is worth reporting."""
    if len(stats.sizes) <= 1:
        return []
    common, _ = stats.sizes.most_common(1)[0]
    odd = {f"{w}x{h}": n for (w, h), n in stats.sizes.items() if (w, h) != common}
    return [f"{stats.name}: patches differ in size from the common {common[0]}x{common[1]}: {odd}"]


def check_dataset(root: Path, spec: DatasetSpec, progress: bool = True) -> CheckReport:
    """Read every image and mask under ``root`` and collect statistics and problems."""
    root = Path(root)
    if not root.is_dir():
        raise WsssError(f"dataset folder not found: {root}")
    splits, problems = [], []
    notes = [note] if (note := without_masks(root, ("val", "test"), NO_MASKS)) else []
    checks = [_check_train(root, spec, progress)]
    checks += [_check_masked(root, split, spec, progress) for split in masked_splits(root, ("val", "test"))]
    for stats, found in checks:
        splits.append(stats)
        problems += found + _size_problems(stats)
        if stats.count == 0 and not found:
            problems.append(f"{stats.name}: empty split")
    try:
        mpp = dataset_mpp(spec, root)
    except WsssError as exc:
        mpp, problems = None, [*problems, str(exc)]
    return CheckReport(splits, problems, notes, mpp)


NO_MASKS = ("not a problem: training needs labelled patches only, but the mIoU rows and stage 2's best-on-val "
            "choice need masks (it keeps its last epoch instead)")


def format_report(report: CheckReport, spec: DatasetSpec) -> str:
    """Human-readable counts, label frequencies, mask histograms and problems."""
    names = list(spec.classes)
    source = f"labels from {spec.labels_csv}" if spec.labels_csv else "labels from file names"
    lines = [f"dataset {spec.name}: {spec.num_classes} classes ({', '.join(names)}), background value "
             f"{spec.background_index}, {source}, {spec.mask_encoding} masks"]
    lines.append(f"patches at {report.mpp:g} µm/px" if report.mpp is not None else
                 "µm/px of the patches: not recorded (set mpp in the spec: models trained here will not know "
                 "their magnification)")
    for s in report.splits:
        sizes = ", ".join(f"{w}x{h}" for (w, h) in sorted(s.sizes)) or "-"
        lines.append(f"{s.name}: {s.count} patches ({sizes})")
        if s.label_counts is not None and s.count:
            freq = "  ".join(f"{n} {c} ({c / s.count:.1%})" for n, c in zip(names, s.label_counts))
            lines.append(f"  labels: {freq}")
        if s.pixel_counts is not None and sum(s.pixel_counts):
            total = sum(s.pixel_counts)
            hist = "  ".join(
                f"{n} {c / total:.1%}" for n, c in zip(names + ["background"], s.pixel_counts)
            )
            lines.append(f"  mask pixels: {hist}")
    lines += [f"note: {n}" for n in report.notes]
    if report.problems:
        lines.append(f"{len(report.problems)} problem(s):")
        lines += [f"  - {p}" for p in report.problems]
    else:
        lines.append("no problems found")
    return "\n".join(lines)


def report_to_json(report: CheckReport, spec: DatasetSpec) -> dict:
    return {
        "dataset": spec.name,
        "spec": spec.to_dict(),
        "ok": report.ok,
        "mpp": report.mpp,
        "splits": {
            s.name: {
                "count": s.count,
                "sizes": {f"{w}x{h}": n for (w, h), n in sorted(s.sizes.items())},
                **({"label_counts": dict(zip(spec.classes, s.label_counts))} if s.label_counts else {}),
                **(
                    {"mask_pixels": dict(zip([*spec.classes, "background"], s.pixel_counts))}
                    if s.pixel_counts
                    else {}
                ),
            }
            for s in report.splits
        },
        "problems": report.problems,
        "notes": report.notes,
    }
