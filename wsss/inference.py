"""The model side of every predict command: class probabilities of image windows from a stage-2
segmenter (gated by the stage-1 classifier when asked), loading both from checkpoints, and a whole
image segmented (:func:`segment_image`). Used by ``wsss predict``, ``wsss predict-wsi`` and the
Python API (:mod:`wsss.api`)."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from wsss.data.datasets import InputNorm, resize_rgb, to_tensor
from wsss.data.scale import recorded_scale, resampled_size
from wsss.data.specs import DatasetSpec
from wsss.data.stain import SetColour
from wsss.errors import WsssError
from wsss.gate import DEFAULT_GATE_THRESHOLD, check_gate_checkpoint, gate_logits
from wsss.models.loading import (
    LoadedClassifier, LoadedSegmenter, class_probs, load_classifier, segment, segmenter_and_spec,
)
from wsss.runtime import memory_format, resolve_device, resolve_precision
from wsss.pixels import white_background
from wsss.probabilities import quantise, to_float16, winners
from wsss.tiling import Predictor, predict_mask, probability_bands

log = logging.getLogger(__name__)


def windows_counted(predictor: Predictor, what: str = "windows") -> str:
    """How the stain normalisation's count of windows reads: twice each when the gate's classifier
    normalises them too."""
    both = (isinstance(predictor, TilePredictor) and predictor.gate is not None
            and predictor.gate.norm.stain is not None and predictor.seg.norm.stain is not None)
    return f"{what} (each counted twice: for the segmenter and for the gate)" if both else what


def check_window_options(tile: int | None, overlap: int | None, batch_size: int, gate: bool,
                         stage1_checkpoint: Path | None) -> None:
    """The sliding-window and gate options every predict command shares; a bad one is a user error.
    ``tile`` and ``overlap`` None: not given (:func:`window_for` picks them from the checkpoint)."""
    if tile is not None and tile < 16:
        raise WsssError(f"--tile must be at least 16 px, not {tile}")
    if overlap is not None and overlap < 0:
        raise WsssError(f"--overlap must be at least 0, not {overlap}")
    if tile is not None and overlap is not None and not overlap < tile:
        raise WsssError(f"--overlap must be at least 0 and smaller than --tile ({tile}), not {overlap}")
    if batch_size < 1:
        raise WsssError(f"--batch-size must be at least 1, not {batch_size}")
    check_gate_checkpoint(gate, stage1_checkpoint, warn=False)  # validation runs again on every replace()


WINDOW_BATCH = {"cpu": 8, "cuda": 64}
"""Windows per forward pass when --batch-size is not given: on a CPU every core is busy at 8 already;
on a CUDA GPU a batch of 8 leaves most of it idle (64 windows of 224 px are ~10 MB of bf16 input)."""


def window_batch(batch_size: int | None, device: str) -> int:
    """``batch_size``, or the default of the device ``device`` names (``auto``: CUDA when available)."""
    if batch_size is not None:
        return batch_size
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    return WINDOW_BATCH["cuda" if device.startswith("cuda") else "cpu"]


DEFAULT_TILE = 224
"""The window of a checkpoint that records no training patch size (LUAD-HistoSeg's and BCSS-WSSS's patches)."""
DEFAULT_OVERLAP = 32


def window_for(tile: int | None, overlap: int | None, patch_size: int | None) -> tuple[int, int]:
    """``(tile, overlap)`` of a predict command: ``--tile`` when given, else the checkpoint's training
    patch size (:data:`DEFAULT_TILE` when it records none); ``--overlap`` when given, else
    :data:`DEFAULT_OVERLAP` px or half the window when that is less. Checked as the options are."""
    tile = tile if tile is not None else patch_size if patch_size is not None else DEFAULT_TILE
    overlap = overlap if overlap is not None else min(DEFAULT_OVERLAP, tile // 2)
    check_window_options(tile, overlap, 1, False, None)
    return tile, overlap


def model_scale(checkpoint: Path) -> tuple[float | None, int | None]:
    """``(mpp, patch_size)`` a stage-2 checkpoint was trained at (:func:`wsss.data.scale.recorded_scale`);
    read before the models load, so that a slide or image that cannot be used fails first."""
    from wsss.models.deeplab import read_checkpoint

    return recorded_scale(read_checkpoint(checkpoint))


class ModelOptions(Protocol):
    """What :func:`load_models` reads from a config (:class:`PredictConfig` and the whole-slide one)."""

    checkpoint: Path
    dataset: str | None
    gate: bool
    stage1_checkpoint: Path | None
    gate_threshold: float
    gate_mode: str
    tile: int
    device: str
    precision: str
    tta: str


def model_size(tile_hw: tuple[int, int], tile: int, image_size: int | None) -> tuple[int, int]:
    """Model input ``(h, w)`` for a window of ``tile_hw`` px: scaled by ``image_size / tile`` (the
    training scale) when the checkpoint records an input size, else the window as it is."""
    if image_size is None:
        return tile_hw
    scale = image_size / tile
    return tuple(max(1, round(side * scale)) for side in tile_hw)


TTA_MODES: tuple[str, ...] = ("none", "flip", "d4")
"""Test-time augmentation: ``none``; ``flip``: the window as it is, flipped left-right, upside down
and both (4 passes); ``d4``: those and their transposes, i.e. every rotation by 90° with and
without a flip (8 passes). Softmax probabilities are mapped back and averaged."""


def _same(x: torch.Tensor) -> torch.Tensor:
    return x


def _transpose(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(-2, -1)


def _rot90(x: torch.Tensor) -> torch.Tensor:
    return torch.rot90(x, 1, (-2, -1))


def _rot270(x: torch.Tensor) -> torch.Tensor:
    return torch.rot90(x, -1, (-2, -1))


@dataclass(frozen=True)
class Transform:
    """One element of the dihedral group D4 on the last two axes of a ``(B, C, H, W)`` tensor:
    ``apply``, its inverse ``undo``, and whether it swaps height and width."""

    name: str
    apply: Callable[[torch.Tensor], torch.Tensor]
    undo: Callable[[torch.Tensor], torch.Tensor]
    swaps: bool = False


_FLIPS = (
    Transform("identity", _same, _same),
    Transform("hflip", lambda x: x.flip(-1), lambda x: x.flip(-1)),
    Transform("vflip", lambda x: x.flip(-2), lambda x: x.flip(-2)),
    Transform("rot180", lambda x: x.flip(-2, -1), lambda x: x.flip(-2, -1)),
)
_TRANSPOSED = (
    Transform("transpose", _transpose, _transpose, True),
    Transform("rot90", _rot90, _rot270, True),
    Transform("rot270", _rot270, _rot90, True),
    Transform("antitranspose", lambda x: _transpose(x).flip(-2, -1), lambda x: _transpose(x).flip(-2, -1), True),
)


def tta_transforms(mode: str) -> tuple[Transform, ...]:
    """The transforms of a ``--tta`` mode; an unknown mode is a user error."""
    check_tta(mode)
    return {"none": _FLIPS[:1], "flip": _FLIPS, "d4": _FLIPS + _TRANSPOSED}[mode]


def check_tta(mode: str) -> None:
    if mode not in TTA_MODES:
        raise WsssError(f"--tta must be one of {', '.join(TTA_MODES)}, not {mode!r}")


def prepare_windows(tiles: Sequence[np.ndarray], size: tuple[int, int], norm: InputNorm) -> torch.Tensor:
    """Windows ``(h, w, 3)`` uint8 → normalised model input ``(B, 3, *size)`` on the CPU."""
    return torch.stack([to_tensor(resize_rgb(t, size), norm) for t in tiles])


@dataclass
class PreparedWindows:
    """Windows of one size ``(h, w)`` as model inputs: the segmenter's and, with the gate, the
    classifier's (each at its own training scale and normalisation), on the CPU."""

    size: tuple[int, int]
    seg: torch.Tensor
    gate: torch.Tensor | None = None


