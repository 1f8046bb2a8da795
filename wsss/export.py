"""``wsss export``: a stage-2 segmenter as TorchScript or ONNX, for use outside wsss and PyTorch.

The exported model takes what a deployment has at hand and needs nothing of wsss::

    image  (batch, 3, height, width) float32, RGB, 0-255   any batch, any size (dynamic axes)
    logits (batch, C, height, width) float32                the segmenter's class logits at the input's size
    gate   (batch, C) float32                               with --stage1-checkpoint: the classifier's
                                                            sigmoid probabilities (the gate rules out a
                                                            class at <= its threshold)

Each model's recorded input normalisation, ``(x / 255 - mean) / std``, is part of the graph (the
same arithmetic as :func:`wsss.data.datasets.to_tensor`). A JSON sidecar (``<out>.json`` beside the
model, the suffix replaced) says what the outputs are: classes, palette and background, the input
normalisation, the µm/px and patch size the checkpoint records (null when it records none), the
training input size, the gate's threshold and mode, the checkpoints' sha256.

After writing, the export is checked against PyTorch on a random input of another batch and size
than the one it was traced with (TorchScript: by torch; ONNX: by onnxruntime, when installed — the
``export`` extra) and the largest difference is reported; above :data:`TOLERANCE` it is an error and
nothing is kept.

TorchScript is traced (``torch.jit.trace``) and ONNX written by PyTorch's TorchScript-based exporter
(``dynamo=False``, opset 17): both keep the interpolation to the input's size dynamic, and neither
needs a package beyond torch to write. PyTorch marks both as deprecated in favour of ``torch.export``;
their warnings about it are silenced here, the checks above are what says the file is right.
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from wsss.data import stain
from wsss.data.background import GLASS_MAX_CHROMA, WHITE_GREY
from wsss.data.datasets import InputNorm
from wsss.data.specs import BACKGROUND_NAME
from wsss.errors import WsssError
from wsss.gate import DEFAULT_GATE_THRESHOLD, check_gate_options
from wsss.runs.owner import file_sha256
from wsss.runtime import atomic_path

log = logging.getLogger(__name__)

FORMATS = ("torchscript", "onnx")
TOLERANCE = 1e-4
STAIN_TOLERANCE = 0.05
"""The check's bound for a model with a stain step in its graph: that step truncates to whole grey levels,
as wsss's NumPy path does, so a value that lands on a level's edge can truncate to the neighbouring level
in one runtime and not in the other, a small change of the logits (a missing or wrong step changes them
by far more)."""
OPSET = 17


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise WsssError(f"--format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    return fmt


class Normalise(nn.Module):
    """RGB 0-255 ``(B, 3, H, W)`` → ``(x / 255 - mean) / std``, a model's recorded input normalisation,
    after its Reinhard stain target when it has one (:class:`wsss.data.stain.ReinhardGraph`, each image
    of the batch on its own, as wsss normalises each patch or window)."""

    def __init__(self, norm: InputNorm) -> None:
        super().__init__()
        from wsss.data.stain import REINHARD_METHODS, SET_METHOD, ReinhardGraph

        self.stain = None
        if norm.stain is not None and norm.stain.method != SET_METHOD:  # reinhard-set: the caller's (sidecar)
            if norm.stain.method not in REINHARD_METHODS:  # Macenko: eigenvectors and percentiles
                raise WsssError(f"this model normalises stain with {norm.stain.method} before its input scaling; "
                                "an exported graph can carry reinhard and reinhard-mean only, so it is not exported")
            self.stain = ReinhardGraph(norm.stain)
        self.register_buffer("mean", torch.tensor(norm.mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(norm.std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, image: Tensor) -> Tensor:
        if self.stain is not None:
            image = self.stain(image)
        return (image / 255.0 - self.mean) / self.std


class ExportedSegmenter(nn.Module):
    """The segmenter with its normalisation: image → logits ``(B, C, H, W)``."""

    def __init__(self, segmenter: nn.Module, norm: InputNorm) -> None:
        super().__init__()
        self.normalise, self.segmenter = Normalise(norm), segmenter

    def forward(self, image: Tensor) -> Tensor:
        return self.segmenter(self.normalise(image))["out"]


class ExportedGatedSegmenter(ExportedSegmenter):
    """The segmenter and the stage-1 classifier, each with its normalisation: image → logits
    ``(B, C, H, W)`` and the classifier's sigmoid probabilities ``(B, C)``."""

    def __init__(self, segmenter: nn.Module, norm: InputNorm, classifier: nn.Module, gate_norm: InputNorm) -> None:
        super().__init__(segmenter, norm)
        self.gate_normalise, self.classifier = Normalise(gate_norm), classifier

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        return super().forward(image), torch.sigmoid(self.classifier(self.gate_normalise(image)))


