"""The ``wsss`` command line. Parses options, calls the library; nothing else imports Typer."""

from __future__ import annotations

import functools
import inspect
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import typer

from wsss.errors import Interrupted, Stopped, WsssError
from wsss.gate import DEFAULT_GATE_THRESHOLD

app = typer.Typer(
    name="wsss",
    help="Weakly-supervised tissue segmentation of histopathology patches from patch-level labels.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)



def version_lines() -> list[str]:
    """``wsss --version``: the package's version, then torch's and whether CUDA can be used."""
    import torch

    from wsss import __version__

    if torch.cuda.is_available():
        names = sorted({torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())})
        cuda = f"CUDA {torch.version.cuda} available: {torch.cuda.device_count()} GPU(s) ({', '.join(names)})"
    elif torch.version.cuda:
        cuda = f"CUDA {torch.version.cuda} build, no GPU available: runs on the CPU"
    else:
        cuda = "CPU-only build: runs on the CPU"
    return [f"wsss {__version__}", f"torch {torch.__version__}, {cuda}", f"python {sys.version.split()[0]}"]


def _print_version(value: bool) -> None:
    if value:
        typer.echo("\n".join(version_lines()))
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True,
        help="Print the version of wsss and torch, and whether CUDA is available, then exit."),
) -> None:
    """Weakly-supervised tissue segmentation of histopathology patches from patch-level labels."""


DATASET_HELP = "Dataset spec: luad, bcss or the path of a TOML spec file (docs/own-data.md)."
DatasetOpt = typer.Option(..., "--dataset", help=DATASET_HELP)
DataDatasetOpt = typer.Option(
    None, "--dataset", help=DATASET_HELP[:-1] + "; default: the data folder's spec.toml (wsss extract-patches writes one).")
CheckpointDatasetOpt = typer.Option(
    None, "--dataset", help="luad, bcss or a TOML spec file (default: the spec recorded in the checkpoint; needed for "
                            "published checkpoints; refused when it differs from the record).")
LabelsCsvOpt = typer.Option(
    None, "--labels-csv", help="Training labels from this CSV (a file column, then one 0/1 column per class, named "
                               "by class) instead of the spec's label source.")
TTA_HELP = ("Test-time augmentation: none, flip (the window, flipped left-right, upside down and both: 4 passes) "
            "or d4 (those and their transposes, every 90° rotation with and without a flip: 8 passes); "
            "softmax probabilities are mapped back and averaged.")
PRESET_HELP = ("paper (the default: what the reference code computed), cpu-paper (the paper's method at CPU scale), "
               "cpu (CPU scale with our measured improvements; make reproduce) or best (full size with them). "
               "Options given explicitly override the preset.")
ConfigOpt = typer.Option(
    # "\\[": Rich (typer's help) would take [stage1] for markup and drop it
    None, "--config", help="A TOML file whose tables set configuration keys as --print-config writes them, each "
                           "command its own (\\[stage1], \\[pseudo_masks], \\[stage2], \\[predict], \\[predict_wsi]; "
                           "reproduce the first three; the presets are such files): over the preset, under the options "
                           "given here.")
PrintConfigOpt = typer.Option(
    False, "--print-config", help="Print the resolved configuration as a --config file's table and exit.")
StainNormOpt = typer.Option(
    None, "--stain-norm", help="none (the reference), macenko, reinhard, reinhard-mean (LAB means only, each patch "
                               "keeping its own spread) or reinhard-set (one LAB shift per set: an evaluation split, "
                               "the images of a predict call, a slide): a stain target fitted on the training set "
                               "(up to 200 patches) is stored in the checkpoint and every command that runs the "
                               "model maps its input onto it.")
StainTargetOpt = typer.Option(
    None, "--stain-target", help="Fit the --stain-norm target on this RGB image (its tissue tiles) instead of the "
                                 "training set.")
HedScaleOpt = typer.Option(None, "--hed-scale", help="HED augmentation: each stain's density × (1 + U(-s, s)) (0: off).")
HedShiftOpt = typer.Option(None, "--hed-shift", help="HED augmentation: each stain's density + U(-s, s) (0: off).")
LabJitterOpt = typer.Option(
    None, "--lab-jitter", help="RandStainNA: LAB statistics drawn around the training set's, spread × this (1: its "
                               "own spread; 0: off).")
LightJitterOpt = typer.Option(
    None, "--light-jitter", help="Brightness, contrast × (1 + U(-s, s)) and gamma exp(U(-s, s)) (0: off).")
BlurJitterOpt = typer.Option(None, "--blur-jitter", help="With p = 0.5 a Gaussian blur of σ ~ U(0, s) px (0: off).")
JpegJitterOpt = typer.Option(
    None, "--jpeg-jitter", help="With p = 0.5 a JPEG round trip at a quality from this to 95 (0: off).")

PRECISION_HELP = ("fp32, bf16 (bfloat16 autocast), fp16 (float16 autocast with a gradient scaler) or auto (bf16 on "
                  "CUDA GPUs and CPUs that support it, else fp32). Losses, softmax and CAM normalisation stay fp32.")
PM_PRECISION_HELP = (
    "Precision of the classifier's Grad-CAM passes: fp32, bf16, fp16 or auto (bf16 on CUDA GPUs and CPUs that "
    "support it, else fp32). The weighted sums, upsampling and normalisation stay fp32; bf16 changed 0.2-0.3 % "
    "of the pseudo-mask pixels of trained classifiers (bench/precision.py). Masks of another precision are not "
    "mixed into OUT.")
AMP_HELP = "Old spelling of --precision: --amp is fp16 on CUDA and bf16 on the CPU, --no-amp is fp32."
GATE_MODE_HELP = ("mask (a gated class gets logit -inf; if every class is gated the most probable stays) or "
                  "reference (logits x (p > threshold), exactly as WSSS-Tissue).")
PRESET_GATE_HELP = GATE_MODE_HELP + " Default: the preset's (paper, cpu-paper: reference; cpu, best: mask)."
CAM_TIE_HELP = ("ours (a dropped class never wins) or reference (where every kept class is 0, the lowest class "
                "index wins, as WSSS-Tissue's evaluation).")


# Options that several commands share, defined once (each keeps its name, default and help everywhere).
AmpOpt = typer.Option(None, "--amp/--no-amp", help=AMP_HELP)
WindowBatchOpt = typer.Option(
    None, "--batch-size", min=1, help="Windows per forward pass (rows of windows are batched together to fill it). "
                                      "Default: 8 on the CPU, 64 on a CUDA GPU.", show_default=False)
SegmenterCheckpointOpt = typer.Option(..., "--checkpoint", help="Stage-2 checkpoint (ours or WSSS-Tissue's).")
ClassifierCheckpointOpt = typer.Option(..., "--checkpoint", help="Stage-1 checkpoint (ours or WSSS-Tissue's).")
DataOpt = typer.Option(..., "--data", help="Dataset folder.")
DeviceAutoOpt = typer.Option("auto", "--device", help="auto, cpu or cuda.")
DeviceOpt = typer.Option(None, "--device", help="auto, cpu or cuda.")
EpochsOpt = typer.Option(None, "--epochs", min=1)
ForceOpt = typer.Option(False, "--force", help="Start over even if OUT holds an earlier run.")
GateModeMaskOpt = typer.Option("mask", "--gate-mode", help=GATE_MODE_HELP)
GateModeOpt = typer.Option(None, "--gate-mode", help=PRESET_GATE_HELP)
GateOpt = typer.Option(False, "--gate/--no-gate", help="Gate every tile with the stage-1 classifier.")
GateThresholdOpt = typer.Option(
    DEFAULT_GATE_THRESHOLD, "--gate-threshold", help="Classes with probability <= this are gated.")
ImageSizeOpt = typer.Option(None, "--image-size", min=16, help="Resize patches to this side.")
InputNormOpt = typer.Option(None, "--input-norm", help="none ([0,1], reference) or imagenet.")


def _json_file(path: Optional[Path]) -> Optional[Path]:
    """``--json``: a folder is refused before any work is done, not after it."""
    if path is not None and path.is_dir():
        raise WsssError(f"--json {path} is a folder; give the name of the file to write")
    return path


JsonOutOpt = typer.Option(None, "--json", help="Write the metrics here.", callback=_json_file)
OutOpt = typer.Option(Path("checkpoints"), "--out", help="Where checkpoints, config and logs go.")
PmDirOpt = typer.Option(None, "--pm-dir", help="Pseudo-mask folder (default: DATA/train_PM).")
SlideMppOpt = typer.Option(
    None, "--slide-mpp", help="The slides' level-0 µm/px, for files that do not record it (a file's own value wins, "
                              "with a warning; a manifest's mpp column overrides both); a slide without either is "
                              "refused when a µm/px is to be read.")
PrecisionFp32Opt = typer.Option(None, "--precision", help=PRECISION_HELP + " Default fp32.")
PrecisionOpt = typer.Option(None, "--precision", help=PRECISION_HELP)
PresetOpt = typer.Option(None, "--preset", help=PRESET_HELP)
ReaderOpt = typer.Option(
    "auto", "--reader", help="auto (OpenSlide when it knows the file, else tifffile), openslide or tifffile.")