@dataclass
class TilePredictor(Predictor):
    """Class probabilities of image windows: the segmenter's softmax, with the gate when given.

    ``tile`` is the window side the models' training scale refers to (``--tile``).
    """

    seg: LoadedSegmenter
    tile: int
    device: torch.device
    gate: LoadedClassifier | None = None
    threshold: float = DEFAULT_GATE_THRESHOLD
    precision: str = "fp32"  # resolved: fp32, bf16 or fp16
    gate_mode: str = "mask"
    tta: str = "none"

    def __post_init__(self) -> None:
        self.transforms = tta_transforms(self.tta)
        self.memory_format = memory_format(self.device, self.precision)
        self.seg.model.eval().to(self.device, memory_format=self.memory_format)
        if self.gate is not None:
            self.gate.model.eval().to(self.device, memory_format=self.memory_format)

    def for_set(self, colour: Callable[[], SetColour], what: str) -> "TilePredictor":
        """This predictor with each model's input normalisation bound to the set of images whose colour
        ``colour()`` measures (``reinhard-set``, measured once, only when a model needs it); itself
        when neither does. The models are shared, not copied."""
        if not (self.seg.norm.needs_set or (self.gate is not None and self.gate.norm.needs_set)):
            return self
        once = functools.cache(colour)
        gate = None if self.gate is None else replace(self.gate, norm=self.gate.norm.for_set(once, what))
        return replace(self, seg=replace(self.seg, norm=self.seg.norm.for_set(once, what)), gate=gate)

    def prepare(self, tiles: Sequence[np.ndarray]) -> PreparedWindows:
        """Resize and normalise windows of one size ``(h, w, 3)`` uint8 for both models (CPU work);
        pinned when the models are on a GPU, so that the copy overlaps the computation."""
        size = tiles[0].shape[:2]
        x = prepare_windows(tiles, model_size(size, self.tile, self.seg.image_size), self.seg.norm)
        xg = None
        if self.gate is not None:
            xg = prepare_windows(tiles, model_size(size, self.tile, self.gate.image_size), self.gate.norm)
        if self.device.type == "cuda":
            x, xg = x.pin_memory(), xg.pin_memory() if xg is not None else None
        return PreparedWindows(size, x, xg)

    @torch.no_grad()
    def forward(self, inputs: PreparedWindows, start: int, stop: int) -> torch.Tensor:
        """Probabilities ``(stop - start, C, h, w)`` float32 of the prepared windows ``start:stop``.

        With the gate, each window's classes that the classifier rules out get probability 0 (the
        classifier sees the window as it is, once). With test-time augmentation, the mean of the
        softmax of every transformed window, each mapped back.
        """
        x = inputs.seg[start:stop].to(self.device, non_blocking=True)
        gate_probs = None
        if self.gate is not None:
            xg = inputs.gate[start:stop].to(self.device, non_blocking=True)
            gate_probs = class_probs(self.gate, xg.contiguous(memory_format=self.memory_format), self.precision)
        probs = None
        for t in self.transforms:
            view = t.apply(x).contiguous(memory_format=self.memory_format)
            logits = segment(self.seg.model, view, inputs.size[::-1] if t.swaps else inputs.size, self.precision)
            if gate_probs is not None:
                logits = gate_logits(logits, gate_probs, self.threshold, self.gate_mode)
            p = t.undo(logits.softmax(dim=1))  # fp32 logits (segment): fp32 softmax
            probs = p if probs is None else probs.add_(p)
        return probs if len(self.transforms) == 1 else probs.div_(len(self.transforms))


