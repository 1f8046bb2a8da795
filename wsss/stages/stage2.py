"""Stage 2: DeepLab v3+ trained on the multi-layer pseudo-masks, validated every epoch, tested
with and without the classification gate.

Outputs (``<d>`` is the dataset spec's name)::

    OUT/stage2_checkpoint_trained_on_<d>.pth   the best-validation-mIoU model (what `evaluate` loads)
    OUT/stage2_<d>_last.pth                    resumable state after the last finished epoch
    OUT/stage2_<d>_config.json                 the resolved configuration
    OUT/runs/stage2_<d>/                       tensorboardX scalars (the reference's tags)
    REPORT/metrics.json                        {"test", "test_gate", "val_best", "best_epoch"}
    REPORT/pred/, REPORT/pred_gate/            palette PNG predictions of the test split
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass, replace
from typing import ClassVar
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from wsss import config as cfglib
from wsss.data import stain
from wsss.config import STAGE2_RUNTIME_FIELDS, Stage2Config
from wsss.data.datasets import DecodedCache, InputNorm, get_input_norm
from wsss.data.layout import MaskedSample, default_pm_dir, has_masks, list_masked, list_train, without_masks
from wsss.data.png import write_mask
from wsss.data.seg_datasets import MultiViewMaskedDataset, PseudoMaskDataset, pseudo_mask_paths
from wsss.data.scale import dataset_scale
from wsss.data.specs import DatasetSpec, check_same_spec, get_spec, recorded_spec
from wsss.errors import Stopped, WsssError
from wsss.gate import DEFAULT_GATE_THRESHOLD, check_gate_checkpoint, check_gate_options, gate_logits
from wsss.losses import build_multi_mask_loss
from wsss.metrics import ConfusionMeter, format_table, write_json
from wsss.models.deeplab import (
    HEAD_PREFIX,
    DeepLabArch,
    DeepLabV3Plus,
    load_deeplab_weights,
    read_checkpoint,
)
from wsss.models.loading import (
    LoadedClassifier, LoadedSegmenter, class_probs, load_classifier, load_segmenter, segment, segmenter_and_spec,
)
from wsss.runs import owner as ownership
from wsss.data import validate
from wsss.data.validate import input_folders
from wsss.runs.owner import file_sha256, listing_hash, owned_folder
from wsss.stages.common import (
    EpochLoader, InputPipeline, RunPaths, StepLosses, check_batches, check_same_inputs, check_stain_target,
    device_images, distributed, input_pipeline, note_epochs, optimizer_step, reseed_epoch, restore_training,
    resume_state, start_training, tensorboard_writer,
)
from wsss.runtime import (
    CHECKPOINT_FORMAT, Distributed, autocast, grad_scaler, is_main_process, memory_format, note_saved, progress_bar,
    resolve_precision, save_checkpoint, seed_worker,
)
from wsss.stages.stage1 import poly_lambda

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Stage2Paths(RunPaths):
    report: Path = Path("results")

    STAGE: ClassVar[int] = 2

    @property
    def metrics(self) -> Path:
        return self.report / "metrics.json"

    @property
    def pred(self) -> Path:
        return self.report / "pred"

    @property
    def pred_gate(self) -> Path:
        return self.report / "pred_gate"

    @classmethod
    def of(cls, cfg: Stage2Config) -> "Stage2Paths":
        name = get_spec(cfg.dataset).name
        report = Path(cfg.report) if cfg.report is not None else Path("results") / name
        return cls(Path(cfg.out), name, report)


# --------------------------------------------------------------------------- loading models


# --------------------------------------------------------------------------- evaluation


def evaluate_samples(
    seg: LoadedSegmenter,
    samples: Sequence[MaskedSample],
    spec: DatasetSpec,
    device: torch.device,
    gate: LoadedClassifier | None = None,
    threshold: float = DEFAULT_GATE_THRESHOLD,
    batch_size: int = 8,
    workers: int = 0,
    precision: str = "fp32",
    pred_dirs: dict[str, Path] | None = None,
    gate_mode: str = "mask",
    desc: str = "eval",
    progress: bool = True,
) -> dict[str, ConfusionMeter]:
    """Confusion meters ``{"plain": ..., "gate": ...}`` (``gate`` only with a classifier).

    Each model sees the patch at its own input size and normalisation; logits are upsampled to the
    mask's size. With ``pred_dirs`` (same keys) each prediction is written as a palette PNG named
    after the image, with the pixels the ground truth marks as background (not evaluated) set to the
    spec's background index.
    """
    def bound(norm: InputNorm, size: int | None) -> InputNorm:  # reinhard-set: measured on these samples
        return norm.for_set(lambda: stain.measure_paths([s.image for s in samples], size), f"the {desc} patches")

    sizes, norms = [seg.image_size], [bound(seg.norm, seg.image_size)]
    if gate is not None:
        sizes.append(gate.image_size)
        norms.append(bound(gate.norm, gate.image_size))
        gate.model.eval().to(device, memory_format=memory_format(device, precision))
    loader = DataLoader(MultiViewMaskedDataset(samples, sizes, norms, spec), batch_size=batch_size,
                        num_workers=workers, worker_init_fn=seed_worker, pin_memory=device.type == "cuda")
    meters = {"plain": ConfusionMeter(spec.num_classes, spec.background_index)}
    if gate is not None:
        meters["gate"] = ConfusionMeter(spec.num_classes, spec.background_index)
    layout = memory_format(device, precision)
    seg.model.eval().to(device, memory_format=layout)
    for views, mask, index in progress_bar(loader, progress, desc=desc, leave=False):
        views = [v.to(device, non_blocking=True).contiguous(memory_format=layout) for v in views]
        logits = segment(seg.model, views[0], mask.shape[-2:], precision)
        preds = {"plain": logits.argmax(dim=1)}
        if gate is not None:
            probs = class_probs(gate, views[1], precision)
            preds["gate"] = gate_logits(logits, probs, threshold, gate_mode).argmax(dim=1)
        for key, pred in preds.items():
            pred = pred.cpu()
            meters[key].update(pred, mask)
            if pred_dirs is not None and key in pred_dirs:
                _write_predictions(pred_dirs[key], pred, mask, [samples[i] for i in index.tolist()], spec)
    stain.log_counts(f"{desc} inputs")
    return meters


def _write_predictions(folder: Path, pred: torch.Tensor, mask: torch.Tensor, samples, spec: DatasetSpec) -> None:
    pred = pred.masked_fill(mask == spec.background_index, spec.background_index).numpy().astype("uint8")
    for p, sample in zip(pred, samples):
        write_mask(folder / f"{sample.image.stem}.png", p, spec.flat_palette())


def evaluate_checkpoint(
    dataset: str | DatasetSpec | None,
    data: Path,
    checkpoint: Path,
    split: str,
    device: torch.device,
    *,
    stage1_checkpoint: Path | None = None,
    threshold: float | None = None,
    batch_size: int | None = None,
    workers: int = 0,
    precision: str = "fp32",
    gate_mode: str | None = None,
) -> dict[str, dict]:
    """``wsss evaluate``: ``{split: metrics}`` plus ``{split + "_gate": metrics}`` with a classifier.

    ``dataset`` None: the spec recorded in the checkpoint. ``batch_size``, ``threshold`` and
    ``gate_mode`` default to the checkpoint's training run's (a published file: the reference's
    gate), which the end-of-training test used too, so the numbers match those in ``metrics.json``
    exactly (in the precision training tested with). ``precision`` may be ``auto`` or ``amp``: it is
    resolved for ``device`` here.
    """
    if split not in ("val", "test"):
        raise WsssError(f"--split must be val or test, not {split!r}")
    check_gate_options(gate_mode or "mask", DEFAULT_GATE_THRESHOLD if threshold is None else threshold)
    seg, spec = segmenter_and_spec(checkpoint, dataset)
    gate_mode = gate_mode or seg.gate_mode
    threshold = seg.gate_threshold if threshold is None else threshold
    gate = load_classifier(stage1_checkpoint, spec) if stage1_checkpoint is not None else None
    samples = list_masked(data, split)
    validate.require(validate.masked_problems(samples, spec), data, spec.name)
    meters = evaluate_samples(seg, samples, spec, device, gate, threshold,
                              batch_size or seg.batch_size or 8, workers, resolve_precision(precision, device),
                              desc=f"evaluate {split}",
                              gate_mode=gate_mode)
    names = list(spec.classes)
    results = {split: meters["plain"].to_json(names)}
    if "gate" in meters:
        results[f"{split}_gate"] = meters["gate"].to_json(names)
    return results


def score_val(model: DeepLabV3Plus, cfg: Stage2Config, spec: DatasetSpec, samples, dist: Distributed,
             norm: InputNorm) -> dict:
    """Validation metrics of this process's share of ``samples``, summed over all processes (the
    patches prepared with the model's input normalisation ``norm``)."""
    seg = LoadedSegmenter(model, norm, cfg.image_size, list(spec.classes))
    share = list(samples)[dist.rank :: dist.world_size]
    meter = evaluate_samples(seg, share, spec, dist.device, batch_size=cfg.batch_size, workers=cfg.workers,
                             precision=cfg.precision, desc="validate", progress=dist.is_main)["plain"]
    meter.all_reduce()
    return meter.to_json(list(spec.classes))