SeedOpt = typer.Option(None, "--seed")
SplitOpt = typer.Option("test", "--split", help="val or test.")
Stage1CheckpointOpt = typer.Option(None, "--stage1-checkpoint", help="Classifier for the gate.")
StainJitterOpt = typer.Option(
    None, "--stain-jitter", help="HED stain augmentation strength, e.g. 0.05 (0: off, the reference).")
TtaOpt = typer.Option("none", "--tta", help=TTA_HELP)
WorkersOpt = typer.Option(None, "--workers", min=0)
WorkersZeroOpt = typer.Option(0, "--workers", min=0)


def option_group(name: str, options: dict[str, tuple[Any, Any]]) -> Callable[[Callable], Callable]:
    """Give a command the options of a group defined once (``{field: (annotation, typer.Option)}``) in
    place of its parameter ``name``; the command receives them as one dict ``name`` of field → value.
    Typer reads the command's signature, so the options appear in ``--help`` where ``name`` stood."""

    def decorate(command: Callable) -> Callable:
        signature = inspect.signature(command)
        params = []
        for param in signature.parameters.values():
            if param.name != name:
                params.append(param)
                continue
            params += [inspect.Parameter(field, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=option,
                                         annotation=annotation) for field, (annotation, option) in options.items()]

        @functools.wraps(command)
        def run(**kwargs: Any) -> Any:
            return command(**{k: v for k, v in kwargs.items() if k not in options},
                           **{name: {k: kwargs[k] for k in options}})

        run.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
        del run.__wrapped__  # Typer must see the group's options, not the placeholder
        return run

    return decorate


# The stain normalisation and colour augmentation options of both training stages (config fields).
COLOUR_OPTIONS: dict[str, tuple[Any, Any]] = {
    "stain_jitter": (Optional[float], StainJitterOpt), "stain_norm": (Optional[str], StainNormOpt),
    "stain_target": (Optional[Path], StainTargetOpt), "hed_scale": (Optional[float], HedScaleOpt),
    "hed_shift": (Optional[float], HedShiftOpt), "lab_jitter": (Optional[float], LabJitterOpt),
    "light_jitter": (Optional[float], LightJitterOpt), "blur_jitter": (Optional[float], BlurJitterOpt),
    "jpeg_jitter": (Optional[int], JpegJitterOpt),
}


@app.command()
def synth(
    out: Path = typer.Argument(..., help="Folder to write the synthetic dataset into."),
    spec_name: str = typer.Option(
        "luad", "--spec", help="luad, bcss or a TOML spec file: one distinguishable texture per class (up to 16), "
                               "its colours, background value, mask encoding and label CSV."),
    train: int = typer.Option(1000, "--train", min=1, help="Training patches."),
    val: int = typer.Option(100, "--val", min=1, help="Validation patches."),
    test: int = typer.Option(100, "--test", min=1, help="Test patches."),
    size: int = typer.Option(224, "--size", min=32, help="Patch side in pixels."),
    seed: int = typer.Option(0, "--seed", help="Seed; same seed, same files."),
    workers: int = typer.Option(2, "--workers", min=1, help="Worker processes."),
    force: bool = typer.Option(False, "--force", help="Write into OUT even if it already holds a dataset."),
    look: str = typer.Option(
        "default", "--look", help="default; shifted (stain 0.8, hue 12°, texture 1.3, pale 0.3: data a model was "
                                  "not tuned to); or a stain/scanner look with the default look's tissue and masks: "
                                  "lab-b (bluer H, purpler and weaker E, darker, slightly blurred), pale, dark, jpeg "
                                  "(quality 40), blur. The options below override its values."),
    stain_scale: Optional[float] = typer.Option(
        None, "--stain-scale", help="Multiplier of the H and E optical densities (default look 1.0)."),
    hue_shift: Optional[float] = typer.Option(
        None, "--hue-shift", help="Rotate the H and E stain vectors by this many degrees (default look 0)."),
    texture_scale: Optional[float] = typer.Option(
        None, "--texture-scale", help="Multiplier of nucleus, fibre and spacing sizes (default look 1.0)."),
    pale: Optional[float] = typer.Option(
        None, "--pale", help="Probability that a tissue region is rendered pale, partly above the white-glass "
                             "rule (grey > 200) while still tissue in the masks (default look 0)."),
    task_seed: Optional[int] = typer.Option(
        None, "--task-seed", help="A random task: every class gets a new appearance drawn from this seed (nuclear "
                                  "size, shape and arrangement, fibres, ground texture, debris, stain mix) instead "
                                  "of the fixed textures; same seed, same task."),
    difficulty: float = typer.Option(
        0.5, "--difficulty", help="Of a random task, 0-1: how alike two classes may be, how small a labelled region "
                                  "and how fine the texture."),
    mpp: Optional[float] = typer.Option(
        None, "--mpp", help="µm/px of the patches: the tissue is drawn at this pixel size whatever --size is "
                            "(1.0 = a 224-px patch of the default; --size 112 --mpp 1 is a quarter of its field "
                            "at the same detail). Default: the patch spans the 224-px field at any size."),
) -> None:
    """Generate a synthetic H&E dataset in the LUAD-HistoSeg layout (plus train_gt/ masks) for a dataset spec."""
    from wsss.data.specs import get_spec
    from wsss.data.synth import generate, resolve_look
    from wsss.data.tasks import check_difficulty, sample_task

    from wsss.runs.owner import owned_folder

    spec = get_spec(spec_name)
    appearance = resolve_look(look, stain_scale=stain_scale, hue_shift=hue_shift, texture_scale=texture_scale, pale=pale)
    if not force and out.is_dir() and any(out.iterdir()):
        raise WsssError(f"{out} is not empty; pass --force to write into it anyway")
    check_difficulty(difficulty)
    if mpp is not None and not 0.05 <= mpp <= 20:
        raise WsssError(f"--mpp must be between 0.05 and 20 µm/px, not {mpp:g}")
    task = None if task_seed is None else sample_task(task_seed, spec.num_classes, difficulty)
    settings = {"train": train, "val": val, "test": test, "size": size, "seed": seed, "look": appearance.to_dict(),
                "spec": spec.name, "task_seed": task_seed, "difficulty": difficulty if task else None, "mpp": mpp}
    with owned_folder(out, "synth", config=settings, force=force):
        summary = generate(out, n_train=train, n_val=val, n_test=test, size=size, seed=seed, workers=workers,
                           look=appearance, spec=spec, task=task, mpp=mpp)
    typer.echo(json.dumps({**summary, "spec": spec.name}, indent=2))  # the whole spec is in OUT/synth.json


@app.command("check-data")
def check_data(
    root: Path = typer.Argument(..., help="Dataset folder (train/, val/ or valid/, test/)."),
    dataset: Optional[str] = DataDatasetOpt,
    labels_csv: Optional[Path] = LabelsCsvOpt,
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the report as JSON.", callback=_json_file),
) -> None:
    """Count patches, labels and mask pixels; list every problem. Exit 1 if there is any."""
    from wsss.config import folder_spec
    from wsss.data.check import check_dataset, format_report, report_to_json
    from wsss.data.specs import get_spec
    from wsss.metrics import write_json

    spec = get_spec(dataset or folder_spec(root), labels_csv)
    report = check_dataset(root, spec, progress=sys.stderr.isatty())
    typer.echo(format_report(report, spec))
    if json_out is not None:
        write_json(json_out, report_to_json(report, spec))
    if not report.ok:
        raise typer.Exit(1)


