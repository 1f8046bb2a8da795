"""Loading trained models: a stage-1 classifier or a stage-2 segmenter from a wsss checkpoint or a
published WSSS-Tissue file, with what a command needs to run it (input normalisation, input size,
its dataset spec), and the forward passes every command shares.

The library's one door to checkpoints of trained models: training stages, inference, figures, export
and the Python API all load through here (none of them imports a training stage for it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from wsss.data.datasets import InputNorm
from wsss.data.specs import DatasetSpec, check_same_spec, recorded_spec, resolve_with_checkpoint
from wsss.errors import WsssError
from wsss.gate import DEFAULT_GATE_THRESHOLD
from wsss.models.deeplab import DeepLabArch, DeepLabV3Plus, infer_arch, map_reference_keys, read_checkpoint, state_dict_of
from wsss.models.resnet38 import ResNet38Classifier
from wsss.models.weights import LoadReport, _load_matching, load_stage1_weights
from wsss.runtime import autocast, load_checkpoint


# --------------------------------------------------------------------------- stage 1


def expect_stage(ckpt: dict, path: str | Path, stage: int, spec=None) -> None:
    """Refuse a checkpoint of another stage, class count or dataset spec with one clear message.

    ``spec`` is a :class:`wsss.data.specs.DatasetSpec` (the checkpoint's recorded spec must be the
    same), a class count, or None (no check).
    """
    from wsss.errors import WsssError

    found = ckpt.get("stage")
    if found is None:
        raise WsssError(f"{path} is not a wsss checkpoint (no 'stage' entry)")
    if found != stage:
        raise WsssError(f"{path} is a stage-{found} checkpoint; a stage-{stage} checkpoint is needed here")
    if isinstance(spec, DatasetSpec):
        check_same_spec(recorded_spec(ckpt, path), spec, path)
        num_classes = spec.num_classes
    else:
        num_classes = spec
    classes = ckpt.get("class_names")
    if num_classes is not None and classes is not None and len(classes) != num_classes:
        raise WsssError(
            f"{path} was trained for {len(classes)} classes ({', '.join(classes)}); "
            f"this dataset has {num_classes}"
        )


@dataclass
class LoadedClassifier:
    model: ResNet38Classifier
    norm: InputNorm
    image_size: int | None
    class_names: list[str] | None
    spec: DatasetSpec | None = None  # the spec it was trained on (None: a published file records none)
    # The tie rule its training run's CAM evaluation used (`eval-cam`'s default); a published file
    # was evaluated by the reference's code.
    cam_tie_rule: str = "reference"


def recorded_input_norm(ckpt: dict, path: Path) -> InputNorm:
    """The input normalisation (stain target included) a checkpoint records; a malformed record is a
    user error naming the file (two checkpoints are often loaded together: the gate's and stage 2's)."""
    try:
        return InputNorm.from_dict(ckpt.get("input_norm"))
    except WsssError as exc:
        raise WsssError(f"{path}: {exc}") from None


def load_classifier(path: Path, spec: DatasetSpec | int | None = None) -> LoadedClassifier:
    """A stage-1 classifier from our checkpoint or a published WSSS-Tissue state_dict (``[0,1]`` input).

    Width and class count come from the file. ``spec``: the dataset spec it must have been trained on
    (another recorded spec is a user error naming the difference) or just a class count.
    """
    ckpt = load_checkpoint(path)
    num_classes = spec.num_classes if isinstance(spec, DatasetSpec) else spec
    if "stage" in ckpt:
        expect_stage(ckpt, path, 1, spec)
        arch = ckpt["arch"]
        model = ResNet38Classifier(arch["num_classes"], width=arch["width"])
        model.load_state_dict(ckpt["model"])
        # A checkpoint of a wsss that recorded no tie rule was evaluated with ours.
        tie_rule = (ckpt.get("config") or {}).get("cam_tie_rule", "ours")
        return LoadedClassifier(model.eval(), recorded_input_norm(ckpt, path),
                                ckpt.get("image_size"), ckpt.get("class_names"), recorded_spec(ckpt, path), tie_rule)
    state = {k.removeprefix("module."): v for k, v in ckpt.items() if isinstance(v, torch.Tensor)}
    if "fc8.weight" not in state or "conv1a.weight" not in state:
        raise WsssError(f"{path} is neither a wsss checkpoint nor a ResNet38 classifier state_dict")
    classes = state["fc8.weight"].shape[0]
    if num_classes is not None and classes != num_classes:
        raise WsssError(f"{path} was trained for {classes} classes; this dataset has {num_classes}")
    model = ResNet38Classifier(classes, width=state["conv1a.weight"].shape[0] / 64)
    report = load_stage1_weights(model, path)
    if report.missing or report.shape_mismatch:
        raise WsssError(f"{path} does not fit a ResNet38 classifier: {report.summary()}")
    return LoadedClassifier(model.eval(), InputNorm(), None, None)


def classifier_and_spec(path: Path, dataset: str | None, labels_csv: Path | None = None
                        ) -> tuple[LoadedClassifier, DatasetSpec]:
    """The classifier at ``path`` and the dataset spec to use it with: the one it records, or
    ``--dataset`` (required for published files, refused when it differs from the record)."""
    clf = load_classifier(path)
    spec = resolve_with_checkpoint(dataset, clf.spec, path, labels_csv)
    if clf.model.num_classes != spec.num_classes:
        raise WsssError(f"{path} was trained for {clf.model.num_classes} classes; "
                        f"the {spec.name} dataset has {spec.num_classes}")
    return clf, spec


# --------------------------------------------------------------------------- stage 2


@dataclass
class LoadedSegmenter:
    model: DeepLabV3Plus
    norm: InputNorm
    image_size: int | None
    class_names: list[str] | None
    batch_size: int | None = None  # the training batch size (evaluation default, see `evaluate`)
    spec: DatasetSpec | None = None  # the spec it was trained on (None: a published file records none)
    # The gate its training run tested with (`evaluate`'s default); a published file: the reference's.
    gate_mode: str = "reference"
    gate_threshold: float = DEFAULT_GATE_THRESHOLD


def load_segmenter(path: Path, spec: DatasetSpec | int | None = None) -> LoadedSegmenter:
    """A stage-2 model from our checkpoint or a published WSSS-Tissue / pytorch-deeplab-xception file.

    A published file (``{"state_dict": ...}`` or a plain state dict) is taken as the reference
    trained it: output stride 16, ``[0, 1]`` RGB input (its ``Normalize`` has mean 0, std 1), the
    patches' own size; backbone, class count and head width are read from the weights. ``spec``: the
    dataset spec it must have been trained on (another recorded spec is a user error), or a class count.
    """
    ckpt = read_checkpoint(path)
    num_classes = spec.num_classes if isinstance(spec, DatasetSpec) else spec
    if "stage" in ckpt:
        expect_stage(ckpt, path, 2, spec)
        model = DeepLabV3Plus(DeepLabArch.from_dict(ckpt["arch"]))
        model.load_state_dict(ckpt["model"])
        config = ckpt.get("config") or {}
        # A checkpoint of a wsss that recorded no gate mode was tested with ours.
        return LoadedSegmenter(model.eval(), recorded_input_norm(ckpt, path), ckpt.get("image_size"),
                               ckpt.get("class_names"), config.get("batch_size"), recorded_spec(ckpt, path),
                               config.get("gate_mode", "mask"), config.get("gate_threshold", DEFAULT_GATE_THRESHOLD))
    raw = state_dict_of(ckpt, path)
    if any(k.removeprefix("module.") in ("fc8.weight", "conv1a.weight") for k in raw):
        raise WsssError(f"{path} is a stage-1 (ResNet38) classifier; a stage-2 checkpoint is needed here")
    state = map_reference_keys(raw)
    try:
        arch = infer_arch(state)
    except WsssError as exc:
        raise WsssError(f"{path}: {exc}") from None
    if num_classes is not None and arch.num_classes != num_classes:
        raise WsssError(f"{path} was trained for {arch.num_classes} classes; this dataset has {num_classes}")
    model = DeepLabV3Plus(arch)
    report = _load_matching(model, state, LoadReport(source=str(path), imagenet=False))
    if report.missing or report.shape_mismatch or report.unexpected:
        raise WsssError(f"{path} does not fit a DeepLab v3+ {arch.backbone}: {report.summary()}")
    return LoadedSegmenter(model.eval(), InputNorm(), None, None)


def segmenter_and_spec(path: Path, dataset: str | None) -> tuple[LoadedSegmenter, DatasetSpec]:
    """The segmenter at ``path`` and the dataset spec to use it with: the one it records, or
    ``--dataset`` (required for published files, refused when it differs from the record)."""
    seg = load_segmenter(path)
    spec = resolve_with_checkpoint(dataset, seg.spec, path)
    if seg.model.num_classes != spec.num_classes:
        raise WsssError(f"{path} was trained for {seg.model.num_classes} classes; "
                        f"the {spec.name} dataset has {spec.num_classes}")
    return seg, spec


# --------------------------------------------------------------------------- forward passes


@torch.no_grad()
def segment(model: DeepLabV3Plus, x: torch.Tensor, size: Sequence[int], precision: str = "fp32") -> torch.Tensor:
    """Images (B, 3, S, S) → float32 logits (B, C, H, W) at the masks' size ``(H, W)`` (bilinear),
    the model run in ``precision`` (resolved: fp32, bf16 or fp16)."""
    with autocast(x.device, precision):
        return model(x, size=tuple(size))["out"].float()


@torch.no_grad()
def class_probs(clf: LoadedClassifier, x: torch.Tensor, precision: str = "fp32") -> torch.Tensor:
    """Stage-1 probabilities (B, C) = sigmoid(logits) of images prepared for the classifier; the
    model runs in ``precision``, the sigmoid in fp32."""
    with autocast(x.device, precision):
        logits = clf.model(x)
    return torch.sigmoid(logits.float())