# --------------------------------------------------------------------------- training building blocks


DEEPLAB_WEIGHTS = "deeplab-resnet.pth.tar"
"""The reference's stage-2 initialisation (pytorch-deeplab-xception's ResNet-101 DeepLab v3+)."""
BACKBONE_NAMES = {"resnet101": "ResNet-101", "resnet50": "ResNet-50", "resnet18": "ResNet-18",
                  "mobilenet_v3_large": "MobileNetV3-Large"}


def warn_random_init(cfg: Stage2Config) -> None:
    """The paper preset without ``--init-weights`` trains another recipe than the reference: say so once."""
    if cfg.init_weights is None and cfg.preset in (None, "paper"):
        log.warning("warning: the paper preset without --init-weights (the reference starts from %s): stage 2 "
                    "starts from a random %s", DEEPLAB_WEIGHTS, BACKBONE_NAMES.get(cfg.backbone, cfg.backbone))


def build_model(cfg: Stage2Config, spec: DatasetSpec) -> DeepLabV3Plus:
    """DeepLab v3+ with ``--init-weights`` loaded (nothing is frozen: the reference trains all of it)."""
    model = DeepLabV3Plus(DeepLabArch(cfg.backbone, cfg.out_stride, spec.num_classes, cfg.head_channels))
    if cfg.init_weights is not None:
        report = load_deeplab_weights(model, cfg.init_weights)
        log.info(report.summary())
        if any(name.startswith(HEAD_PREFIX) for name, _, _ in report.shape_mismatch):
            log.info("the class head of %s has another class count: it starts from scratch", cfg.init_weights)
    return model