@app.command("extract-patches")
def extract_patches(
    slides: list[Path] = typer.Argument(
        ..., show_default=False,
        help="Whole-slide images, folders of them (searched recursively) or manifest CSVs (a path column; optional "
             "mpp: the slide's level-0 µm/px, roi: x,y,w,h, patient: slides of one patient stay in one split)."),
    dataset: str = DatasetOpt,
    out: Path = typer.Option(..., "--out", help="Dataset folder to write (LUAD-HistoSeg layout)."),
    annotations: Optional[Path] = typer.Option(
        None, "--annotations", help="QuPath GeoJSON: a folder of <slide name>.geojson files, or one file for one "
                                    "slide. Default: <slide name>.geojson next to each slide."),
    mpp: Optional[float] = typer.Option(
        None, "--mpp", help="µm per pixel to cut the patches at (default: the spec's mpp); recorded in the dataset and "
                            "in every model trained on it."),
    patch: int = typer.Option(224, "--patch", min=16, help="Patch side in pixels (at --mpp)."),
    stride: Optional[int] = typer.Option(
        None, "--stride", min=1, help="Pixels (at --mpp) from one patch to the next (default: --patch, no overlap)."),
    min_tissue: float = typer.Option(
        0.5, "--min-tissue", help="Keep patches whose tissue (saturation above the slide's Otsu threshold) covers at "
                                  "least this fraction."),
    min_class_fraction: float = typer.Option(
        0.05, "--min-class-fraction",
        help="A class is in a patch's label when its polygons cover at least this fraction of the patch; a training "
             "patch with that much unannotated tissue is left out."),
    class_map: Optional[Path] = typer.Option(
        None, "--class-map", help="CSV: QuPath class name, spec class (empty: skip). Default: QuPath names matched "
                                  "to the spec's classes ignoring case; other names are skipped with a warning."),
    val_slides: Optional[str] = typer.Option(None, "--val-slides", help="Validation slides by name: a,b (no extension)."),
    test_slides: Optional[str] = typer.Option(None, "--test-slides", help="Test slides by name: c,d."),
    val_fraction: float = typer.Option(
        0.0, "--val-fraction", help="Instead of names: this fraction of the slides (patients) go to val, drawn by --seed."),
    test_fraction: float = typer.Option(0.0, "--test-fraction", help="... and this fraction to test."),
    seed: int = typer.Option(0, "--seed", help="Seed of the drawn split and of the contact sheet's samples."),
    slide_mpp: Optional[float] = SlideMppOpt,
    bounds_offset: bool = typer.Option(
        True, "--bounds-offset/--no-bounds-offset",
        help="Annotations of slides with openslide.bounds-* (MIRAX, ...) are in QuPath's cropped picture of them, "
             "as QuPath opens them by default; --no-bounds-offset for slides QuPath opened with --no-crop."),
    reader: str = ReaderOpt,
    force: bool = typer.Option(False, "--force", help="Replace an earlier extraction in OUT."),
) -> None:
    """Cut labelled patches from whole-slide images and their QuPath annotations (GeoJSON): training
    patches with their labels in their names, val/test patches with masks, split by slide.

    A slide that cannot be used (unreadable, no µm/px, annotations missing or outside it) is listed
    and the others go on (exit status 1). Check the result with wsss check-data OUT (its spec is
    OUT/spec.toml, which the commands reading OUT take when --dataset is not given) and
    OUT/contact_sheet.png."""
    from wsss.wsi.extract import ExtractConfig, command_line, run as run_extract

    cfg = ExtractConfig(
        inputs=tuple(slides), dataset=dataset, out=out, annotations=annotations, mpp=mpp, patch=patch, stride=stride,
        min_tissue=min_tissue, min_class_fraction=min_class_fraction, class_map=class_map,
        val_slides=_csv(val_slides, str, "--val-slides") or (), test_slides=_csv(test_slides, str, "--test-slides") or (),
        val_fraction=val_fraction, test_fraction=test_fraction, seed=seed, slide_mpp=slide_mpp, reader=reader,
        bounds_offset=bounds_offset, force=force, command=command_line(),
    )
    result = run_extract(cfg, progress=sys.stderr.isatty())
    s = result.summary
    done = sum(r["status"] == "done" for r in s["slides"])
    typer.echo(f"{done} of {len(s['slides'])} slides at {s['mpp']:g} µm/px, {s['patch_size']} px patches: "
               + ", ".join(f"{s['counts'][k]} {k}" for k in ("train", "val", "test"))
               + f"; written to {out} (check: wsss check-data {out}; "
               f"{out / 'contact_sheet.png'})")
    if result.failures:
        typer.echo(f"{len(result.failures)} slide{'s' if len(result.failures) != 1 else ''} failed:", err=True)
        for message in result.failures:
            typer.echo(f"  {message}", err=True)
        raise typer.Exit(1)


@app.command("train-stage1")
@option_group("colour", COLOUR_OPTIONS)
def train_stage1(
    dataset: Optional[str] = DataDatasetOpt,
    data: Path = DataOpt,
    out: Path = OutOpt,
    labels_csv: Optional[Path] = LabelsCsvOpt,
    preset: Optional[str] = PresetOpt,
    epochs: Optional[int] = EpochsOpt,
    refit_epochs: Optional[int] = typer.Option(
        None, "--refit-epochs", min=0, help="When the classifier ends below the fit (label accuracy < 0.95 on its "
        "training patches): this many more epochs on a restarted learning-rate schedule, then the fit is checked "
        "again. A run that fits never uses them (paper 0, cpu 6)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1),
    lr: Optional[float] = typer.Option(None, "--lr", min=0.0, help="Backbone lr (biases 2×)."),
    head_lr_mult: Optional[float] = typer.Option(
        None, "--head-lr-mult", min=0.0, help="Classifier-head lr as a multiple of --lr (paper 10)."),
    momentum: Optional[float] = typer.Option(
        None, "--momentum", help="SGD momentum (paper preset 0.0005, what the reference's optimizer got; cpu 0.9)."),
    weight_decay: Optional[float] = typer.Option(
        None, "--weight-decay", help="Weight decay of the weight groups; biases get none (5e-4)."),
    width: Optional[float] = typer.Option(None, "--width", min=0.01, help="Channel width multiplier."),
    dropout: Optional[float] = typer.Option(
        None, "--dropout", help="Multiple of the reference's dropout rates (b6 0.3, b7 0.5, head 0.5); 0: none."),
    image_size: Optional[int] = ImageSizeOpt,
    input_norm: Optional[str] = InputNormOpt,
    init_weights: Optional[Path] = typer.Option(
        None, "--init-weights", help="MXNet ilsvrc .params, a ResNet38 state_dict .pth, or a wsss checkpoint."),
    pda: Optional[bool] = typer.Option(None, "--pda/--no-pda", help="Progressive dropout attention."),
    pda_start: Optional[float] = typer.Option(None, "--pda-start"),
    pda_decay: Optional[float] = typer.Option(None, "--pda-decay", help="γ ← decay·γ after each epoch (code 0.98, paper text 0.985)."),
    pda_floor: Optional[float] = typer.Option(None, "--pda-floor"),
    pda_first_epoch: Optional[int] = typer.Option(None, "--pda-first-epoch", help="0-based epoch PDA starts at."),
    pda_norm: Optional[str] = typer.Option(
        None, "--pda-norm", help="none (reference) or max (attention scaled to [0,1]; stable from random init)."),
    augment: Optional[str] = typer.Option(
        None, "--augment", help="flip (reference: random horizontal and vertical flips) or d4 (also 90° rotations)."),
    colour: dict = None,  # COLOUR_OPTIONS
    tie_rule: Optional[str] = typer.Option(
        None, "--tie-rule", help="The CAM evaluation's tie rule at the end: " + CAM_TIE_HELP
                                 + " Default: the preset's (paper, cpu-paper: reference; cpu, best: ours)."),
    device: Optional[str] = DeviceOpt,
    precision: Optional[str] = PrecisionOpt,
    amp: Optional[bool] = AmpOpt,
    workers: Optional[int] = WorkersOpt,
    seed: Optional[int] = SeedOpt,
    resume: bool = typer.Option(False, "--resume", help="Continue the run saved in OUT (--device, --precision and "
                                                        "--workers may change)."),
    force: bool = ForceOpt,
    config_file: Optional[Path] = ConfigOpt,
    print_config: bool = PrintConfigOpt,
) -> None:
    """Train the ResNet38 classifier (stage 1) with PDA, then evaluate its CAMs on val and test."""
    from wsss.config import STAGE1_PRESETS, Stage1Config, config_toml, resolve_command
    from wsss.stages.stage1 import train

    options = dict(
        dataset=dataset, data=data, out=out, labels_csv=labels_csv, epochs=epochs, refit_epochs=refit_epochs,
        batch_size=batch_size, lr=lr, head_lr_mult=head_lr_mult, momentum=momentum, weight_decay=weight_decay,
        width=width, dropout=dropout, image_size=image_size, input_norm=input_norm, init_weights=init_weights, pda=pda, pda_start=pda_start, pda_decay=pda_decay, pda_floor=pda_floor,
        pda_first_epoch=pda_first_epoch, pda_norm=pda_norm, augment=augment, **colour,
        cam_tie_rule=tie_rule, device=device, precision=_precision(precision, amp), workers=workers, seed=seed,
    )
    cfg, given = resolve_command(Stage1Config, STAGE1_PRESETS, preset, options, config_file, "stage1")
    if print_config:
        typer.echo(config_toml(cfg, "stage1"), nl=False)
        return
    summary = train(cfg, resume=resume, force=force, given=given)
    if summary.get("cam_metrics"):
        typer.echo(json.dumps({k: v["mIoU"] for k, v in summary["cam_metrics"].items()}))


@app.command("eval-cam")
def eval_cam(
    dataset: Optional[str] = CheckpointDatasetOpt,
    data: Path = DataOpt,
    checkpoint: Path = ClassifierCheckpointOpt,
    split: str = SplitOpt,
    threshold: float = typer.Option(0.25, "--threshold", help="Classes with probability <= this are dropped."),
    tie_rule: Optional[str] = typer.Option(
        None, "--tie-rule", help=CAM_TIE_HELP + " Default: the rule the checkpoint's training evaluated with "
                                               "(its preset's; WSSS-Tissue's files: reference)."),
    batch_size: int = typer.Option(16, "--batch-size", min=1),
    device: str = DeviceAutoOpt,
    precision: str = typer.Option("fp32", "--precision", help=PRECISION_HELP),
    workers: int = WorkersZeroOpt,
    json_out: Optional[Path] = JsonOutOpt,
) -> None:
    """Segment a split with the stage-1 CAMs and score it against the masks."""
    from wsss.metrics import format_table, write_json
    from wsss.runtime import resolve_device, resolve_precision
    from wsss.cam.cam import check_tie_rule
    from wsss.models.loading import classifier_and_spec
    from wsss.stages.stage1 import evaluate_cams

    if tie_rule is not None:
        check_tie_rule(tie_rule)
    if split not in ("val", "test"):
        raise WsssError(f"--split must be val or test, not {split!r}")
    _precision(precision, None)
    clf, spec = classifier_and_spec(checkpoint, dataset)
    run_on = resolve_device(device)
    metrics = evaluate_cams(clf.model, data, split, spec, norm=clf.norm, image_size=clf.image_size, device=run_on,
                            threshold=threshold, batch_size=batch_size, workers=workers,
                            precision=resolve_precision(precision, run_on),
                            tie_rule=tie_rule or clf.cam_tie_rule)
    typer.echo(format_table(metrics, f"stage-1 CAM segmentation, {split} split"))
    if json_out is not None:
        write_json(json_out, metrics)


@app.command("generate-pm")
def generate_pm(
    dataset: Optional[str] = CheckpointDatasetOpt,
    data: Path = DataOpt,
    checkpoint: Path = ClassifierCheckpointOpt,
    layers: Optional[str] = typer.Option(
        None, "--layers", help="Comma-separated Grad-CAM layers (default: b4_5,b5_2,bn7)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Pseudo-mask folder (default: DATA/train_PM)."),
    labels_csv: Optional[Path] = LabelsCsvOpt,
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1, help="Patches a batch (default: 8)."),
    device: Optional[str] = typer.Option(None, "--device", help="auto (the default), cpu or cuda."),
    precision: Optional[str] = typer.Option(None, "--precision", help=PM_PRECISION_HELP + " Default: fp32."),
    workers: Optional[int] = typer.Option(None, "--workers", min=0, help="Loader processes (default: 2)."),
    force: bool = typer.Option(False, "--force", help="Recompute pseudo-masks that already exist."),
    tie_rule: Optional[str] = typer.Option(
        None, "--tie-rule", help="ours (an unlabelled class never wins) or reference (WSSS-Tissue's argmax, where "
                                 "unlabelled classes score 0; differs at a few pixels). Default: the preset's "
                                 "(paper, cpu-paper: reference; cpu, best: ours)."),
    scales: Optional[str] = typer.Option(
        None, "--scales", help="Comma-separated input scales whose Grad-CAMs are averaged, e.g. 0.75,1,1.25 "
                               "(default and reference: 1)."),
    flip: Optional[bool] = typer.Option(
        None, "--flip/--no-flip", help="Also average the Grad-CAMs of the mirrored patch (default: no)."),
    white_rule: Optional[str] = typer.Option(
        None, "--white-rule", help="grey (reference: grey > 200 is background) or glass (also nearly colourless: "
                                   "pale tissue stays tissue). Default: the preset's (paper: grey; cpu, best: glass)."),
    preset: Optional[str] = PresetOpt,
    config_file: Optional[Path] = ConfigOpt,
    print_config: bool = PrintConfigOpt,
) -> None:
    """Write a palette pseudo-mask per training patch and layer from the stage-1 Grad-CAMs (resumable)."""
    from wsss.config import PM_PRESETS, config_toml, resolve_command
    from wsss.cam.pseudo_mask import parse_layers
    from wsss.stages.pseudo_masks import PseudoMaskConfig, format_summary, generate

    options = dict(dataset=dataset, data=data, checkpoint=checkpoint,
                   layers=parse_layers(layers) if layers is not None else None, out=out, batch_size=batch_size,
                   device=device, precision=_precision(precision, None), workers=workers, force=force or None,
                   scales=_csv(scales, float, "--scales"), flip=flip, labels_csv=labels_csv, white_rule=white_rule,
                   tie_rule=tie_rule)
    cfg, _ = resolve_command(PseudoMaskConfig, PM_PRESETS, preset, options, config_file, "pseudo_masks",
                             keep_none=("dataset",))
    if print_config:
        typer.echo(config_toml(cfg, "pseudo_masks"), nl=False)
        return
    typer.echo(format_summary(generate(cfg)))