@dataclass(frozen=True)
class ExportConfig:
    """``wsss export``: which checkpoints, which format, where."""

    checkpoint: Path
    out: Path
    format: str
    stage1_checkpoint: Path | None = None
    dataset: str | None = None
    gate_threshold: float = DEFAULT_GATE_THRESHOLD
    gate_mode: str = "mask"
    force: bool = False

    def __post_init__(self) -> None:
        check_format(self.format)
        check_gate_options(self.gate_mode, self.gate_threshold)
        other = {"onnx": (".pt", ".pth", ".ts", ".torchscript"), "torchscript": (".onnx",)}[self.format]
        if self.out.suffix.lower() in other:
            raise WsssError(f"--out {self.out} names a{' TorchScript' if self.format == 'onnx' else 'n ONNX'} file; "
                            f"a --format {self.format} model is written as {'.onnx' if self.format == 'onnx' else '.pt'}")

    @property
    def sidecar(self) -> Path:
        return self.out.with_suffix(".json") if self.out.suffix != ".json" else self.out.with_name(self.out.name + ".json")


@dataclass
class ExportResult:
    model: Path
    sidecar: Path
    max_difference: float | None  # from PyTorch on the check input; None: not checked (no onnxruntime)
    check_shape: tuple[int, ...]


def build(cfg: ExportConfig) -> tuple[nn.Module, dict]:
    """The module to export (eval mode, CPU) and the sidecar's description of it."""
    from wsss.models.deeplab import read_checkpoint
    from wsss.models.loading import load_classifier, segmenter_and_spec

    seg, spec = segmenter_and_spec(cfg.checkpoint, cfg.dataset)
    recorded = read_checkpoint(cfg.checkpoint)
    gate = load_classifier(cfg.stage1_checkpoint, spec) if cfg.stage1_checkpoint is not None else None
    if gate is None:
        module: nn.Module = ExportedSegmenter(seg.model, seg.norm)
    else:
        module = ExportedGatedSegmenter(seg.model, seg.norm, gate.model, gate.norm)
    module = module.eval().float().cpu()
    classes = list(spec.classes)
    outputs = [{"name": "logits", "shape": ["batch", len(classes), "height", "width"], "dtype": "float32",
                "meaning": "class logits at the input's size, channels in the order of classes; softmax over "
                           "axis 1 gives the probabilities"}]
    if gate is not None:
        outputs.append({"name": "gate", "shape": ["batch", len(classes)], "dtype": "float32",
                        "meaning": "the stage-1 classifier's class probabilities (sigmoid) of the whole input; "
                                   "a class at or below threshold is ruled out (mode mask: its logit set to -inf "
                                   "before the argmax; mode reference: logits multiplied by p > threshold)",
                        "threshold": cfg.gate_threshold, "mode": cfg.gate_mode,
                        "input_size": gate.image_size})
    from wsss import __version__

    sidecar = {
        "format": cfg.format, "file": cfg.out.name, "wsss_version": __version__, "torch_version": torch.__version__,
        "dataset": spec.name, "classes": classes,
        "palette": {name: list(colour) for name, colour in zip(classes, spec.colors)},
        "background": {"index": spec.background_index, "name": BACKGROUND_NAME,
                       "color": list(spec.background_color), "white_is_background": spec.white_is_background},
        "input": {"name": "image", "shape": ["batch", 3, "height", "width"], "dtype": "float32", "channels": "RGB",
                  "range": [0, 255], "normalisation": "(x / 255 - mean) / std, in the model",
                  "mean": list(seg.norm.mean), "std": list(seg.norm.std),
                  "stain": _stain(seg.norm)},
        "outputs": outputs,
        "mpp": _positive(recorded.get("mpp")),
        "patch_size": _positive(recorded.get("patch_size")),
        "image_size": seg.image_size,
        "window": "segment windows of patch_size px (the training patches; 224 for LUAD-HistoSeg and BCSS-WSSS when "
                  "not recorded), resized to image_size px when that is recorded, at mpp µm/px when recorded",
        "checkpoint": {"name": cfg.checkpoint.name, "sha256": file_sha256(cfg.checkpoint)},
        "stage1_checkpoint": ({"name": cfg.stage1_checkpoint.name, "sha256": file_sha256(cfg.stage1_checkpoint),
                               "mean": list(gate.norm.mean), "std": list(gate.norm.std), "stain": _stain(gate.norm)}
                              if gate is not None else None),
    }
    return module, sidecar