def load_models(cfg: ModelOptions, local_rank: int = 0) -> tuple[TilePredictor, DatasetSpec]:
    """The tile predictor (on GPU ``local_rank`` when the device is ``cuda``) and the dataset spec: the
    one recorded in the checkpoint, or ``--dataset`` (needed for published checkpoints; refused when it
    differs from the record). A wrong checkpoint, class count or a gate classifier trained on another
    spec is a user error."""
    seg, spec = segmenter_and_spec(cfg.checkpoint, cfg.dataset)
    check_gate_checkpoint(cfg.gate, cfg.stage1_checkpoint)
    gate = load_classifier(cfg.stage1_checkpoint, spec) if cfg.gate else None
    device = resolve_device(cfg.device, local_rank)
    predictor = TilePredictor(seg, cfg.tile, device, gate, cfg.gate_threshold,
                              resolve_precision(cfg.precision, device), cfg.gate_mode, cfg.tta)
    return predictor, spec


def run_precision(cfg: ModelOptions) -> str:
    """The precision a predict command computes in (``auto``: bf16 or fp32 on this machine), as its
    records of settings name it; :func:`load_models` resolves it the same way."""
    return resolve_precision(cfg.precision, resolve_device(cfg.device))


def upgrade_settings(recorded: dict) -> dict:
    """Settings an older wsss recorded (``amp``: false) in today's terms (``precision``: fp32), so
    that its predictions are recognised as made with the same settings; ``amp``: true (fp16 or
    bf16, by device) is not told apart and counts as other settings."""
    if "amp" not in recorded or "precision" in recorded:
        return recorded
    upgraded = {k: v for k, v in recorded.items() if k != "amp"}
    upgraded["precision"] = "amp" if recorded["amp"] else "fp32"
    return upgraded


