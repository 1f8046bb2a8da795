"""The report's pictures: ``examples.png`` (test patches, their masks and predictions) and
``cams.png`` (what the stage-1 classifier looks at, one training patch per class).

``examples.png``, one test patch per row: image | ground truth | PM <layer> … | stage-2 columns, in the
dataset's palette colours with a class legend. Pseudo-masks exist on disk only for training patches,
so the PM columns are computed here with :func:`wsss.cam.pseudo_mask.pseudo_masks`, exactly as
``wsss generate-pm`` does, taking the tissue classes present in the ground truth as the image-level
label. The stage-2 columns are the palette PNGs stage 2 wrote, ``<folder>/<image stem>.png``.

``cams.png``, one training patch per class: image | CAM of that class | its Grad-CAM at each layer, as
heatmaps over the image. The CAM is normalised as stage 1's CAM evaluation does (classes with
probability <= 0.25 zeroed, joint min-max over the classes); the Grad-CAMs as the pseudo-masks do
(joint min-max over the classes).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from wsss.cam.cam import DEFAULT_CAM_THRESHOLD, minmax_normalise, upsample_cams
from wsss.cam.gradcam import GRADCAM_LAYERS, multi_layer_gradcam
from wsss.cam.pseudo_mask import PmMethod, parse_layers, patch_item, pseudo_masks
from wsss.data import stain
from wsss.data.datasets import resize_rgb, to_tensor
from wsss.data.layout import MaskedSample, TrainSample, list_masked, list_train
from wsss.data.png import read_class_mask, read_mask, read_rgb
from wsss.data.specs import DatasetSpec
from wsss.errors import WsssError
from wsss.models.loading import LoadedClassifier, load_classifier
from wsss.runtime import atomic_path, resolve_device
from wsss.viz import colorbar, colorize, grid, heatmap_overlay, legend

log = logging.getLogger(__name__)

EXAMPLES_NAME = "examples.png"
CAMS_NAME = "cams.png"
CELL = 160
"""Side of one picture in the grids, in pixels."""
MISSING_GREY = 200
"""Fill of a cell whose prediction file is missing."""
OUTLINE = (160, 160, 160)
"""Frame around each picture: white background in a mask stays distinct from the page."""


# --------------------------------------------------------------------------- choosing patches


def mask_label(mask: np.ndarray, num_classes: int) -> tuple[int, ...]:
    """Multi-hot label ``(C,)`` of the tissue classes ``0..C-1`` present in a class-index mask."""
    counts = np.bincount(np.asarray(mask, dtype=np.uint8).ravel(), minlength=num_classes)[:num_classes]
    return tuple(int(n > 0) for n in counts)


def pick_covering(labels: Iterable[Sequence[int]], total: int, n: int) -> list[int]:
    """Indices of ``min(n, total)`` items, sorted, chosen so that as many classes as possible appear.

    ``labels`` (multi-hot, one per item, in order) is read lazily: an item is taken when it shows a
    class no taken item shows, until every class is shown or ``n`` items are taken; the remaining
    places go to the first items not taken yet. Same labels, same choice.
    """
    taken: list[int] = []
    shown: set[int] = set()
    for index, label in enumerate(labels):
        if len(taken) >= n:
            break
        classes = {c for c, on in enumerate(label) if on}
        if classes - shown:
            taken.append(index)
            shown |= classes
        if len(shown) == len(label):
            break
    rest = (i for i in range(total) if i not in taken)
    while len(taken) < min(n, total):
        taken.append(next(rest))
    return sorted(taken)


def pick_per_class(labels: Sequence[Sequence[int]], num_classes: int) -> dict[int, int]:
    """``{class: index}``: for each class the first item labelled with it and exactly one other
    class if there is one (the CAM then shows where the classifier puts the boundary between the
    two), else as few others as possible; a patch already shown for another class only when there
    is no other; a class no item carries is left out."""
    chosen: dict[int, int] = {}
    for c in range(num_classes):
        candidates = [i for i, label in enumerate(labels) if label[c]]
        if candidates:
            used = set(chosen.values())
            chosen[c] = min(candidates, key=lambda i: (i in used, sum(labels[i]) != 2, sum(labels[i]), i))
    return chosen


# --------------------------------------------------------------------------- model outputs


def _load(stage1_checkpoint: Path, spec: DatasetSpec, device: str | torch.device, images: Sequence[Path],
          what: str) -> tuple[LoadedClassifier, torch.device]:
    """The stage-1 classifier in eval mode on ``device`` (``auto``, ``cpu``, ``cuda`` or a torch device),
    its input normalisation bound to the set ``images`` its patches are drawn from (``reinhard-set``)."""
    clf = load_classifier(stage1_checkpoint, spec)
    clf = replace(clf, norm=clf.norm.for_set(lambda: stain.measure_paths(images, clf.image_size), what))
    device = resolve_device(device) if isinstance(device, str) else torch.device(device)
    clf.model.to(device).eval()
    return clf, device


def _model_input(image: np.ndarray, clf: LoadedClassifier) -> torch.Tensor:
    """``(H, W, 3)`` uint8 → ``(3, S, S)`` at the classifier's input size and normalisation."""
    return to_tensor(resize_rgb(image, clf.image_size), clf.norm)