def _stain(norm: InputNorm) -> dict | None:
    """The sidecar's word on a stain target: in the graph, before the scaling (None: no stain step)."""
    if norm.stain is None:
        return None
    if norm.needs_set:
        return {**norm.stain.to_dict(), "in_graph": False,
                "meaning": "not in the model: before it, shift every image of a set (a slide, the images of one "
                           "batch job) in CIE LAB (D65; L 0-100) by lab_mean minus the set's mean of each image's "
                           f"(or window's) LAB channel means{_over_pixels(norm.stain.pixels)}, images with under 1% "
                           f"stained pixels left out of that mean, as wsss does; with fewer than {stain.MIN_SET_PATCHES} stained images in the set, "
                           "no shift; and no shift unless significant: the norm over L, a, b of (set mean - lab_mean)"
                           f" / (lab_std * sqrt(1/n + 1/patches)) above {stain.SET_SIGNIFICANCE}, n the set's stained "
                           f"images counted as {stain.SET_MAX_PATCHES} at most"}
    return {**norm.stain.to_dict(), "in_graph": True,
            "meaning": "each image is mapped onto this LAB target before the scaling, inside the model; an image "
                       "with under 1% stained pixels or a flat LAB channel passes through unchanged"}


def _over_pixels(pixels: str) -> str:
    """How a reinhard-set reference's patch means were taken, in the sidecar's words."""
    if pixels == "all":
        return " over all its pixels"
    return (f" over its tissue pixels (glass left out: ITU-R 601 grey above {WHITE_GREY} with max - min of R, "
            f"G, B at most {GLASS_MAX_CHROMA})")


def _positive(value):
    return value if isinstance(value, (int, float)) and value > 0 else None


def example_input(side: int, batch: int = 2, seed: int = 0) -> Tensor:
    """A random RGB 0-255 batch ``(batch, 3, side, side)`` (what tracing runs on)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, side, side, generator=generator) * 255


def check_input(side: int) -> Tensor:
    """Another batch and size than :func:`example_input`'s: a wrongly fixed axis shows."""
    generator = torch.Generator().manual_seed(1)
    return torch.rand(3, 3, side + 16, side + 40, generator=generator) * 255


def _outputs(result) -> list[Tensor]:
    return list(result) if isinstance(result, (tuple, list)) else [result]