@app.command("eval-pm")
def eval_pm(
    dataset: Optional[str] = DataDatasetOpt,
    data: Path = typer.Option(..., "--data", help="Dataset folder with train_gt/ (synthetic data)."),
    pm_dir: Optional[Path] = PmDirOpt,
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write {layer: metrics} here.", callback=_json_file),
) -> None:
    """Score each layer's pseudo-masks against the true training masks in DATA/train_gt/."""
    from wsss.config import folder_spec
    from wsss.data.specs import get_spec
    from wsss.metrics import write_json
    from wsss.stages.pseudo_masks import evaluate, format_evaluation

    results = evaluate(data, get_spec(dataset or folder_spec(data)), pm_dir)
    typer.echo(format_evaluation(results))
    if json_out is not None:
        write_json(json_out, results)


@app.command("train-stage2")
@option_group("colour", COLOUR_OPTIONS)
def train_stage2(
    dataset: Optional[str] = DataDatasetOpt,
    data: Path = DataOpt,
    stage1_checkpoint: Optional[Path] = typer.Option(
        None, "--stage1-checkpoint", help="Stage-1 classifier for the gate (ours or WSSS-Tissue's)."),
    pm_dir: Optional[Path] = PmDirOpt,
    labels_csv: Optional[Path] = LabelsCsvOpt,
    pm_layers: Optional[str] = typer.Option(
        None, "--pm-layers", help="Comma-separated PM_<layer> folders to train on (default bn7,b5_2,b4_5)."),
    pm_weights: Optional[str] = typer.Option(
        None, "--pm-weights", help="Comma-separated loss weights, one per layer (default 0.6,0.2,0.2)."),
    loss: Optional[str] = typer.Option(None, "--loss", help="ce, focal, dice, ce+dice or lovasz."),
    loss_reduction: Optional[str] = typer.Option(
        None, "--loss-reduction",
        help="reference (paper preset: WSSS-Tissue's background logit, mean over all pixels, divided by the batch "
             "size) or mean (cpu preset: mean over each mask's tissue pixels, background ignored)."),
    backbone: Optional[str] = typer.Option(
        None, "--backbone", help="resnet101 (paper), resnet50, resnet18 or mobilenet_v3_large."),
    out_stride: Optional[int] = typer.Option(None, "--out-stride", help="16 (paper) or 8."),
    head_channels: Optional[int] = typer.Option(None, "--head-channels", min=1, help="ASPP/decoder width (256)."),
    preset: Optional[str] = PresetOpt,
    epochs: Optional[int] = EpochsOpt,
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=2),
    drop_last: Optional[bool] = typer.Option(
        None, "--drop-last/--keep-last",
        help="Leave out each epoch's last short batch, ⌊N/batch⌋ poly steps an epoch (cpu, best), or train on it "
             "with its loss divided by its own size, ⌈N/batch⌉ steps (paper, cpu-paper: as the reference)."),
    lr: Optional[float] = typer.Option(None, "--lr", min=0.0, help="Backbone lr; ASPP and decoder get 10×."),
    momentum: Optional[float] = typer.Option(None, "--momentum", help="SGD momentum (0.9)."),
    weight_decay: Optional[float] = typer.Option(None, "--weight-decay", help="SGD weight decay (5e-4)."),
    image_size: Optional[int] = ImageSizeOpt,
    input_norm: Optional[str] = InputNormOpt,
    augment: Optional[str] = typer.Option(
        None, "--augment", help="hflip (reference: left-right flips) or d4 (all 8 flips/rotations); both add blur."),
    colour: dict = None,  # COLOUR_OPTIONS
    mosaic: Optional[float] = typer.Option(
        None, "--mosaic", help="Probability that a training image is a 2×2 mosaic of single-class patches, whose "
                               "masks are exact (0: off, the reference)."),
    ema: Optional[float] = typer.Option(
        None, "--ema", help="Validate, keep and test an exponential moving average of the weights, this decay per "
                            "step (e.g. 0.99; 0: off, the reference)."),
    init_weights: Optional[Path] = typer.Option(
        None, "--init-weights",
        help="deeplab-resnet.pth.tar, a stage2_checkpoint_trained_on_*.pth, a torchvision ImageNet backbone "
             "state_dict, or a wsss stage-2 checkpoint."),
    gate: Optional[bool] = typer.Option(None, "--gate/--no-gate", help="Also test with the classification gate."),
    gate_threshold: Optional[float] = typer.Option(
        None, "--gate-threshold",
        help=f"Classes with stage-1 probability <= this cannot be predicted (default {DEFAULT_GATE_THRESHOLD:g})."),
    gate_mode: Optional[str] = GateModeOpt,
    device: Optional[str] = DeviceOpt,
    precision: Optional[str] = PrecisionOpt,
    amp: Optional[bool] = AmpOpt,
    workers: Optional[int] = WorkersOpt,
    seed: Optional[int] = SeedOpt,
    out: Path = OutOpt,
    report: Optional[Path] = typer.Option(None, "--report", help="Metrics and predictions (default results/<dataset>)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run saved in OUT."),
    force: bool = ForceOpt,
    config_file: Optional[Path] = ConfigOpt,
    print_config: bool = PrintConfigOpt,
) -> None:
    """Train DeepLab v3+ on the pseudo-masks (stage 2), keep the best on val, test it with and without the gate."""
    from wsss.config import STAGE2_PRESETS, Stage2Config, config_toml, resolve_command
    from wsss.metrics import format_table
    from wsss.stages.stage2 import train

    options = dict(
        dataset=dataset, data=data, stage1_checkpoint=stage1_checkpoint, labels_csv=labels_csv,
        pm_dir=pm_dir, pm_layers=_csv(pm_layers, str, "--pm-layers"), pm_weights=_csv(pm_weights, float, "--pm-weights"),
        loss=loss, loss_reduction=loss_reduction, backbone=backbone, out_stride=out_stride,
        head_channels=head_channels, epochs=epochs, batch_size=batch_size, drop_last=drop_last, lr=lr, momentum=momentum,
        weight_decay=weight_decay, image_size=image_size, input_norm=input_norm, augment=augment,
        mosaic=mosaic, ema=ema, init_weights=init_weights, **colour,
        gate=gate, gate_threshold=gate_threshold, gate_mode=gate_mode, device=device,
        precision=_precision(precision, amp), workers=workers, seed=seed, out=out,
        report=report,
    )
    cfg, given = resolve_command(Stage2Config, STAGE2_PRESETS, preset, options, config_file, "stage2")
    if print_config:
        typer.echo(config_toml(cfg, "stage2"), nl=False)
        return
    summary = train(cfg, resume=resume, force=force, given=given)
    if "metrics" in summary:
        metrics = summary["metrics"]
        if metrics["test"] is None:
            typer.echo(f"kept: {metrics['kept']}, epoch {metrics['best_epoch']}; {metrics['left_out']}")
            return
        typer.echo(format_table(metrics["test"], "stage-2 segmentation, test split"))
        if metrics["test_gate"] is not None:
            typer.echo(format_table(metrics["test_gate"], "stage-2 segmentation with the gate, test split"))
        typer.echo(json.dumps({k: metrics[k]["mIoU"] for k in ("test", "test_gate", "val_best") if metrics[k]}))