def build_optimizer(model: DeepLabV3Plus, cfg: Stage2Config, steps: int):
    groups = model.param_groups(cfg.lr, cfg.head_lr_mult)
    optimizer = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, poly_lambda(steps))
    return optimizer, scheduler


def drops_last_batch(patches: int, batch_size: int, drop_last: bool) -> bool:
    """Whether a process with ``patches`` training patches leaves out its epoch's last short batch.

    ``drop_last`` (cpu, best) leaves it out when there is a full batch besides; otherwise (paper) it is
    trained on, as the reference's DataLoader does, unless it would hold a single patch: a batch of one
    breaks BatchNorm in the ASPP's image-pooling branch (the reference crashed there)."""
    if drop_last:
        return patches >= batch_size
    return patches % batch_size == 1


def train_loader(cfg: Stage2Config, dataset: PseudoMaskDataset, dist: Distributed) -> EpochLoader:
    """The training batches of every epoch: uint8 images (normalised on the device), uint8 masks, indices."""
    # Under DDP the DistributedSampler gives every process ⌊N/world⌋ patches, so every process has as
    # many batches as the others, its last one (when kept) as short as theirs.
    per_process = len(dataset) // max(dist.world_size, 1)
    drop_last = drops_last_batch(per_process, cfg.batch_size, cfg.drop_last)
    return EpochLoader(dataset, cfg.batch_size, cfg.workers, cfg.seed, dist, drop_last)


