"""What a command will read, checked before it computes anything; ``wsss check-data`` runs the same checks.

Cheap by design: images are checked from their headers (mode, size), label names by their text,
masks are decoded (evaluation splits are small; pseudo-masks that ``generate-pm`` recorded as its
own are trusted and only their headers are read). Each check returns problems as one-line strings;
:func:`require` turns them into one :class:`WsssError` naming the first and counting the rest.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from wsss.data.layout import MaskedSample, TrainSample
from wsss.data.png import READ_ERRORS, check_mask_values, check_rgb_mode, open_image, read_class_mask, read_mask
from wsss.data.specs import DatasetSpec
from wsss.errors import WsssError

# --------------------------------------------------------------------------- label styles

LABEL_STYLES = {"spaced": "[1 0 0 1]", "packed": "[1001]", "comma": "[1, 0, 0, 1]"}
"""How a file name writes its multi-hot label."""

DATASET_LABEL_STYLES: dict[str, tuple[str, ...]] = {"luad": ("spaced",), "bcss": ("packed",)}
"""The style is part of a published dataset's identity: LUAD-HistoSeg spaces its digits, BCSS-WSSS
packs them, so a file in the other style means the wrong ``--dataset`` (whose class names and
white-background rule would be silently wrong). A dataset not listed here accepts every style."""

_LAST_BRACKETS = re.compile(r"\[([^\[\]]*)\][^\[]*$")


def label_style(name: str | Path) -> str | None:
    """``spaced``, ``packed`` or ``comma`` for the last bracketed label of a file name; None when
    there is none or it is a single digit (which every style writes alike)."""
    match = _LAST_BRACKETS.search(Path(name).stem)
    if match is None:
        return None
    inner = match.group(1).strip()
    if "," in inner:
        return "comma"
    if re.search(r"\s", inner):
        return "spaced"
    return "packed" if len(inner) > 1 else None


def allowed_label_styles(spec: DatasetSpec) -> tuple[str, ...] | None:
    """The label styles ``spec`` accepts; None: any. A spec may say so itself (``label_styles``)."""
    own = getattr(spec, "label_styles", None)
    if own:
        return tuple(own)
    return DATASET_LABEL_STYLES.get(spec.name)


def label_style_problem(path: Path, allowed: Sequence[str] | None, dataset: str) -> str | None:
    """One line when ``path``'s label is written in a style ``dataset`` does not use, naming the
    dataset that writes labels that way."""
    style = label_style(path)
    if style is None or allowed is None or style in allowed:
        return None
    owners = [name for name, styles in DATASET_LABEL_STYLES.items() if style in styles and name != dataset]
    hint = f"; is this the {owners[0]} dataset (--dataset {owners[0]})?" if owners else ""
    expected = " or ".join(LABEL_STYLES[s] for s in allowed)
    return (f"{Path(path).name}: label written like {LABEL_STYLES[style]}, but {dataset} patches are named like "
            f"{expected}{hint}")


# --------------------------------------------------------------------------- images and masks


def image_header(path: Path) -> tuple[tuple[int, int] | None, str | None]:
    """``((width, height), None)`` of an RGB image from its header, or ``(None, problem)``."""
    try:
        with open_image(path) as img:
            check_rgb_mode(img, path)
            return img.size, None
    except WsssError as exc:
        return None, str(exc)
    except READ_ERRORS as exc:
        return None, f"cannot read image {path}: {exc}"


def mask_header(path: Path) -> tuple[tuple[int, int] | None, str | None]:
    """``((width, height), None)`` of a class-index mask (palette or greyscale) from its header."""
    try:
        with open_image(path) as img:
            if img.mode not in ("P", "L"):
                return None, f"mask {path} is mode {img.mode}, expected a palette ('P') PNG"
            return img.size, None
    except READ_ERRORS as exc:
        return None, f"cannot read mask {path}: {exc}"


def mask_problem(path: Path, spec: DatasetSpec, size: tuple[int, int] | None = None,
                 image: Path | None = None, pseudo: bool = False) -> str | None:
    """Decode a mask and check its mode, its values and (given the image's ``size``) its size.

    Ground-truth masks are read in the spec's encoding (:func:`wsss.data.png.read_class_mask`);
    ``pseudo`` masks, which generate-pm writes, always hold the values themselves."""
    try:
        if pseudo:
            mask = read_mask(path)
            check_mask_values(mask, spec, path)
        else:
            mask = read_class_mask(path, spec)
    except WsssError as exc:
        return str(exc)
    if size is not None and (mask.shape[1], mask.shape[0]) != tuple(size):
        name = image.name if image is not None else "its image"
        return f"size mismatch: {name} is {size[0]}x{size[1]}, its mask {mask.shape[1]}x{mask.shape[0]}: {path}"
    return None


# --------------------------------------------------------------------------- what commands read


def train_problems(samples: Iterable[TrainSample], spec: DatasetSpec, images: bool = True) -> list[str]:
    """Training patches: label style against ``spec``, and (``images``) each image's header."""
    allowed = allowed_label_styles(spec)
    problems = []
    for sample in samples:
        style = label_style_problem(sample.path, allowed, spec.name)
        if style:
            problems.append(style)
        if images:
            _, problem = image_header(sample.path)
            if problem:
                problems.append(problem)
    return problems


def masked_problems(samples: Iterable[MaskedSample], spec: DatasetSpec) -> list[str]:
    """Evaluation patches: image headers, and each mask decoded (mode, size, values)."""
    problems = []
    for sample in samples:
        size, problem = image_header(sample.image)
        problem = problem or mask_problem(sample.mask, spec, size, sample.image)
        if problem:
            problems.append(problem)
    return problems


def pseudo_mask_problems(samples: Sequence[TrainSample], paths: Sequence[Sequence[Path]], spec: DatasetSpec,
                         trusted: Callable[[Path], bool] = lambda p: False) -> list[str]:
    """Pseudo-masks of the training patches (``paths[i]``: one per layer of ``samples[i]``): each
    header's mode and size against its patch; the values of every mask not ``trusted`` (trusted:
    written by ``generate-pm``, which writes only valid values) are decoded and checked."""
    problems = []
    for sample, row in zip(samples, paths):
        size, problem = image_header(sample.path)
        if problem:
            problems.append(problem)
            continue
        for path in row:
            pm_size, problem = mask_header(path)
            if problem is None and pm_size != size:
                problem = (f"pseudo-mask {path} is {pm_size[0]}x{pm_size[1]}, its patch {sample.path.name} "
                           f"{size[0]}x{size[1]}")
            if problem is None and not trusted(path):
                problem = mask_problem(path, spec, pseudo=True)
            if problem:
                problems.append(problem)
    return problems


def require(problems: Sequence[str], root: Path | None = None, dataset: str | None = None) -> None:
    """Raise one :class:`WsssError` for ``problems`` (none: return): the first, and how many more."""
    if not problems:
        return
    more = ""
    if len(problems) > 1:
        more = f" (and {len(problems) - 1} more problem{'s' if len(problems) > 2 else ''}"
        more += f"; wsss check-data {root} --dataset {dataset} lists them all)" if root and dataset else ")"
    raise WsssError(problems[0] + more)


__all__ = [
    "DATASET_LABEL_STYLES", "LABEL_STYLES", "allowed_label_styles", "image_header", "label_style",
    "label_style_problem", "mask_header", "mask_problem", "masked_problems",
    "pseudo_mask_problems", "require", "train_problems",
]


def input_folders(root: Path) -> list[Path]:
    """The folders of a dataset that hold its files (never an output folder)."""
    from wsss.data.layout import split_dir, train_image_dir

    folders = [train_image_dir(root), split_dir(root, "train")]
    for split in ("val", "test"):
        folder = split_dir(root, split)
        if folder is not None:
            folders += [folder / "img", folder / "mask"]
    return [f for f in folders if f is not None]
