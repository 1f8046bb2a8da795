"""The Python API: load a model, segment an image or a slide, classify, train, reproduce.

A thin front door over the same engine as the command line: :func:`load_model` loads through
:func:`wsss.inference.load_models` (what ``wsss predict`` and ``wsss predict-wsi`` load with),
:meth:`Segmenter.predict` segments through :func:`wsss.inference.segment_image` (``wsss predict``'s
per-image engine) and :meth:`Segmenter.predict_slide` runs :func:`wsss.wsi.predict_wsi.run` with the
loaded models. Same checkpoint, image and settings: the same labels, bit for bit. Errors a user can
cause raise :class:`wsss.errors.WsssError` with the message the command line prints after
``error:``. See ``docs/api.md``.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
from PIL import Image

from wsss.data import stain
from wsss.data.datasets import resize_rgb, to_tensor
from wsss.data.png import check_rgb_mode
from wsss.data.specs import BACKGROUND_NAME, DatasetSpec, check_mpp
from wsss.errors import WsssError
from wsss.gate import DEFAULT_GATE_THRESHOLD, check_gate_options
from wsss.data.scale import image_side, resample_factor, same_mpp
from wsss.inference import (
    Segmentation, TilePredictor, check_tta, check_window_options, load_models, model_scale, segment_image, window_batch,
    window_for,
)
from wsss.runtime import autocast, check_precision, resolve_device, resolve_precision
from wsss.wsi.slide import image_file_mpp

log = logging.getLogger(__name__)

ImageLike = Union[np.ndarray, Image.Image, str, Path]
"""An ``(H, W, 3)`` uint8 RGB array, a PIL image (converted to RGB as ``wsss predict`` converts files),
or the path of an image file (read as ``wsss predict`` reads it)."""


# --------------------------------------------------------------------------- images in


def as_rgb(image: ImageLike, name: str = "image") -> np.ndarray:
    """``(H, W, 3)`` uint8 RGB of ``image``; what ``wsss predict`` refuses is refused with its message."""
    from wsss.stages.predict import read_image

    if isinstance(image, (str, Path)):
        return read_image(Path(image))
    if isinstance(image, Image.Image):
        label = getattr(image, "filename", "") or name
        check_rgb_mode(image, label)
        return np.array(image if image.mode == "RGB" else image.convert("RGB"))
    array = np.asarray(image)
    check_rgb_array(array, name)
    return np.ascontiguousarray(array)


def check_rgb_array(array: np.ndarray, name: str) -> None:
    """An array must be 8-bit RGB ``(H, W, 3)``. Other shapes and types are refused in the words of
    :func:`wsss.data.png.check_rgb_mode` for the PIL mode they would have (greyscale ``L``/``I;16``,
    ``RGBA``); other integer widths and floats are named by their type."""
    channels = array.shape[2] if array.ndim == 3 else 1 if array.ndim == 2 else None
    if channels is None or channels not in (1, 3, 4):
        raise WsssError(f"{name} has shape {array.shape}; an RGB image (H, W, 3) is needed")
    if array.dtype == np.uint8 and channels == 3:
        return
    if channels in (1, 4) and array.dtype in (np.uint8, np.uint16):
        mode = {(1, np.uint8): "L", (1, np.uint16): "I;16", (4, np.uint8): "RGBA", (4, np.uint16): "RGBA;16"}
        check_rgb_mode(_Mode(mode[channels, array.dtype.type]), name)
    bits = f"{array.dtype.itemsize * 8}-bit" if array.dtype.kind in "iu" else str(array.dtype)
    raise WsssError(f"{name} is {bits} ({array.dtype}); an 8-bit RGB image (uint8, H × W × 3) is needed")


@dataclass
class _Mode:
    """What :func:`check_rgb_mode` reads of a PIL image: its mode and info."""

    mode: str
    info: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- results


@dataclass
class Result:
    """One image segmented by :meth:`Segmenter.predict`.

    ``labels``: ``(H, W)`` uint8 class indices, ``background_index`` on white glass for specs whose
    white is background (as ``wsss predict``'s ``<name>_mask.png``). ``probabilities``: ``(C, H, W)``
    float16 softmax of the segmenter (gated, with test-time augmentation, blended across windows), in
    the order of ``classes``. ``palette``: the RGB colour of each class, then of the background.
    """

    labels: np.ndarray
    probabilities: np.ndarray
    classes: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]
    background_index: int
    _segmentation: Segmentation = field(repr=False)
    _flat_palette: list[int] = field(repr=False, default_factory=list)

    def probabilities_uint8(self) -> np.ndarray:
        """``(C, H, W)`` uint8: ``round(255 · p)`` of :attr:`probabilities`, each pixel's most probable
        class kept the strict maximum — the values ``--save-probs`` writes."""
        return self._segmentation.probs_uint8()

    def mask_image(self) -> Image.Image:
        """The labels as a palette ("P") image in the dataset's colours, as ``<name>_mask.png``."""
        img = Image.fromarray(np.ascontiguousarray(self.labels, dtype=np.uint8), mode="P")
        img.putpalette(self._flat_palette)
        return img

    def fractions(self) -> dict[str, float]:
        """Area fraction of every class and of the background (``summary.csv``'s columns)."""
        counts = np.bincount(self.labels.ravel(), minlength=max(len(self.classes), self.background_index) + 1)
        total = max(self.labels.size, 1)
        out = {name: float(counts[i] / total) for i, name in enumerate(self.classes)}
        out[BACKGROUND_NAME] = float(counts[self.background_index] / total)
        return out


# --------------------------------------------------------------------------- the segmenter


@dataclass(frozen=True)
class ModelSettings:
    """How :func:`load_model` loads and runs the models: what :class:`wsss.inference.ModelOptions`
    reads, checked as the command line checks its options."""

    checkpoint: Path
    stage1_checkpoint: Path | None = None
    dataset: str | None = None
    tile: int = 224
    overlap: int = 32
    batch_size: int | None = None  # None: 8 on the CPU, 64 on a CUDA GPU (wsss.inference.window_batch)
    device: str = "auto"
    precision: str = "fp32"
    tta: str = "none"
    gate_threshold: float = DEFAULT_GATE_THRESHOLD
    gate_mode: str = "mask"

    @property
    def gate(self) -> bool:
        return self.stage1_checkpoint is not None

    def __post_init__(self) -> None:
        object.__setattr__(self, "batch_size", window_batch(self.batch_size, self.device))
        check_precision(self.precision)
        check_window_options(self.tile, self.overlap, self.batch_size, self.gate, self.stage1_checkpoint)
        check_gate_options(self.gate_mode, self.gate_threshold)
        check_tta(self.tta)


class Segmenter:
    """A stage-2 segmenter (gated by a stage-1 classifier when loaded with one), ready to predict.

    Attributes: ``classes`` (names, in probability-channel order), ``palette`` (RGB per class, then
    the background's), ``background_index``, ``spec`` (the dataset spec), ``settings``
    (:class:`ModelSettings`), ``device``.
    """

    def __init__(self, predictor: TilePredictor, spec: DatasetSpec, settings: ModelSettings,
                 mpp: float | None = None) -> None:
        self.predictor, self.spec, self.settings = predictor, spec, settings
        self.mpp = mpp  # µm/px of the training patches, as the checkpoint records it (None: not recorded)
        self.device = predictor.device
        self.classes: tuple[str, ...] = tuple(spec.classes)
        self.palette: tuple[tuple[int, int, int], ...] = (*map(tuple, spec.colors), tuple(spec.background_color))
        self.background_index: int = spec.background_index

    def __repr__(self) -> str:
        gate = f", gate={self.settings.stage1_checkpoint}" if self.settings.gate else ""
        return f"Segmenter({self.settings.checkpoint}, classes={list(self.classes)}{gate}, device={self.device})"

    def predict(self, image: ImageLike, mpp: float | None = None, progress: bool = False) -> Result:
        """Segment one image of any size by the sliding window of ``wsss predict``.

        ``image``: ``(H, W, 3)`` uint8 RGB, a PIL image or an image file. ``mpp``: its µm per pixel
        (a file that records one, read as ``wsss predict`` reads it, gives its own); when the checkpoint records the µm/px it was trained at, the image is resampled to it for the
        model and the results taken back to ``(H, W)``; otherwise ``mpp`` cannot be used and the
        image is segmented as it is (one warning). Returns labels ``(H, W)`` and probabilities
        ``(C, H, W)`` float16. Raises :class:`WsssError` for images ``wsss predict`` refuses.
        """
        from wsss.stages.predict import check_image_size, check_not_a_slide

        if isinstance(image, (str, Path)):
            check_not_a_slide(Path(image))
        if mpp is not None:
            check_mpp(mpp, "mpp")
        name = str(image) if isinstance(image, (str, Path)) else "image"
        rgb = as_rgb(image)
        factor = self._factor(self._image_mpp(image, mpp))
        s = self.settings
        check_image_size(Path(name), rgb, s.tile, factor=factor)
        predictor = self.predictor.for_set(  # reinhard-set: this image is the set
            lambda: stain.measure_images([(rgb, image_side(s.tile, factor))], 1), name)
        seg = segment_image(rgb, predictor, self.spec, s.tile, s.overlap, s.batch_size, probs=True,
                            progress=progress, factor=factor)
        return Result(seg.labels, seg.probs, self.classes, self.palette, self.background_index, seg,
                      self.spec.flat_palette())

    def predict_slide(self, path: str | Path, out: str | Path | None = None, progress: bool = False,
                      **options: Any) -> dict:
        """Segment a whole-slide image with ``wsss predict-wsi``'s engine and the models loaded here;
        returns its summary (``<name>_summary.json``).

        ``out``: the folder for its outputs (mask, overlay, summary, and what ``options`` ask for);
        None: a temporary folder, removed afterwards (only the summary is kept). ``options``: the
        fields of :class:`wsss.wsi.predict_wsi.WsiConfig` that are not model settings, e.g.
        ``level``, ``mpp``, ``roi=(x, y, w, h)``, ``min_tissue``, ``geojson=True``,
        ``mask_format``, ``save_probs=True``, ``save_tissue_mask=True``, ``reader``, ``force``.
        """
        from wsss.wsi import predict_wsi

        allowed = {f.name for f in fields(predict_wsi.WsiConfig)} - {f.name for f in fields(ModelSettings)} \
            - {"inputs", "out", "gate", "shard", "model_mpp"}
        unknown = sorted(set(options) - allowed)
        if unknown:
            raise WsssError(f"predict_slide does not take {', '.join(unknown)}; it takes {', '.join(sorted(allowed))} "
                            "(model settings are given to load_model)")
        if out is None:
            with tempfile.TemporaryDirectory(prefix="wsss-slide-") as folder:
                return self.predict_slide(path, folder, progress, **options)
        s = self.settings
        cfg = predict_wsi.WsiConfig(
            inputs=(Path(path),), checkpoint=s.checkpoint, out=Path(out), dataset=s.dataset, gate=s.gate,
            stage1_checkpoint=s.stage1_checkpoint, gate_threshold=s.gate_threshold, gate_mode=s.gate_mode,
            tile=s.tile, overlap=s.overlap, batch_size=s.batch_size, device=s.device, precision=s.precision,
            tta=s.tta, **options)
        return predict_wsi.run(cfg, progress=progress, models=(self.predictor, self.spec)).summary

    @staticmethod
    def _image_mpp(image: ImageLike, mpp: float | None) -> float | None:
        """The µm/px an image file records (``wsss predict``'s rule), else ``mpp``."""
        recorded, problem = image_file_mpp(Path(image)) if isinstance(image, (str, Path)) else (None, None)
        if problem:
            log.warning("warning: %s: taken as not recorded (mpp, if given, is used instead)", problem)
        if recorded is None:
            return mpp
        if mpp is not None and not same_mpp(recorded, mpp):
            log.warning("warning: %s records %g µm/px; mpp %g is for images that record none, so the recorded "
                        "value is used", image, recorded, mpp)
        return recorded

    def _factor(self, mpp: float | None) -> float | None:
        """Model pixels per image pixel for an image of ``mpp`` µm/px (None: as it is)."""
        if mpp is None:
            return None
        if self.mpp is None:
            log.warning("warning: %s does not record the µm/px it was trained at: the image's µm/px (%g) is not "
                        "used, the image is segmented as it is", self.settings.checkpoint, mpp)
            return None
        return resample_factor(mpp, self.mpp)


def load_model(stage2_ckpt: str | Path, stage1_ckpt: str | Path | None = None, device: str = "auto", *,
               dataset: str | None = None, tile: int | None = None, overlap: int | None = None,
               batch_size: int | None = None, precision: str = "fp32", tta: str = "none", gate_threshold: float = DEFAULT_GATE_THRESHOLD,
               gate_mode: str = "mask") -> Segmenter:
    """Load a stage-2 checkpoint (ours or WSSS-Tissue's) as a :class:`Segmenter`, gated by the
    stage-1 classifier ``stage1_ckpt`` when given.

    The options are ``wsss predict``'s: ``dataset`` (needed for published checkpoints, which record
    none), ``tile`` and ``overlap`` (the sliding window, px; by default the checkpoint's patch size and
    ``wsss predict``'s overlap), ``batch_size`` (windows a forward pass; by default 8 on the CPU, 64 on
    a CUDA GPU), ``device`` (``auto``,
    ``cpu``, ``cuda``), ``precision`` (``fp32``, ``bf16``, ``fp16``, ``auto``), ``tta`` (``none``,
    ``flip``, ``d4``), ``gate_threshold``, ``gate_mode``. A stage-1 checkpoint as ``stage2_ckpt``, a
    class-count or spec mismatch, a bad option: :class:`WsssError`, in the command line's words.
    """
    model_mpp, patch_size = model_scale(Path(stage2_ckpt))
    tile, overlap = window_for(tile, overlap, patch_size)
    settings = ModelSettings(Path(stage2_ckpt), Path(stage1_ckpt) if stage1_ckpt is not None else None, dataset,
                             tile, overlap, batch_size, device, precision, tta, gate_threshold, gate_mode)
    predictor, spec = load_models(settings)
    return Segmenter(predictor, spec, settings, model_mpp)


# --------------------------------------------------------------------------- the classifier


class Classifier:
    """A stage-1 ResNet38 classifier: class probabilities and CAMs of patches.

    Each patch is resized to the classifier's training input size (when its checkpoint records one)
    and normalised with its recorded input normalisation, as ``wsss eval-cam`` does.
    """

    def __init__(self, loaded, spec: DatasetSpec, device: torch.device, precision: str) -> None:
        self.loaded, self.spec, self.device, self.precision = loaded, spec, device, precision
        self.model = loaded.model.eval().to(device)
        self.classes: tuple[str, ...] = tuple(spec.classes)

    def __repr__(self) -> str:
        return f"Classifier(classes={list(self.classes)}, device={self.device})"

    def _inputs(self, images: Sequence[ImageLike]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        rgb = [as_rgb(image) for image in images]
        size = self.loaded.image_size
        if size is None and len({a.shape for a in rgb}) > 1:
            raise WsssError("patches of different sizes need a classifier that records its input size")
        resized = [resize_rgb(a, size) for a in rgb]
        norm = self.loaded.norm.for_set(lambda: stain.measure_set(resized), f"these {len(rgb)} patches")  # reinhard-set
        x = torch.stack([to_tensor(a, norm) for a in resized])
        return x.to(self.device), [a.shape[:2] for a in rgb]

    @torch.no_grad()
    def classify(self, images: ImageLike | Sequence[ImageLike]) -> np.ndarray:
        """Class probabilities ``sigmoid(logits)``: ``(C,)`` float32 for one patch, ``(B, C)`` for a
        list of ``B`` patches."""
        one = not isinstance(images, (list, tuple))
        x, _ = self._inputs([images] if one else list(images))
        with autocast(self.device, self.precision):
            logits = self.model(x)
        probs = torch.sigmoid(logits.float()).cpu().numpy()
        return probs[0] if one else probs

    @torch.no_grad()
    def cams(self, image: ImageLike, normalise: bool = True) -> np.ndarray:
        """Class activation maps of one patch at its own size: ``(C, H, W)`` float32, upsampled
        (bilinear) from the classifier's output; ``normalise``: min-max normalised jointly over all
        classes to [0, 1], as the CAM evaluation does before it drops classes."""
        from wsss.cam.cam import minmax_normalise, upsample_cams

        x, sizes = self._inputs([image])
        with autocast(self.device, self.precision):
            cams, _ = self.model.cams_and_logits(x)
        maps = upsample_cams(cams.float(), sizes[0])
        if normalise:
            maps = minmax_normalise(maps)
        return maps[0].cpu().numpy()


def load_classifier(stage1_ckpt: str | Path, device: str = "auto", *, dataset: str | None = None,
                    precision: str = "fp32") -> Classifier:
    """Load a stage-1 checkpoint (ours or WSSS-Tissue's; ``dataset`` for published ones) as a
    :class:`Classifier`. A stage-2 checkpoint or a class-count mismatch: :class:`WsssError`."""
    from wsss.models.loading import classifier_and_spec

    check_precision(precision)
    loaded, spec = classifier_and_spec(Path(stage1_ckpt), dataset)
    dev = resolve_device(device)
    return Classifier(loaded, spec, dev, resolve_precision(precision, dev))


# --------------------------------------------------------------------------- training and the whole chain


def train(stage: int, dataset: str, data: str | Path, *, preset: str | None = None, resume: bool = False,
          force: bool = False, **options: Any) -> dict:
    """Train stage 1 (the classifier) or stage 2 (the segmenter), as ``wsss train-stage1`` and
    ``wsss train-stage2`` do: ``options`` are the fields of :class:`wsss.config.Stage1Config` or
    :class:`wsss.config.Stage2Config` (``out``, ``epochs``, ``batch_size``, ``device``, ...), over the
    preset's values. Returns the run's summary (metrics included)."""
    from wsss.config import STAGE1_PRESETS, STAGE2_PRESETS, Stage1Config, Stage2Config, resolve
    from wsss.stages import stage1, stage2
    from wsss.stages.common import given_options

    if stage not in (1, 2):
        raise WsssError(f"stage must be 1 or 2, not {stage!r}")
    cls, presets, module = (Stage1Config, STAGE1_PRESETS, stage1) if stage == 1 else \
        (Stage2Config, STAGE2_PRESETS, stage2)
    given = dict(options, dataset=dataset, data=Path(data))
    cfg = resolve(cls, presets, preset, **given)
    return module.train(cfg, resume=resume, force=force, given=given_options(preset, given))


def reproduce(dataset: str, data: str | Path, **options: Any):
    """Run the whole chain as ``wsss reproduce`` does (stage 1, pseudo-masks, stage 2, the gated
    test, the report): ``options`` are the fields of :class:`wsss.stages.reproduce.ReproduceConfig`
    (``synth=True``, ``preset``, ``seeds``, ``device``, ...). Returns its result; the report is
    written to ``report_dir``."""
    from wsss.stages.reproduce import ReproduceConfig, default_run, run

    options.setdefault("run", default_run(dataset, bool(options.get("synth"))))
    try:
        cfg = ReproduceConfig(dataset=dataset, data=Path(data), **options)
    except TypeError as exc:
        raise WsssError(f"bad configuration: {exc}") from None
    return run(cfg)