def weight_average(model: DeepLabV3Plus, decay: float):
    """An exponential moving average of ``model``'s weights and BatchNorm statistics (``decay`` per
    step; None when 0). Validated and kept instead of the raw weights: its evaluation does not jump
    with the last few steps' updates, so choosing the best epoch on val is less of a lottery."""
    if decay <= 0:
        return None
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def train_one_epoch(model, batches, optimizer, scheduler, scaler, cfg: Stage2Config, dist: Distributed, writer, epoch,
                    ema=None) -> float:
    """One pass over the training patches in ``cfg.precision`` (resolved); returns the mean weighted
    loss, summed on the device and read back once. ``ema``: a :func:`weight_average` updated after
    every step."""
    model.train()
    loss_fn = build_multi_mask_loss(cfg.loss, cfg.loss_reduction, cfg.pm_weights, get_spec(cfg.dataset).background_index)
    norm, layout = get_input_norm(cfg.input_norm), memory_format(dist.device, cfg.precision)
    total, count = torch.zeros((), dtype=torch.float64, device=dist.device), 0
    bar = progress_bar(batches, dist.is_main, desc=f"stage2 epoch {epoch + 1}/{cfg.epochs}", leave=False)
    losses = StepLosses(dist, epoch, epoch * len(batches), bar, writer, "train/total_loss_iter", optimizer)
    for step, (x, masks, _) in enumerate(bar):
        x = device_images(x, norm, dist.device, layout)
        masks = masks.to(dist.device, non_blocking=True).long()  # uint8 from the loader
        with autocast(dist.device, cfg.precision):
            logits = model(x)["out"]
        loss = loss_fn(logits.float(), masks)  # fp32: cross-entropy's log-softmax over bf16/fp16 logits
        optimizer_step(loss, optimizer, scheduler, scaler)
        if ema is not None:
            ema.update_parameters(_unwrapped(model))
        total += loss.detach().double() * x.shape[0]
        count += x.shape[0]
        losses.add(step, loss)
    losses.flush()
    loss_sum, n = dist.all_reduce_sum([float(total), count])
    return loss_sum / max(n, 1)


def checkpoint_state(model: DeepLabV3Plus, cfg: Stage2Config, spec: DatasetSpec, epoch: int, best: dict,
                     norm: InputNorm | None = None, **extra) -> dict:
    """Our checkpoint format (STYLE rule 6) for stage 2; ``norm``: the input normalisation, stain target
    included (None: ``cfg.input_norm``, no stain target)."""
    return {
        "stage": 2,
        "format": CHECKPOINT_FORMAT,
        "arch": model.arch.to_dict(),
        "model": model.state_dict(),
        "epoch": epoch,
        "best_metric": best.get("mIoU"),
        "best_epoch": best.get("epoch"),
        "best_val": best.get("val"),
        "config": cfglib.to_dict(cfg),
        "dataset": spec.name,
        "class_names": list(spec.classes),
        "spec": spec.to_dict(),
        "input_norm": (norm or get_input_norm(cfg.input_norm)).to_dict(),
        "image_size": cfg.image_size,
        **dataset_scale(spec, cfg.data),  # mpp and patch_size: the scale the model works at
        **extra,
    }


def improves(score: float, best: float | None) -> bool:
    """Strictly better validation mIoU. As the reference (its best starts at 0), a model is kept
    only once it scores above 0."""
    return score > (0.0 if best is None else best)


def finite_score(val: dict, epoch: int, epochs: int, data: Path) -> float:
    """The validation mIoU of ``epoch``; NaN (no class in the val masks nor the predictions) stops
    the run, which cannot choose its best model by it."""
    score = val.get("mIoU")
    if score is None or math.isnan(score):
        raise Stopped(f"the validation mIoU of epoch {epoch + 1} of {epochs} is NaN (no class occurs in the val "
                      f"masks or the predictions): the best model cannot be chosen; check the val masks of {data}")
    return score