def patch_pseudo_masks(clf: LoadedClassifier, image: np.ndarray, label: Sequence[int], layers: Sequence[str],
                       spec: DatasetSpec, device: torch.device, method: PmMethod = PmMethod()) -> dict[str, np.ndarray]:
    """``{layer: (H, W) uint8}`` pseudo-masks of one patch ``(H, W, 3)`` with multi-hot ``label``,
    computed as ``wsss generate-pm`` computes them (same item fields, same function)."""
    item = patch_item(image, label, spec, clf.norm, clf.image_size, method.white_rule)
    masks = pseudo_masks(clf.model, [item], layers, spec, device, method)
    return {layer: mask[0].numpy() for layer, mask in masks.items()}


@torch.no_grad()
def evaluation_cams(clf: LoadedClassifier, image: np.ndarray, device: torch.device,
                    threshold: float = DEFAULT_CAM_THRESHOLD) -> tuple[np.ndarray, np.ndarray]:
    """CAMs ``(C, H, W)`` in [0, 1] and class probabilities ``(C,)`` of one patch ``(H, W, 3)``.

    Normalised as stage 1's CAM evaluation (:func:`wsss.cam.cam.cam_to_segmentation`) does before its
    argmax: upsampled to the patch, classes with probability <= ``threshold`` zeroed, joint min-max.
    """
    cams, logits = clf.model.cams_and_logits(_model_input(image, clf)[None].to(device))
    probs = torch.sigmoid(logits.float())
    cams = upsample_cams(cams.float(), tuple(image.shape[:2])) * (probs > threshold)[:, :, None, None]
    return minmax_normalise(cams)[0].cpu().numpy(), probs[0].cpu().numpy()


def normalised_gradcams(clf: LoadedClassifier, image: np.ndarray, layers: Sequence[str],
                        device: torch.device) -> dict[str, np.ndarray]:
    """``{layer: (C, H, W)}`` Grad-CAMs of one patch in [0, 1], jointly min-max normalised over the
    classes as the pseudo-mask fusion normalises them."""
    x = _model_input(image, clf)[None].to(device)
    cams = multi_layer_gradcam(clf.model, x, layers, size=tuple(image.shape[:2]))
    return {layer: minmax_normalise(cam)[0].cpu().numpy() for layer, cam in cams.items()}


# --------------------------------------------------------------------------- stage-2 predictions


def existing_pred_dirs(pred_dirs: dict[str, Path]) -> dict[str, Path]:
    """The entries of ``pred_dirs`` whose folder exists; the others are logged and left out."""
    found = {}
    for title, folder in pred_dirs.items():
        if Path(folder).is_dir():
            found[title] = Path(folder)
        else:
            log.info("figures: no %s, leaving out the column %r", folder, title)
    return found


def read_prediction(folder: Path, stem: str, shape: tuple[int, int]) -> np.ndarray | None:
    """The palette prediction ``folder/<stem>.png`` as ``(H, W)`` indices; None (logged) if missing."""
    path = Path(folder) / f"{stem}.png"
    if not path.is_file():
        log.warning("figures: missing prediction %s, its cell is left grey", path)
        return None
    pred = read_mask(path)
    if pred.shape != tuple(shape):
        raise WsssError(f"prediction {path} is {pred.shape[1]}x{pred.shape[0]}, "
                        f"its test mask {shape[1]}x{shape[0]}")
    return pred


# --------------------------------------------------------------------------- figures


def examples_figure(
    spec: DatasetSpec,
    data: Path,
    stage1_checkpoint: Path,
    pred_dirs: dict[str, Path],
    out: Path,
    layers: Sequence[str] = GRADCAM_LAYERS,
    n: int = 8,
    device: str | torch.device = "cpu",
    cell: int = CELL,
    method: PmMethod = PmMethod(),
) -> Path:
    """Write ``out`` (PNG): ``n`` test patches, image | ground truth | PM per layer | each existing
    folder of ``pred_dirs`` (``{column title: folder}``), with a class legend. Returns ``out``."""
    layers = parse_layers(layers)
    samples = list_masked(data, "test")
    picked = [samples[i] for i in pick_covering(_test_labels(samples, spec), len(samples), n)]
    columns = existing_pred_dirs(pred_dirs)
    clf, device = _load(stage1_checkpoint, spec, device, [s.image for s in samples], "the test split")
    rows = [_example_row(sample, clf, layers, columns, spec, device, method) for sample in picked]
    titles = ["image", "ground truth", *(f"PM {layer}" for layer in layers), *columns]
    row_titles = [wrap_name(sample.image.stem) for sample in picked]
    figure = grid(rows, titles, cell=cell, footer=legend(spec), row_titles=row_titles, outline=OUTLINE)
    return _save(figure, out)