# --------------------------------------------------------------------------- one whole image


QUANTISE_ROWS = 256
"""Rows quantised at a time (:meth:`Segmentation.probs_uint8`)."""


@dataclass
class Segmentation:
    """One image segmented: ``labels`` ``(H, W)`` uint8 class indices (the spec's background index
    on white glass, for specs whose white is background); with probabilities asked for, ``probs``
    ``(C, H, W)`` float16 and ``argmax`` ``(H, W)`` uint8, the most probable class of every pixel
    (``labels`` before the background was marked)."""

    labels: np.ndarray
    probs: np.ndarray | None = None
    argmax: np.ndarray | None = None

    def probs_uint8(self) -> np.ndarray:
        """``(C, H, W)`` uint8 ``round(255 · p)``, argmax kept (:func:`wsss.probabilities.quantise`)."""
        if self.probs is None or self.argmax is None:
            raise ValueError("this segmentation was made without probabilities")
        out = np.empty(self.probs.shape, dtype=np.uint8)
        for top in range(0, out.shape[1], QUANTISE_ROWS):  # bounded temporaries (float32, copies)
            rows = slice(top, top + QUANTISE_ROWS)
            out[:, rows] = quantise(self.probs[:, rows], self.argmax[rows])
        return out


def segment_image(image: np.ndarray, predictor: Predictor, spec: DatasetSpec, tile: int, overlap: int,
                  batch_size: int, probs: bool = False, progress: bool = False,
                  factor: float | None = None) -> Segmentation:
    """Segment an ``(H, W, 3)`` uint8 image by the sliding window of :mod:`wsss.tiling`: the one
    engine of ``wsss predict`` and of :meth:`wsss.api.Segmenter.predict`.

    ``factor`` (model pixels per image pixel, None or 1: as it is): the image is resized by it
    (bilinear) for the model, and labels and probabilities are taken back to ``(H, W)`` by the pixel
    under each centre. White background (specs whose white is background) is marked on the image's
    own pixels, last."""
    work = resample_rgb(image, factor)
    if probs:
        argmax, p16 = _labels_and_probs(work, predictor, tile, overlap, batch_size, progress)
    else:
        argmax, p16 = predict_mask(work, predictor, tile, overlap, batch_size, progress), None
    del work
    if argmax.shape != image.shape[:2]:
        argmax = sample_to(argmax, image.shape[:2])
        p16 = sample_to(p16, image.shape[:2]) if p16 is not None else None
    labels = argmax.copy() if probs else argmax
    if spec.white_is_background:
        labels[white_background(image)] = spec.background_index
    return Segmentation(labels, p16, argmax if probs else None)


def _labels_and_probs(image: np.ndarray, predictor: Predictor, tile: int, overlap: int, batch_size: int,
                      progress: bool) -> tuple[np.ndarray, np.ndarray]:
    """The argmax ``(H, W)`` uint8 (as :func:`~wsss.tiling.predict_mask` makes it) and the float16
    probabilities ``(C, H, W)`` of an image, filled band by band."""
    labels = np.empty(image.shape[:2], dtype=np.uint8)
    p16: np.ndarray | None = None
    for top, band in probability_bands(image, predictor, tile, overlap, batch_size, progress):
        rows = slice(top, top + band.shape[1])
        if p16 is None:
            p16 = np.empty((band.shape[0], *image.shape[:2]), dtype=np.float16)
        labels[rows] = winners(band)
        p16[:, rows] = to_float16(band)
    return labels, p16


def resample_rgb(image: np.ndarray, factor: float | None) -> np.ndarray:
    """``(H, W, 3)`` uint8 resized by ``factor`` (bilinear, PIL); None or 1: the image itself."""
    if factor is None or factor == 1.0:
        return image
    width, height = resampled_size((image.shape[1], image.shape[0]), factor)
    return resize_rgb(image, (height, width))


def sample_to(values: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``(..., h, w)`` → ``(..., H, W)``: each output pixel takes the input pixel under its centre
    (classes stay classes, and the argmax of probabilities stays that of the labels)."""
    h, w = values.shape[-2:]
    rows = ((np.arange(size[0]) + 0.5) * h / size[0]).astype(np.intp)
    cols = ((np.arange(size[1]) + 0.5) * w / size[1]).astype(np.intp)
    return values[..., rows[:, None], cols[None, :]]