def _gate_classifier(cfg: Stage2Config, spec: DatasetSpec) -> LoadedClassifier | None:
    """The stage-1 classifier for the gate, loaded before training so a bad path fails early."""
    if not cfg.gate:
        check_gate_checkpoint(False, cfg.stage1_checkpoint)  # a checkpoint given with --no-gate: warned about
        return None
    if cfg.stage1_checkpoint is None:
        raise WsssError("the gate needs the stage-1 classifier: pass --stage1-checkpoint (or --no-gate)")
    return load_classifier(cfg.stage1_checkpoint, spec)


# --------------------------------------------------------------------------- the stage


def train(cfg: Stage2Config, resume: bool = False, force: bool = False, given: Collection[str] = ()) -> dict:
    """Train stage 2 (single process or one process of a ``torchrun`` job), then test; returns a summary.

    ``given``: the configuration fields set on the command line, which ``resume`` must not contradict.
    OUT and REPORT are held for the run; everything it reads (patches, pseudo-masks, val and test
    masks) is checked before the first epoch."""
    spec = get_spec(cfg.dataset, cfg.labels_csv)
    paths = Stage2Paths.of(cfg)
    key, main = f"train-stage2 {spec.name}", is_main_process()
    with owned_folder(paths.out, "train-stage2", key=key, force=force, read_from=input_folders(cfg.data),
                      enabled=main) as owner:
        cfg, state = resume_state(cfg, paths, STAGE2_RUNTIME_FIELDS, resume, force, read_checkpoint, given, owner)
        if state is not None:
            check_same_spec(recorded_spec(state, paths.last), spec, paths.last)
        paths = Stage2Paths.of(cfg)
        with owned_folder(paths.report, "train-stage2", key=key, force=force, option="--report",
                          read_from=input_folders(cfg.data), enabled=main) as reports:
            dataset, norm, gate = _prepare(cfg, spec, paths, owner, reports, state)
            dist = Distributed(cfg.device)
            with contextlib.ExitStack() as cleanup:  # closed however the run ends: an API caller's process goes on
                cleanup.callback(dist.close)
                return _train(cfg, spec, paths, state, dist, dataset, norm, gate, cleanup)


def _prepare(cfg: Stage2Config, spec: DatasetSpec, paths: Stage2Paths, owner: ownership.Owner,
             reports: ownership.Owner, state: dict | None
             ) -> tuple[PseudoMaskDataset, InputNorm, LoadedClassifier | None]:
    """Before the first epoch: a resumed run reads what it read before, the outputs are ours to
    write, and every patch, pseudo-mask and val/test mask is valid. Returns the training set, the
    model's input normalisation (its stain target fitted, or the resumed run's) and the gate's
    classifier (None without the gate)."""
    samples = list_train(cfg.data, spec)
    mask_paths = pseudo_mask_paths(samples, _pm_dir(cfg), cfg.pm_layers, spec.name)
    # Before any colour is measured (a wrong checkpoint fails first) and before the run is seeded (building
    # the classifier draws random initial weights): the segmenter trains the same with and without the gate.
    gate = _gate_classifier(cfg, spec)
    fitted = check_stain_target(cfg, state)
    inputs = training_inputs(cfg, samples, mask_paths)
    check_same_inputs(owner, inputs, ("train", "pseudo_masks"), state is not None)
    for held in (owner, reports):
        held.begin(cfglib.to_dict(cfg), inputs)
    owner.claim(paths.outputs)
    test_samples = split_masks(cfg.data, "test")
    reports.claim([paths.metrics, *(d / f"{s.image.stem}.png" for s in test_samples
                                    for d in (paths.pred, paths.pred_gate))], "predictions")
    _check_inputs(cfg, spec, samples, mask_paths, test_samples)
    pipeline = input_pipeline(cfg, [s.path for s in samples], state, fitted)
    return training_set(cfg, spec, samples, mask_paths, pipeline, DecodedCache.for_workers(cfg.workers)), \
        pipeline.norm, gate