def _test_labels(samples: Sequence[MaskedSample], spec: DatasetSpec) -> Iterable[tuple[int, ...]]:
    for sample in samples:
        yield mask_label(read_class_mask(sample.mask, spec), spec.num_classes)


def _example_row(sample: MaskedSample, clf: LoadedClassifier, layers: Sequence[str], columns: dict[str, Path],
                 spec: DatasetSpec, device: torch.device, method: PmMethod) -> list[np.ndarray]:
    """The pictures of one test patch: image, ground truth, pseudo-masks, stage-2 predictions."""
    image, truth = read_rgb(sample.image), read_class_mask(sample.mask, spec)
    if image.shape[:2] != truth.shape:
        raise WsssError(f"size mismatch between {sample.image} and its mask")
    pms = patch_pseudo_masks(clf, image, mask_label(truth, spec.num_classes), layers, spec, device, method)
    row = [image, colorize(truth, spec), *(colorize(pms[layer], spec) for layer in layers)]
    for folder in columns.values():
        pred = read_prediction(folder, sample.image.stem, truth.shape)
        row.append(np.full_like(image, MISSING_GREY) if pred is None else colorize(pred, spec))
    return row


def cam_figure(
    spec: DatasetSpec,
    data: Path,
    stage1_checkpoint: Path,
    out: Path,
    device: str | torch.device = "cpu",
    layers: Sequence[str] = GRADCAM_LAYERS,
    cell: int = CELL,
) -> Path:
    """Write ``out`` (PNG): one training patch per class (labelled with it and as few others as
    possible), image | CAM of that class | its Grad-CAM at each layer, as heatmaps over the image."""
    layers = parse_layers(layers)
    samples = list_train(data, spec)
    chosen = pick_per_class([s.label for s in samples], spec.num_classes)
    missing = [spec.classes[c] for c in range(spec.num_classes) if c not in chosen]
    if missing:
        log.info("figures: no training patch is labelled %s; cams.png leaves it out", ", ".join(missing))
    clf, device = _load(stage1_checkpoint, spec, device, [s.path for s in samples], "the training set")
    rows, row_titles = [], []
    for c, index in chosen.items():
        row, prob = _cam_row(samples[index], c, clf, layers, device)
        rows.append(row)
        row_titles.append(f"{spec.classes[c]}\np = {prob:.2f}\nlabel {_label_text(samples[index].label, spec)}")
    titles = ["image", "CAM", *(f"Grad-CAM {layer}" for layer in layers)]
    footer = colorbar(caption="class score, normalised over the classes of the patch")
    return _save(grid(rows, titles, cell=cell, footer=footer, row_titles=row_titles, outline=OUTLINE), out)


def _cam_row(sample: TrainSample, cls: int, clf: LoadedClassifier, layers: Sequence[str],
             device: torch.device) -> tuple[list[np.ndarray], float]:
    """The pictures of one training patch for class ``cls``, and the classifier's probability of it."""
    image = read_rgb(sample.path)
    cams, probs = evaluation_cams(clf, image, device)
    gradcams = normalised_gradcams(clf, image, layers, device)
    row = [image, heatmap_overlay(image, cams[cls])]
    row += [heatmap_overlay(image, gradcams[layer][cls]) for layer in layers]
    return row, float(probs[cls])


def _label_text(label: Sequence[int], spec: DatasetSpec) -> str:
    return "+".join(name for name, on in zip(spec.classes, label) if on)


def wrap_name(name: str, width: int = 18) -> str:
    """A long file name (BCSS) broken over lines of at most ``width`` characters, after ``_``, ``-``
    or a space where it can, so that row titles stay narrow."""
    lines = [""]
    for part in re.findall(r"[^_\-\s]*[_\-\s]?", name):
        while part:
            if lines[-1] and len(lines[-1]) + len(part) > width:
                lines.append("")
            room = width - len(lines[-1])
            lines[-1] += part[:room]
            part = part[room:]
    return "\n".join(line.rstrip() for line in lines)


def _save(figure: Image.Image, out: Path) -> Path:
    out = Path(out)
    with atomic_path(out) as tmp:
        figure.save(tmp, format="PNG")
    log.info("figures: wrote %s", out)
    return out


__all__ = [
    "cam_figure",
    "evaluation_cams",
    "examples_figure",
    "existing_pred_dirs",
    "mask_label",
    "normalised_gradcams",
    "patch_pseudo_masks",
    "pick_covering",
    "pick_per_class",
    "read_prediction",
    "wrap_name",
]