@app.command()
def evaluate(
    dataset: Optional[str] = CheckpointDatasetOpt,
    data: Path = DataOpt,
    checkpoint: Path = SegmenterCheckpointOpt,
    split: str = SplitOpt,
    gate: bool = typer.Option(False, "--gate/--no-gate", help="Also score with the classification gate."),
    stage1_checkpoint: Optional[Path] = Stage1CheckpointOpt,
    gate_threshold: Optional[float] = typer.Option(
        None, "--gate-threshold", help="Classes with probability <= this are gated. Default: the checkpoint's training "
                                       f"run's (WSSS-Tissue's files: {DEFAULT_GATE_THRESHOLD:g})."),
    gate_mode: Optional[str] = typer.Option(
        None, "--gate-mode", help=GATE_MODE_HELP + " Default: the mode the checkpoint's training run tested with "
                                                   "(its preset's; WSSS-Tissue's files: reference)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1, help="Default: the training batch size."),
    device: str = DeviceAutoOpt,
    precision: Optional[str] = PrecisionFp32Opt,
    amp: Optional[bool] = AmpOpt,
    workers: int = WorkersZeroOpt,
    json_out: Optional[Path] = JsonOutOpt,
) -> None:
    """Score a stage-2 checkpoint on a split, optionally with the stage-1 classification gate."""
    from wsss.gate import check_gate_checkpoint
    from wsss.metrics import format_table, write_json
    from wsss.runtime import resolve_device
    from wsss.stages.stage2 import evaluate_checkpoint

    check_gate_checkpoint(gate, stage1_checkpoint)
    results = evaluate_checkpoint(dataset, data, checkpoint, split, resolve_device(device),
                                  stage1_checkpoint=stage1_checkpoint if gate else None, threshold=gate_threshold,
                                  batch_size=batch_size, workers=workers,
                                  precision=_precision(precision, amp) or "fp32", gate_mode=gate_mode)
    for key, metrics in results.items():
        title = f"stage-2 segmentation{' with the gate' if key.endswith('_gate') else ''}, {split} split"
        typer.echo(format_table(metrics, title))
    if json_out is not None:
        write_json(json_out, results)


@app.command()
def figures(
    dataset: Optional[str] = CheckpointDatasetOpt,
    data: Path = DataOpt,
    stage1_checkpoint: Path = typer.Option(
        ..., "--stage1-checkpoint", help="Stage-1 classifier for the pseudo-masks and CAMs (ours or WSSS-Tissue's)."),
    report: Optional[Path] = typer.Option(
        None, "--report", help="Report folder: reads pred/ and pred_gate/ there, writes the PNGs (default results/<dataset>)."),
    labels_csv: Optional[Path] = LabelsCsvOpt,
    device: str = DeviceAutoOpt,
    force: bool = typer.Option(False, "--force", help="Replace figures in REPORT that wsss did not write."),
) -> None:
    """Draw REPORT/examples.png (test patches: truth, pseudo-masks, stage-2 predictions) and REPORT/cams.png."""
    from wsss.figures import CAMS_NAME, EXAMPLES_NAME, cam_figure, examples_figure
    from wsss.models.loading import classifier_and_spec
    from wsss.runs.owner import owned_folder

    _, spec = classifier_and_spec(stage1_checkpoint, dataset, labels_csv)
    report = report if report is not None else Path("results") / spec.name
    pred_dirs = {"stage 2": report / "pred", "stage 2 + gate": report / "pred_gate"}
    with owned_folder(report, "figures", force=force, option="--report") as owner:
        owner.claim([report / EXAMPLES_NAME, report / CAMS_NAME])
        written = [
            examples_figure(spec, data, stage1_checkpoint, pred_dirs, report / EXAMPLES_NAME, device=device),
            cam_figure(spec, data, stage1_checkpoint, report / CAMS_NAME, device=device),
        ]
    typer.echo("written: " + ", ".join(map(str, written)))


@app.command()
def reproduce(
    dataset: Optional[str] = DataDatasetOpt,
    data: Path = DataOpt,
    synth: bool = typer.Option(False, "--synth", help="Generate the synthetic dataset into DATA first (once)."),
    run: Optional[str] = typer.Option(
        None, "--run", help="Names checkpoints/<run> and results/<run> (default: the spec's name; with --synth "
                            "synthetic for luad, synthetic-<name> for other specs)."),
    labels_csv: Optional[Path] = LabelsCsvOpt,
    preset: Optional[str] = PresetOpt,
    config_file: Optional[Path] = ConfigOpt,
    print_config: bool = PrintConfigOpt,
    stage1_init: Optional[Path] = typer.Option(
        None, "--stage1-init-weights", help="Stage-1 initialisation, e.g. the MXNet ImageNet .params file."),
    stage2_init: Optional[Path] = typer.Option(
        None, "--stage2-init-weights", help="Stage-2 initialisation, e.g. deeplab-resnet.pth.tar."),
    out: Optional[Path] = typer.Option(None, "--out", help="Checkpoints (default checkpoints/<run>)."),
    report: Optional[Path] = typer.Option(None, "--report", help="Report, figures, predictions (default results/<run>)."),
    seeds: str = typer.Option(
        "0", "--seeds", help="Training seeds, comma-separated; several run the chain per seed and report mean, "
                             "min and max (seed N>0 writes to OUT/seedN, REPORT/seedN)."),
    upper_bound: bool = typer.Option(
        False, "--upper-bound/--no-upper-bound",
        help="Also train stage 2 on the true masks (DATA/train_gt, synthetic data) for every seed."),
    gate_mode: Optional[str] = GateModeOpt,
    synth_look: str = typer.Option(
        "default", "--synth-look", help="With --synth: the look of the synthetic data (default, shifted, lab-b, "
                                        "pale, dark, jpeg, blur; see wsss synth --look)."),
    synth_task: Optional[int] = typer.Option(
        None, "--synth-task", help="With --synth: a random synthetic task of this seed (wsss synth --task-seed)."),
    synth_tasks: Optional[str] = typer.Option(
        None, "--synth-tasks", help="With --synth: several random tasks, e.g. 1,2,3,4,5; each in DATA/task<K> with its "
                                    "own checkpoints and report, then one table over every task x seed."),
    synth_difficulty: float = typer.Option(0.5, "--synth-difficulty", help="Difficulty of the random tasks, 0-1."),
    synth_size: int = typer.Option(224, "--synth-size", min=32, help="Patch side of the synthetic data."),
    synth_mpp: Optional[float] = typer.Option(
        None, "--synth-mpp", help="µm/px of the synthetic patches (wsss synth --mpp)."),
    synth_counts: Optional[str] = typer.Option(
        None, "--synth-counts", help="Train, val and test patches of the synthetic data (default 1000,100,100)."),
    transfer: Optional[Path] = typer.Option(
        None, "--transfer", help="Also test each seed's stage 2 (and gate) on this dataset's test split, e.g. "
                                 "synthetic data of another look."),
    ablations: bool = typer.Option(False, "--ablations", help="Also run the ablations and add them to the report."),
    figures: bool = typer.Option(True, "--figures/--no-figures", help="Draw examples.png and cams.png."),
    device: str = DeviceAutoOpt,
    precision: Optional[str] = typer.Option(
        None, "--precision", help=PRECISION_HELP + " Every step runs in it (a continued run may change it). Default: "
                                                   "the preset's (cpu: auto; the others fp32)."),
    workers: Optional[int] = typer.Option(None, "--workers", min=0, help="Data-loading processes (preset default)."),
    force: bool = typer.Option(False, "--force", help="Start over instead of continuing an earlier run."),
) -> None:
    """Run the whole pipeline (stage 1, pseudo-masks, stage 2 with the gate) and print the results table.

    Re-running continues where an earlier run stopped."""
    from wsss.stages.reproduce import ReproduceConfig, default_run, format_report, run as run_pipeline
    from wsss.stages.reproduce import print_config as resolved_config
    from wsss.config import reproduce_dataset

    dataset = reproduce_dataset(dataset, data, config_file)
    cfg = ReproduceConfig(
        dataset=dataset, data=data, run=run or default_run(dataset, synth), labels_csv=labels_csv,
        preset=preset, config_file=config_file, out=out, report=report, synth=synth, stage1_init=stage1_init,
        stage2_init=stage2_init, seeds=_csv(seeds, int, "--seeds") or (), gate_mode=gate_mode,
        upper_bound=upper_bound, synth_look=synth_look, synth_task=synth_task,
        synth_tasks=_csv(synth_tasks, int, "--synth-tasks") or (), synth_difficulty=synth_difficulty,
        synth_size=synth_size, synth_mpp=synth_mpp, **_synth_counts(synth_counts), transfer=transfer, device=device,
        precision=_precision(precision, None), workers=workers, ablations=ablations, figures=figures, force=force,
    )
    if print_config:
        typer.echo(resolved_config(cfg), nl=False)
        return
    result = run_pipeline(cfg)
    typer.echo(format_report(result))
    typer.echo(f"written: {cfg.report_dir / 'report.md'}, {cfg.report_dir / 'report.json'}")


def _synth_counts(text: str | None) -> dict:
    counts = _csv(text, int, "--synth-counts")
    if counts is None:
        return {}
    if len(counts) != 3 or min(counts) < 1:
        raise WsssError(f"--synth-counts needs three positive numbers (train,val,test), not {text}")
    return {"synth_counts": tuple(counts)}


@app.command()
def predict(
    ctx: typer.Context,
    inputs: list[Path] = typer.Argument(..., help="Image files (PNG, JPEG, TIFF) or folders of them.", show_default=False),
    checkpoint: Path = SegmenterCheckpointOpt,
    out: Path = typer.Option(..., "--out", help="Folder for <name>_mask.png, <name>_overlay.png and summary.csv."),
    dataset: Optional[str] = CheckpointDatasetOpt,
    gate: bool = GateOpt,
    stage1_checkpoint: Optional[Path] = Stage1CheckpointOpt,
    gate_threshold: float = GateThresholdOpt,
    gate_mode: str = GateModeMaskOpt,
    tile: Optional[int] = typer.Option(
        None, "--tile", min=16,
        help="Window side in pixels at the model's µm/px. Default: the checkpoint's training patch size (224 when it "
             "records none). Each window is resized by image_size/tile when the checkpoint records its training "
             "input size, so the model sees tissue at the scale it learned; probabilities come back at window size."),
    overlap: Optional[int] = typer.Option(
        None, "--overlap", min=0, help="Pixels shared by neighbouring windows; their probabilities are blended there. "
                                       "Default: 32, or half the window when that is less."),
    mpp: Optional[float] = typer.Option(
        None, "--mpp", help="µm per pixel of the input images that do not record one (a TIFF's OME-XML, Aperio, ImageJ "
                            "or microscope-range resolution tags win, with a warning): images are resampled to the "
                            "checkpoint's µm/px (and the masks back to their size). An image of unknown µm/px (or a "
                            "checkpoint that records none) is segmented as it is, with a warning."),
    batch_size: Optional[int] = WindowBatchOpt,
    tta: str = TtaOpt,
    device: str = DeviceAutoOpt,
    precision: Optional[str] = PrecisionFp32Opt,
    amp: Optional[bool] = AmpOpt,
    force: bool = typer.Option(
        False, "--force", help="Replace files in OUT that wsss did not write, and predictions of other settings."),
    save_probs: bool = typer.Option(
        False, "--save-probs", help="Also <name>_probs.ome.tif: the class probabilities x 255 (uint8), one channel "
                                    "per class named by class, a tiled pyramidal OME-TIFF (C bytes a pixel more "
                                    "memory while an image is segmented)."),
    save_tissue_mask: bool = typer.Option(
        False, "--save-tissue-mask", help="Also <name>_tissue.png: 255 where the saturation is above Otsu's "
                                          "threshold of the image (predict-wsi's tissue rule), else 0."),
    config_file: Optional[Path] = ConfigOpt,
    print_config: bool = PrintConfigOpt,
) -> None:
    """Segment your own images of any size with a stage-2 checkpoint (sliding window, blended overlaps).

    Memory grows with the image (its RGB pixels and a one-byte mask) and with tile × width, not with
    classes × pixels. When some images fail (unreadable, grayscale, RGBA) the others are still
    processed and written; the failures are listed at the end and the exit status is 1."""
    from wsss.config import config_toml
    from wsss.inference import window_batch
    from wsss.stages.predict import PredictConfig, run as run_predict

    values = _with_config_file(ctx, PredictConfig, "predict", config_file, dict(
        checkpoint=checkpoint, out=out, dataset=dataset, gate=gate, stage1_checkpoint=stage1_checkpoint,
        gate_threshold=gate_threshold, gate_mode=gate_mode, tile=tile, overlap=overlap, batch_size=batch_size,
        tta=tta, device=device, precision=_precision(precision, amp), force=force, mpp=mpp, save_probs=save_probs,
        save_tissue_mask=save_tissue_mask))
    cfg = PredictConfig(inputs=tuple(inputs), **{**values, "batch_size": window_batch(values["batch_size"], values["device"]),
                                                 "precision": values["precision"] or "fp32"})
    if print_config:
        typer.echo(config_toml(cfg, "predict"), nl=False)
        return
    result = run_predict(cfg, progress=sys.stderr.isatty())
    if result.failures and not result.rows and len(result.failures) == 1:
        raise WsssError(result.failures[0])
    if result.rows:
        typer.echo(f"{len(result.rows)} of {result.total} images segmented: masks, overlays and {result.summary}")
    if result.failures:
        n = len(result.failures)
        typer.echo(f"{n} image{'s' if n != 1 else ''} failed:", err=True)
        for message in result.failures:
            typer.echo(f"  {message}", err=True)
        if not result.rows:
            raise WsssError(f"none of the {result.total} images could be processed")
        raise typer.Exit(1)


@app.command("predict-wsi")
def predict_wsi(
    ctx: typer.Context,
    slides: list[Path] = typer.Argument(
        ..., show_default=False,
        help="Whole-slide images (pyramidal TIFF, or .svs/.ndpi/.mrxs/... with OpenSlide), folders of them "
             "(searched recursively), or manifest CSVs (a path column; optional mpp: the slide's own level-0 "
             "µm/px, and roi: x,y,w,h). One slide file: outputs directly in OUT; otherwise a cohort: "
             "OUT/<name>/ per slide and OUT/cohort.csv."),
    checkpoint: Path = SegmenterCheckpointOpt,
    out: Path = typer.Option(..., "--out", help="Folder for <name>_mask.png/.ome.tif, _overlay.png, _summary.json."),
    dataset: Optional[str] = CheckpointDatasetOpt,
    gate: bool = GateOpt,
    stage1_checkpoint: Optional[Path] = Stage1CheckpointOpt,
    gate_threshold: float = GateThresholdOpt,
    gate_mode: str = GateModeMaskOpt,
    level: Optional[int] = typer.Option(
        None, "--level", help="Pyramid level to segment as it is (instead of the model's µm/px)."),
    mpp: Optional[float] = typer.Option(
        None, "--mpp", help="Microns per pixel to segment at: the nearest finer level, resized. Default: the µm/px "
                            "the checkpoint was trained at (level 0 when it records none)."),
    slide_mpp: Optional[float] = SlideMppOpt,
    roi: Optional[str] = typer.Option(None, "--roi", help="Region x,y,w,h in level-0 pixels (default: the slide)."),
    tile: Optional[int] = typer.Option(
        None, "--tile", min=16, help="Window side in processed pixels. Default: the checkpoint's training patch size "
                                     "(224 when it records none)."),
    overlap: Optional[int] = typer.Option(
        None, "--overlap", min=0, help="Pixels shared by neighbouring windows, blended. Default: 32, or half the "
                                       "window when that is less."),
    batch_size: Optional[int] = WindowBatchOpt,
    tta: str = TtaOpt,
    min_tissue: float = typer.Option(
        0.05, "--min-tissue", help="Windows with a smaller tissue fraction are background, not segmented (0: all)."),
    geojson: bool = typer.Option(False, "--geojson/--no-geojson", help="Also write <name>.geojson for QuPath."),
    geojson_mode: str = typer.Option(
        "per-class", "--geojson-mode", help="per-class (one MultiPolygon per class) or per-region (one Polygon per "
                                            "connected region)."),
    object_type: str = typer.Option("annotation", "--object-type", help="QuPath object type: annotation or detection."),
    min_area: float = typer.Option(0.0, "--min-area", help="Leave out regions smaller than this many µm²."),
    simplify: float = typer.Option(
        0.0, "--simplify", help="Simplify outlines, dropping details of about this many label pixels (0: exact pixel "
                                "edges); neighbouring classes stay edge to edge."),
    bounds_offset: bool = typer.Option(
        True, "--bounds-offset/--no-bounds-offset",
        help="Shift GeoJSON by openslide.bounds-x/y, as QuPath crops such slides (MIRAX, ...) by default; "
             "--no-bounds-offset for slides QuPath opens uncropped (its --no-crop)."),
    mask_format: str = typer.Option(
        "auto", "--mask-format",
        help="Label image: png, ome-tiff (tiled pyramidal OME-TIFF with palette, class names and µm/px; opens in "
             "QuPath), or auto (PNG up to 89.5 megapixels, else OME-TIFF)."),
    shard: Optional[str] = typer.Option(
        None, "--shard", help="I/N: this job takes every N-th slide from the I-th (I from 0); default from "
                              "SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT in an array job."),
    reader: str = ReaderOpt,
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda (under torchrun: the rank's GPU)."),
    precision: Optional[str] = PrecisionFp32Opt,
    amp: Optional[bool] = AmpOpt,
    force: bool = typer.Option(
        False, "--force", help="Replace files in OUT (a cohort: OUT/<name>/) that wsss did not write."),
    save_probs: bool = typer.Option(
        False, "--save-probs", help="Also <name>_probs.ome.tif: the class probabilities x 255 (uint8), one channel "
                                    "per class named by class, tiled pyramidal OME-TIFF with µm/px and where it lies "
                                    "on the slide; 0 where no window was segmented. Kept on disk while the slide "
                                    "runs (C bytes a label pixel), not in memory."),
    save_tissue_mask: bool = typer.Option(
        False, "--save-tissue-mask", help="Also <name>_tissue.png (or .ome.tif, as the label image): 255 where a "
                                          "pixel counts as tissue (saturation above the slide's threshold), else 0."),
    config_file: Optional[Path] = ConfigOpt,
    print_config: bool = PrintConfigOpt,
) -> None:
    """Segment whole-slide images tile by tile: label image, overlay, per-class areas, QuPath GeoJSON.

    Windows without tissue (Otsu on a thumbnail's saturation) are skipped. Progress is kept in
    <name>_partial/ after every row of windows: run the same command again to continue. A cohort
    (several slides, a folder, a manifest) loads the models once, skips finished slides, records a
    slide that fails and goes on (exit status 1 if any failed); under torchrun each rank, and with
    --shard each array job, takes its share of the slides."""
    from wsss.config import config_toml
    from wsss.inference import window_batch
    from wsss.wsi.cohort import parse_shard
    from wsss.wsi.predict_wsi import WsiConfig

    region = _csv(roi, int, "--roi")
    if region is not None and len(region) != 4:
        raise WsssError(f"--roi needs four numbers x,y,w,h (level-0 pixels), not {roi!r}")
    values = _with_config_file(ctx, WsiConfig, "predict_wsi", config_file, dict(
        checkpoint=checkpoint, out=out, dataset=dataset, gate=gate, stage1_checkpoint=stage1_checkpoint,
        gate_threshold=gate_threshold, gate_mode=gate_mode, level=level, mpp=mpp, roi=region, tile=tile,
        overlap=overlap, batch_size=batch_size, tta=tta, min_tissue=min_tissue, geojson=geojson,
        geojson_mode=geojson_mode, object_type=object_type, min_area=min_area, simplify=simplify,
        bounds_offset=bounds_offset, mask_format=mask_format, shard=parse_shard(shard), reader=reader, device=device,
        precision=_precision(precision, amp), force=force, slide_mpp=slide_mpp, save_probs=save_probs,
        save_tissue_mask=save_tissue_mask))
    cfg = WsiConfig(inputs=tuple(slides), **{**values, "batch_size": window_batch(values["batch_size"], values["device"]),
                                             "precision": values["precision"] or "fp32"})
    if print_config:
        typer.echo(config_toml(cfg, "predict_wsi"), nl=False)
        return
    one = slides[0]
    cohort = (len(slides) > 1 or one.is_dir() or one.suffix.lower() == ".csv" or cfg.shard is not None
              or int(os.environ.get("WORLD_SIZE", "1")) > 1)
    if cohort:
        _predict_cohort(cfg)
        return
    from wsss.wsi.predict_wsi import run as run_wsi

    result = run_wsi(cfg, progress=sys.stderr.isatty())
    s = result.summary
    at = f", {s['mpp'][0]:.3g} µm/px" if s["mpp"] else ""
    typer.echo(f"{one.name}: level {s['level']} (downsample {s['downsample'][0]:.3g}{at}), "
               f"{s['size'][0]}×{s['size'][1]} px; tiles: {s['tiles']['segmented']} segmented, "
               f"{s['tiles']['skipped']} without tissue skipped")
    if result.finished_earlier:
        typer.echo("finished earlier with these models and settings (not segmented again): "
                   + ", ".join(str(p) for p in result.files))
    else:
        typer.echo("written: " + ", ".join(str(p) for p in result.files))


def _predict_cohort(cfg) -> None:
    from wsss.wsi.cohort import run as run_cohort

    result = run_cohort(cfg, progress=sys.stderr.isatty())
    done, failed, locked = (result.count(s) for s in ("done", "failed", "locked"))
    share = f"{len(result.rows)} of the cohort's {result.total}" if result.worker.count > 1 else str(result.total)
    typer.echo(f"{result.worker.describe()}: {share} slides: {done} done, {failed} failed"
               + (f", {locked} locked by other processes" if locked else "") + f"; table {result.table}")
    if result.merged is not None and result.merged != result.table:
        typer.echo(f"every slide of the cohort is in the tables: merged into {result.merged}")
    for row in result.rows:
        if row["status"] != "done":
            typer.echo(f"  {row['slide']}: {row['status']}: {row['error']}", err=True)
    if failed and result.worker.world > 1:
        # torchrun stops every rank as soon as one exits non-zero: a rank whose failures are in its table
        # ends normally, so that the others finish their slides; cohort-summary gives the cohort's status
        typer.echo(f"{result.worker.describe()}: exit status 0 under torchrun (a non-zero one stops the other "
                   f"ranks); `wsss cohort-summary {cfg.out}` exits 1 while any slide failed", err=True)
    elif failed:
        raise typer.Exit(1)


@app.command("export")
def export_model(
    checkpoint: Path = typer.Argument(..., help="Stage-2 checkpoint (ours or WSSS-Tissue's)."),
    fmt: str = typer.Option(..., "--format", help="torchscript or onnx."),
    out: Path = typer.Option(..., "--out", help="The model file (e.g. model.pt, model.onnx); its JSON sidecar is "
                                                "written beside it with the suffix .json."),
    stage1_checkpoint: Optional[Path] = typer.Option(
        None, "--stage1-checkpoint", help="Also export this classifier: a second output, its sigmoid class "
                                          "probabilities, for the gate."),
    dataset: Optional[str] = CheckpointDatasetOpt,
    gate_threshold: float = typer.Option(
        DEFAULT_GATE_THRESHOLD, "--gate-threshold", help="The gate's threshold, recorded in the sidecar."),
    gate_mode: str = typer.Option("mask", "--gate-mode", help=GATE_MODE_HELP + " Recorded in the sidecar."),
    force: bool = typer.Option(False, "--force", help="Replace OUT and its sidecar if they exist."),
) -> None:
    """Export a stage-2 segmenter (and optionally the stage-1 gate) as TorchScript or ONNX with its input
    normalisation inside: input RGB 0-255 float32 (batch, 3, height, width), any batch and size; output
    class logits at the input's size. Checked against PyTorch after writing."""
    from wsss.export import ExportConfig, export

    cfg = ExportConfig(checkpoint=checkpoint, out=out, format=fmt, stage1_checkpoint=stage1_checkpoint,
                       dataset=dataset, gate_threshold=gate_threshold, gate_mode=gate_mode, force=force)
    result = export(cfg)
    shape = "×".join(map(str, result.check_shape))
    check = ("not checked (onnxruntime is not installed)" if result.max_difference is None
             else f"largest difference from PyTorch {result.max_difference:.2g} on a {shape} input")
    typer.echo(f"written: {result.model}, {result.sidecar}; {check}")


@app.command("cohort-summary")
def cohort_summary(
    out: Path = typer.Argument(..., help="The --out folder of predict-wsi cohort runs (shards, ranks)."),
    force: bool = typer.Option(False, "--force", help="Replace a cohort.csv in OUT that wsss did not write."),
) -> None:
    """Merge the per-shard and per-rank tables of a cohort into OUT/cohort.csv and count the slides by
    status; exit status 1 if any slide failed."""
    from wsss.wsi.cohort import summarise_folder

    table, rows = summarise_folder(out, force)
    counts = {status: sum(row["status"] == status for row in rows) for status in ("done", "failed", "locked")}
    typer.echo(f"{table}: {len(rows)} slides: " + ", ".join(f"{n} {status}" for status, n in counts.items()))
    for row in rows:
        if row["status"] != "done":
            typer.echo(f"  {row['slide']}: {row['status']}: {row['error']}", err=True)
    if counts["failed"]:
        raise typer.Exit(1)


def _with_config_file(ctx: typer.Context, cls: type, table: str, config_file: Optional[Path],
                      values: dict[str, Any]) -> dict[str, Any]:
    """``values`` (config field → its option's value) with the ``--config`` file's ``[table]`` for
    the options left at their defaults: the file sits under the command line, as for training."""
    if config_file is None:
        return values
    from wsss.config import read_config_table

    chosen = dict(values)
    for key, value in read_config_table(config_file, table, cls).items():
        if key == "inputs":  # the images or slides are the command's arguments
            continue
        if key not in ctx.params:
            raise WsssError(f"{config_file}: [{table}] {key} is not an option of this command (give it on the "
                            "command line)")
        source = ctx.get_parameter_source(key)
        if source is not None and source.name in ("DEFAULT", "DEFAULT_MAP"):  # Typer may bundle its own click
            chosen[key] = value
    return chosen


def _precision(precision: Optional[str], amp: Optional[bool]) -> Optional[str]:
    """``--precision`` or its old spelling ``--amp/--no-amp`` (``amp``: fp16 on CUDA, bf16 on the CPU;
    ``--no-amp``: fp32); None when neither is given (the preset's or the default). Both: a user error."""
    from wsss.runtime import check_precision

    if precision is not None and amp is not None:
        raise WsssError("--amp/--no-amp is the old spelling of --precision: pass only one of them")
    if precision is not None:
        return check_precision(precision)
    if amp is not None:
        return "amp" if amp else "fp32"
    return None


def _csv(text: Optional[str], kind: type, option: str) -> Optional[tuple]:
    """``"a,b,c"`` → a tuple of ``kind``; None stays None so presets and defaults apply."""
    if text is None:
        return None
    try:
        return tuple(kind(part.strip()) for part in text.split(",") if part.strip())
    except ValueError:
        raise WsssError(f"{option}: cannot read {text!r} as a comma-separated list") from None


def _one_line(exc: BaseException) -> str:
    """The user-facing line of an error, also when a DataLoader worker re-raised it with its traceback."""
    text = str(exc).strip()
    if "Original Traceback" in text:
        text = text.splitlines()[-1].split("WsssError: ", 1)[-1]
    return text.splitlines()[0] if text else type(exc).__name__


def _os_error_line(exc: OSError) -> str:
    """``PATH: cause`` of an OS error (a full disk, a missing permission, a path that is a file)."""
    from wsss.runtime import os_reason

    paths = [p for p in (exc.filename, exc.filename2) if p]
    reason = os_reason(exc) if exc.strerror else _one_line(exc)
    return f"{' → '.join(map(str, paths))}: {reason}" if paths else reason


def _resume_command(needs_flag: bool) -> str:
    """The command line that continues this run: the same one, without --force, with --resume when needed."""
    import shlex

    args = [a for a in sys.argv[1:] if a != "--force"]
    if needs_flag and "--resume" not in args:
        args.append("--resume")
    return shlex.join(["wsss", *args])


def _interrupted_line(exc: Interrupted) -> str:
    return f"{exc.signal_name}: {_saved_and_continue()}"


def _saved_and_continue() -> str:
    """What the run saved so far and the command that continues it."""
    from wsss.runtime import saved_note

    note = saved_note()
    if note is None:
        return "nothing was saved yet"
    what, needs_flag = note
    return f"{what}; to continue: {_resume_command(needs_flag)}"


def _raise_interrupted(signum, frame) -> None:
    import signal

    if os.getpid() != _MAIN_PID[0]:
        raise KeyboardInterrupt  # a DataLoader or synth worker: its parent reports the interruption
    if signum == signal.SIGTERM:
        raise Interrupted("terminated", 143)
    raise Interrupted("interrupted", 130)


_MAIN_PID = [os.getpid()]


# --------------------------------------------------------------------------- --help panels

# Every option's --help panel, by its parameter name (one table for every command; an option has the
# same panel wherever it appears). The panels come in this order, options keeping their order within
# a panel: what to read and where to write first, so a newcomer finds --dataset, --data, --out,
# --checkpoint and --preset at the top. An option not listed is Advanced.
HELP_PANELS: dict[str, tuple[str, ...]] = {
    "Data and outputs": (
        "dataset", "data", "out", "report", "labels_csv", "pm_dir", "split", "json_out", "run", "synth", "synth_look",
        "synth_task", "synth_tasks", "synth_difficulty", "synth_size", "synth_mpp", "synth_counts", "transfer",
        "annotations", "class_map", "mpp", "slide_mpp", "patch", "stride", "level", "roi", "val_slides", "test_slides",
        "val_fraction", "test_fraction", "train", "val", "test", "size", "spec_name", "task_seed", "difficulty", "look",
        "save_probs", "save_tissue_mask", "geojson", "mask_format", "fmt", "figures"),
    "Model": (
        "checkpoint", "preset", "config_file", "print_config", "stage1_init", "stage2_init", "init_weights", "backbone", "width", "head_channels",
        "out_stride", "image_size", "input_norm", "dropout", "pda", "layers", "pm_layers", "pm_weights", "stain_norm",
        "stain_target", "tile", "overlap", "tta"),
    "Training": (
        "epochs", "batch_size", "lr", "head_lr_mult", "momentum", "weight_decay", "loss", "loss_reduction", "augment",
        "mosaic", "ema", "drop_last", "seed", "seeds", "upper_bound", "ablations", "stain_jitter", "hed_scale",
        "hed_shift", "lab_jitter", "light_jitter", "blur_jitter", "jpeg_jitter"),
    "Gate": ("gate", "stage1_checkpoint", "gate_threshold", "gate_mode"),
    "Runtime": ("device", "precision", "amp", "workers", "resume", "force", "shard", "reader"),
}
ADVANCED_PANEL = "Advanced"
PANEL_OF: dict[str, str] = {name: panel for panel, names in HELP_PANELS.items() for name in names}
PANEL_ORDER: tuple[str, ...] = (*HELP_PANELS, ADVANCED_PANEL)


def cli_command():
    """The ``wsss`` command group with every option in its --help panel (:data:`HELP_PANELS`)."""
    command = typer.main.get_command(app)
    for sub in command.commands.values():
        for param in sub.params:
            if param.param_type_name == "option":
                param.rich_help_panel = PANEL_OF.get(param.name, ADVANCED_PANEL)
        # arguments first, then the panels in order (sorted is stable: options keep their order)
        sub.params.sort(key=lambda p: -1 if p.param_type_name != "option" else PANEL_ORDER.index(p.rich_help_panel))
    return command


def main() -> None:
    """Entry point: user errors and OS errors become one ``error:`` line and exit status 1, an
    interruption (Ctrl-C, SIGTERM) one line saying what was saved and how to continue (130, 143);
    only bugs show a traceback."""
    import signal

    from wsss.runtime import clear_saved_note

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("tifffile").setLevel(logging.ERROR)  # its warnings repeat what our error line says
    _MAIN_PID[0] = os.getpid()
    clear_saved_note()
    previous = {sig: signal.signal(sig, _raise_interrupted) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        cli_command()(prog_name="wsss")
    except Stopped as exc:
        typer.echo(f"error: {_one_line(exc)}; {_saved_and_continue()}", err=True)
        sys.exit(1)
    except WsssError as exc:
        typer.echo(f"error: {_one_line(exc)}", err=True)
        sys.exit(1)
    except OSError as exc:
        typer.echo(f"error: {_os_error_line(exc)}", err=True)
        sys.exit(1)
    except Interrupted as exc:
        typer.echo(_interrupted_line(exc), err=True)
        sys.exit(exc.exit_code)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