def split_masks(root: Path, split: str) -> list[MaskedSample]:
    """The image/mask pairs of ``split``; none when it has no masks (training goes on without them)."""
    return list_masked(root, split) if has_masks(root, split) else []


def _pm_dir(cfg: Stage2Config) -> Path:
    return Path(cfg.pm_dir) if cfg.pm_dir is not None else default_pm_dir(cfg.data)


def training_inputs(cfg: Stage2Config, samples, mask_paths) -> dict:
    """What the run reads, as hashes: training patches (names, sizes), pseudo-masks (names, sizes and
    times: regenerated masks keep their names), initial weights."""
    from wsss.data.layout import train_image_dir

    init = Path(cfg.init_weights) if cfg.init_weights is not None else None
    target = Path(cfg.stain_target) if cfg.stain_target is not None else None
    return {"train": listing_hash([s.path for s in samples], train_image_dir(cfg.data)),
            "pseudo_masks": listing_hash([p for row in mask_paths for p in row], _pm_dir(cfg), times=True),
            "init_weights": file_sha256(init) if init is not None and init.is_file() else None,
            **({"stain_target": file_sha256(target)} if target is not None and target.is_file() else {})}


def _check_inputs(cfg: Stage2Config, spec: DatasetSpec, samples, mask_paths, test_samples) -> None:
    """Patches, pseudo-masks (values decoded unless generate-pm recorded them), val and test masks."""
    pm_dir = _pm_dir(cfg)
    manifest = ownership.Manifest.read(pm_dir)

    def trusted(path: Path) -> bool:
        return ownership.manifest_record(manifest, pm_dir, path) is not None

    problems = validate.train_problems(samples, spec)
    problems += validate.pseudo_mask_problems(samples, mask_paths, spec, trusted)
    problems += validate.masked_problems(split_masks(cfg.data, "val"), spec)
    problems += validate.masked_problems(test_samples, spec)
    validate.require(problems, cfg.data, spec.name)
    dataset_scale(spec, cfg.data)  # sources of the patches' µm/px that disagree fail here, not after an epoch