def export(cfg: ExportConfig) -> ExportResult:
    """Write the model and its sidecar (atomically; existing files only with ``force``), then check
    the model against PyTorch."""
    other = _sidecar_of(cfg.sidecar)
    if other is not None and other != cfg.out.name and not cfg.force:
        raise WsssError(f"{cfg.sidecar} is the sidecar of {other}, exported earlier (a model's sidecar is its --out "
                        "with the suffix .json): give this export another name, or pass --force to replace it")
    for path in (cfg.out, cfg.sidecar):
        if path.exists() and not cfg.force:
            raise WsssError(f"{path} exists; pass --force to replace it")
    module, sidecar = build(cfg)
    side = sidecar["image_size"] or sidecar["patch_size"] or 64
    example = example_input(side)
    probe = check_input(side)
    with torch.no_grad():
        expected = _outputs(module(probe))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        if cfg.format == "torchscript":
            difference = _write_torchscript(module, example, probe, expected, cfg.out)
        else:
            difference = _write_onnx(module, example, probe, expected, cfg.out, len(sidecar["outputs"]))
    with atomic_path(cfg.sidecar) as tmp:
        tmp.write_text(json.dumps(sidecar, indent=2) + "\n", encoding="utf-8")
    return ExportResult(cfg.out, cfg.sidecar, difference, tuple(probe.shape))


def _sidecar_of(path: Path) -> str | None:
    """The model file an existing sidecar describes (its ``file``); None when there is none or it is
    not one of ours."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record.get("file") if isinstance(record, dict) and isinstance(record.get("file"), str) else None


def _check(difference: float, what: str, tolerance: float = TOLERANCE) -> float:
    if not difference <= tolerance:
        raise WsssError(f"the {what} export differs from PyTorch by {difference:.3g} (more than {tolerance:g}); "
                        "nothing was written")
    return difference


def _tolerance(module: nn.Module) -> float:
    has_stain = any(isinstance(m, Normalise) and m.stain is not None for m in module.modules())
    return STAIN_TOLERANCE if has_stain else TOLERANCE


def _largest(got: list, expected: list[Tensor]) -> float:
    if len(got) != len(expected):
        return float("inf")
    return max(float((torch.as_tensor(g) - e).abs().max()) for g, e in zip(got, expected))


def _write_torchscript(module: nn.Module, example: Tensor, probe: Tensor, expected: list[Tensor], out: Path) -> float:
    with torch.no_grad():
        traced = torch.jit.trace(module, example, check_trace=False)
    with atomic_path(out) as tmp:
        torch.jit.save(traced, str(tmp))
        loaded = torch.jit.load(str(tmp))
        with torch.no_grad():
            difference = _check(_largest(_outputs(loaded(probe)), expected), "TorchScript", _tolerance(module))
    return difference


def _write_onnx(module: nn.Module, example: Tensor, probe: Tensor, expected: list[Tensor], out: Path,
                outputs: int) -> float | None:
    names = ["logits", "gate"][:outputs]
    axes = {"image": {0: "batch", 2: "height", 3: "width"}, "logits": {0: "batch", 2: "height", 3: "width"}}
    if outputs == 2:
        axes["gate"] = {0: "batch"}
    with atomic_path(out) as tmp:
        try:
            torch.onnx.export(module, (example,), str(tmp), input_names=["image"], output_names=names,
                              dynamic_axes=axes, opset_version=OPSET, dynamo=False)
        except (ModuleNotFoundError, torch.onnx.OnnxExporterError) as exc:
            if isinstance(exc, ModuleNotFoundError) or "not installed" in str(exc):
                raise WsssError("ONNX export needs the onnx package: pip install onnx onnxruntime (the export extra)") from None
            raise
        difference = _onnx_difference(tmp, probe, expected, _tolerance(module))
    return difference


def _onnx_difference(path: Path, probe: Tensor, expected: list[Tensor], tolerance: float) -> float | None:
    try:
        import onnxruntime
    except ImportError:
        log.warning("warning: onnxruntime is not installed, so the ONNX file was not checked against PyTorch "
                    "(pip install onnxruntime)")
        return None
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"image": probe.numpy()})
    return _check(_largest(got, expected), "ONNX", tolerance)