def _train(cfg: Stage2Config, spec: DatasetSpec, paths: Stage2Paths, state: dict | None, dist: Distributed,
           dataset: PseudoMaskDataset, norm: InputNorm, gate: LoadedClassifier | None,
           cleanup: contextlib.ExitStack) -> dict:
    cfg = start_training(cfg, dist)  # the config records the precision the run computes in
    val_samples = split_masks(cfg.data, "val")
    if not val_samples and dist.is_main:
        log.info(without_masks(cfg.data, ["val"], "stage 2 keeps its last epoch (nothing to choose the best by)"))
    if state is None and dist.is_main:
        warn_random_init(cfg)
    model = build_model(cfg if state is None else replace(cfg, init_weights=None), spec).to(dist.device)
    model = model.to(memory_format=memory_format(dist.device, cfg.precision))
    batches = train_loader(cfg, dataset, dist)
    cleanup.callback(batches.close)  # its workers too
    steps_per_epoch = check_batches(batches, len(dataset), cfg.batch_size)
    if not cfg.drop_last and drops_last_batch(len(dataset) // dist.world_size, cfg.batch_size, False):
        log.info("the last batch of every epoch would hold one patch, which BatchNorm cannot train on: left out")
    optimizer, scheduler = build_optimizer(model, cfg, cfg.epochs * steps_per_epoch)
    scaler = grad_scaler(dist.device, cfg.precision)
    start = restore_training(state, model, optimizer, scheduler, scaler)
    best = {} if state is None else {"mIoU": state["best_metric"], "epoch": state["best_epoch"], "val": state["best_val"]}
    ema = weight_average(model, cfg.ema)
    if ema is not None and state is not None and state.get("ema") is not None:
        ema.load_state_dict(state["ema"])
    kept = model if ema is None else ema.module  # what is validated, saved as the model and tested
    train_model = distributed(model, dist, sync_batchnorm=True)
    writer = tensorboard_writer(paths.logs) if dist.is_main else None
    if writer is not None:
        cleanup.callback(writer.close)  # its thread would outlive a run that fails
    if dist.is_main:
        cfglib.save_json(cfg, paths.config)
        log.info("stage 2: %d patches, PM layers %s (weights %s), %d steps/epoch, device %s, precision %s, "
                 "world size %d", len(dataset), ",".join(cfg.pm_layers), ",".join(f"{w:g}" for w in cfg.pm_weights),
                 steps_per_epoch, dist.device, cfg.precision, dist.world_size)
    note_epochs(paths, start, cfg.epochs)
    started = time.perf_counter()
    for epoch in range(start, cfg.epochs):
        reseed_epoch(cfg, epoch, dist)
        loss = train_one_epoch(train_model, batches.epoch(epoch), optimizer, scheduler, scaler, cfg, dist, writer, epoch,
                               ema=ema)
        stain.log_counts("training patches of this epoch")
        val = score_val(kept, cfg, spec, val_samples, dist, norm) if val_samples else None
        score = finite_score(val, epoch, cfg.epochs, cfg.data) if val is not None else None  # every process
        if dist.is_main:
            _log_epoch(writer, epoch, cfg, loss, val)
            if val is None or improves(score, best.get("mIoU")):  # without val masks: the latest epoch
                best = {"mIoU": score, "epoch": epoch, "val": val}
                save_checkpoint(paths.checkpoint, checkpoint_state(kept, cfg, spec, epoch, best, norm))
                if val is not None:
                    log.info("best validation mIoU so far: saved %s", paths.checkpoint)
            save_checkpoint(paths.last, checkpoint_state(
                model, cfg, spec, epoch, best, norm, optimizer=optimizer.state_dict(),
                scheduler=scheduler.state_dict(), scaler=scaler.state_dict(),
                ema=None if ema is None else ema.state_dict(), epochs_total=cfg.epochs))
            note_epochs(paths, epoch + 1, cfg.epochs)
        dist.barrier()
    batches.close()
    summary = {"train_seconds": round(time.perf_counter() - started, 1), "epochs": cfg.epochs,
               "checkpoint": str(paths.checkpoint)}
    if dist.is_main and best.get("epoch") is None:  # only the main process keeps the best
        raise WsssError(f"no epoch reached a validation mIoU above 0, so no model was kept to test (as the "
                        f"reference); the last epoch is in {paths.last}")
    if dist.is_main:
        note_saved(f"training finished ({paths.checkpoint} saved); the test was cut short", True)
        summary["metrics"] = test_and_report(cfg, spec, paths, dist.device, gate, best)
        summary["report"] = str(paths.report)
        if writer is not None:
            for key in ("test", "test_gate"):
                if summary["metrics"][key] is not None:
                    writer.add_scalar(f"{key}/mIoU", summary["metrics"][key]["mIoU"] or 0.0, cfg.epochs)
            writer.close()
    return summary


def training_set(cfg: Stage2Config, spec: DatasetSpec, samples, mask_paths, pipeline: InputPipeline,
                 cache: DecodedCache | None = None) -> PseudoMaskDataset:
    """uint8 patches and pseudo-masks, colour-augmented and mapped onto the stain target in the workers."""
    return PseudoMaskDataset(samples, mask_paths, cfg.image_size, None, spec, geometric=cfg.augment,
                             stain=cfg.stain_jitter, mosaic=cfg.mosaic, colour=pipeline.colour,
                             stain_norm=pipeline.norm.stain, cache=cache)


def _unwrapped(model):
    """The model a DistributedDataParallel wrapper trains (the model itself otherwise)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def _log_epoch(writer, epoch: int, cfg: Stage2Config, loss: float, val: dict | None) -> None:
    def fmt(v):
        return "nan" if v is None else f"{v:.4f}"

    if val is None:  # no val masks
        log.info("epoch %d/%d  loss %.4f", epoch + 1, cfg.epochs, loss)
        if writer is not None:
            writer.add_scalar("train/total_loss_epoch", loss, epoch)
            writer.flush()
        return
    log.info("epoch %d/%d  loss %.4f  val mIoU %s  fwIoU %s  pixel acc %s", epoch + 1, cfg.epochs, loss,
             fmt(val["mIoU"]), fmt(val["fwIoU"]), fmt(val["pixel_acc"]))
    if writer is not None:
        writer.add_scalar("train/total_loss_epoch", loss, epoch)
        for tag, key in (("val/mIoU", "mIoU"), ("val/fwIoU", "fwIoU"), ("val/Acc", "pixel_acc"),
                         ("val/Acc_class", "mean_class_acc")):
            writer.add_scalar(tag, math.nan if val[key] is None else val[key], epoch)
        writer.flush()


def _test_last_epoch(cfg: Stage2Config, spec: DatasetSpec, paths: Stage2Paths, device: torch.device,
                     gate: LoadedClassifier | None, best: dict) -> dict | None:
    if best.get("epoch") is None or best["epoch"] == cfg.epochs - 1 or not paths.last.is_file():
        return None
    if not has_masks(cfg.data, "test"):
        return None
    seg = load_segmenter(paths.last, spec)
    ema = read_checkpoint(paths.last).get("ema") if cfg.ema else None
    if ema is not None:  # the last epoch's weight average, which is what validation saw
        seg.model.load_state_dict({k.removeprefix("module."): v for k, v in ema.items() if k.startswith("module.")})
    meters = evaluate_samples(seg, list_masked(cfg.data, "test"), spec, device, gate,
                              cfg.gate_threshold, cfg.batch_size, cfg.workers, cfg.precision, None, desc="test last epoch",
                              gate_mode=cfg.gate_mode)
    return meters["gate" if "gate" in meters else "plain"].to_json(list(spec.classes))


def test_and_report(cfg: Stage2Config, spec: DatasetSpec, paths: Stage2Paths, device: torch.device,
                    gate: LoadedClassifier | None, best: dict) -> dict:
    """Test the best checkpoint (read back from disk, as ``wsss evaluate`` would) with and without
    the gate; write ``metrics.json`` and the prediction PNGs; log the tables. Without test masks
    the scores are left out (None, with one line saying why); ``kept`` says which epoch's model it is."""
    kept = "best validation mIoU" if best.get("val") is not None else "last epoch (no val masks)"
    if not has_masks(cfg.data, "test"):
        reason = without_masks(cfg.data, ["test"], "the test scores are left out")
        log.info(reason)
        metrics = {"test": None, "test_gate": None, "val_best": best.get("val"),
                   "best_epoch": None if best.get("epoch") is None else best["epoch"] + 1,
                   "test_last_epoch": None, "kept": kept, "left_out": reason}
        write_json(paths.metrics, metrics)
        return metrics
    seg = load_segmenter(paths.checkpoint, spec)
    pred_dirs = {"plain": paths.pred, "gate": paths.pred_gate}
    meters = evaluate_samples(seg, list_masked(cfg.data, "test"), spec, device, gate, cfg.gate_threshold,
                              cfg.batch_size, cfg.workers, cfg.precision, pred_dirs, desc="test", gate_mode=cfg.gate_mode)
    names = list(spec.classes)
    metrics = {
        "test": meters["plain"].to_json(names),
        "test_gate": meters["gate"].to_json(names) if "gate" in meters else None,
        "val_best": best.get("val"),
        "best_epoch": None if best.get("epoch") is None else best["epoch"] + 1,
        # The last epoch's model on the same test split (with the gate when there is one), so that
        # what choosing by validation gains or loses is on record: None when the best is the last.
        "test_last_epoch": _test_last_epoch(cfg, spec, paths, device, gate, best),
        "kept": kept,
    }
    write_json(paths.metrics, metrics)
    log.info(format_table(metrics["test"], "stage-2 segmentation, test split"))
    if metrics["test_gate"] is not None:
        log.info(format_table(metrics["test_gate"], f"stage-2 segmentation with the gate (p > {cfg.gate_threshold:g}, {cfg.gate_mode}), test split"))
    return metrics
