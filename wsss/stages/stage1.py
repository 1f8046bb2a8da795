"""Stage 1: train the ResNet38 multi-label classifier with PDA, then evaluate its CAMs.

Outputs in ``OUT`` (``<d>`` is the dataset spec's name):

* ``stage1_checkpoint_trained_on_<d>.pth`` — the trained classifier (what later stages load)
* ``stage1_<d>_last.pth`` — resumable state after the last finished epoch
* ``stage1_<d>_config.json`` — the resolved configuration
* ``stage1_<d>_cam_metrics.json`` — CAM segmentation metrics on the evaluation splits
* ``runs/stage1_<d>/`` — tensorboardX scalars
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Collection
from dataclasses import dataclass, replace
from typing import ClassVar
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from wsss import config as cfglib
from wsss.data import stain
from wsss.cam.cam import cam_to_segmentation, upsample_cams
from wsss.cam.pda import PdaSchedule
from wsss.config import Stage1Config
from wsss.data.datasets import ClassificationDataset, DecodedCache, InputNorm, MaskedDataset, get_input_norm
from wsss.data.layout import list_masked, list_train, masked_splits, without_masks
from wsss.data.scale import dataset_scale
from wsss.data.specs import DatasetSpec, check_same_spec, get_spec, recorded_spec
from wsss.metrics import ConfusionMeter, format_table, write_json
from wsss.models.resnet38 import ResNet38Classifier
from wsss.models.weights import load_stage1_weights
from wsss.data import validate
from wsss.data.validate import input_folders
from wsss.runs.owner import Owner, file_sha256, listing_hash, owned_folder
from wsss.stages.common import (
    EpochLoader, InputPipeline, RunPaths, StepLosses, check_batches, check_same_inputs, check_stain_target,
    device_images, distributed, input_pipeline, note_epochs, optimizer_step, reseed_epoch, restore_training,
    resume_state, start_training, tensorboard_writer,
)
from wsss.runtime import (
    CHECKPOINT_FORMAT, Distributed, autocast, grad_scaler, is_main_process, memory_format, note_saved, progress_bar,
    save_checkpoint,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Stage1Paths(RunPaths):
    STAGE: ClassVar[int] = 1

    @property
    def cam_metrics(self) -> Path:
        return self.out / f"stage1_{self.dataset}_cam_metrics.json"

    @property
    def outputs(self) -> list[Path]:
        return [*super().outputs, self.cam_metrics]


# --------------------------------------------------------------------------- building blocks


def poly_lambda(max_step: int, power: float = 0.9):
    """Poly decay factor per optimizer step: ``(1 - step / max_step) ** power``."""

    def factor(step: int) -> float:
        return max(0.0, 1.0 - step / max_step) ** power

    return factor


def build_optimizer(model: ResNet38Classifier, cfg: Stage1Config, steps: int):
    groups = model.param_groups(cfg.lr, cfg.weight_decay, cfg.head_lr_mult)
    groups = [g for g in groups if g["params"]]
    optimizer = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, poly_lambda(steps))
    return optimizer, scheduler


IMAGENET_WEIGHTS = "ilsvrc-cls_rna-a1_cls1000_ep-0001.params"
"""The reference's stage-1 initialisation (MXNet ImageNet weights of ResNet38, read by wsss.models.weights)."""


def warn_random_init(cfg: Stage1Config) -> None:
    """The paper preset without ``--init-weights`` trains another recipe than the reference: say so once."""
    if cfg.init_weights is None and cfg.preset in (None, "paper"):
        log.warning("warning: the paper preset without --init-weights (the reference starts from %s): stage 1 "
                    "starts from random weights, so every BatchNorm is trained and nothing is frozen",
                    IMAGENET_WEIGHTS)


def build_model(cfg: Stage1Config, spec: DatasetSpec) -> ResNet38Classifier:
    """The classifier, with ``--init-weights`` loaded and the freeze policy applied."""
    model = ResNet38Classifier(spec.num_classes, width=cfg.width)
    model.scale_dropout(cfg.dropout)
    if cfg.init_weights is not None:
        report = load_stage1_weights(model, cfg.init_weights)
        log.info(report.summary())
        # Pretrained BN statistics and stem are kept as they are (reference); a random
        # initialisation must train everything.
        model.freeze_pretrained()
        log.info("pretrained weights loaded: BatchNorm and conv1a, b2, b2_1, b2_2 frozen")
    return model


def train_loader(cfg: Stage1Config, samples, dist: Distributed, pipeline: InputPipeline | None = None) -> EpochLoader:
    """The training batches of every epoch: uint8 images (colour-augmented and stain-normalised by
    ``pipeline`` in the workers, scaled on the device), labels, indices."""
    dataset = training_set(cfg, samples, pipeline, DecodedCache.for_workers(cfg.workers))
    drop_last = len(dataset) // max(dist.world_size, 1) > cfg.batch_size
    return EpochLoader(dataset, cfg.batch_size, cfg.workers, cfg.seed, dist, drop_last)


def training_set(cfg: Stage1Config, samples, pipeline: InputPipeline | None = None,
                 cache: DecodedCache | None = None) -> ClassificationDataset:
    """The training patches as the workers prepare them: uint8, augmented as ``cfg`` says, colour-
    augmented and stain-normalised by ``pipeline`` (:func:`~wsss.stages.common.input_pipeline`)."""
    colour, target = (pipeline.colour, pipeline.norm.stain) if pipeline is not None else (None, None)
    return ClassificationDataset(samples, cfg.image_size, None, augment=True, geometric=cfg.augment,
                                 stain=cfg.stain_jitter, colour=colour, stain_norm=target, cache=cache)


def training_format(device: torch.device, precision: str) -> torch.memory_format:
    """The layout of the training step: :func:`wsss.runtime.memory_format`, except NCHW on the CPU
    in every precision: there ResNet38's bf16 step measured slower in channels_last than in NCHW,
    and its fp32 backward in channels_last crashes (a segmentation fault in torch 2.14's oneDNN)."""
    return memory_format(device, precision) if device.type != "cpu" else torch.contiguous_format


# --------------------------------------------------------------------------- training


@dataclass
class EpochStats:
    loss: float
    exact_match: float  # all labels of a patch right
    label_acc: float  # fraction of right label bits


def train_one_epoch(model, batches, optimizer, scheduler, scaler, gamma, cfg, dist, writer, epoch,
                    total: int | None = None) -> EpochStats:
    """One pass over ``batches`` (uint8 images) in ``cfg.precision`` (resolved); the statistics are
    summed on the device and read back once, at the end."""
    model.train()
    norm, layout = get_input_norm(cfg.input_norm), training_format(dist.device, cfg.precision)
    totals = torch.zeros(3, dtype=torch.float64, device=dist.device)  # loss·n, exact, right bits
    count = 0
    bar = progress_bar(batches, dist.is_main, desc=f"stage1 epoch {epoch + 1}/{total or cfg.epochs}", leave=False)
    losses = StepLosses(dist, epoch, epoch * len(batches), bar, writer, "train/loss_iter", optimizer)
    for step, (x, y, _) in enumerate(bar):
        x = device_images(x, norm, dist.device, layout)
        y = y.to(dist.device, non_blocking=True)
        with autocast(dist.device, cfg.precision):
            logits = model(x, pda_gamma=gamma, pda_norm=cfg.pda_norm)
        loss = F.multilabel_soft_margin_loss(logits.float(), y)  # fp32: the loss of bf16/fp16 logits
        optimizer_step(loss, optimizer, scheduler, scaler)
        with torch.no_grad():
            right = ((logits > 0).float() == y).float()
            n = x.shape[0]
            totals += torch.stack([loss.detach().double() * n, right.all(dim=1).sum().double(),
                                   right.mean(dim=1).sum().double()])
            count += n
        losses.add(step, loss)
    losses.flush()
    loss_sum, exact, bits, n = dist.all_reduce_sum([*totals.tolist(), count])
    return EpochStats(loss_sum / max(n, 1), exact / max(n, 1), bits / max(n, 1))


def checkpoint_state(model, cfg: Stage1Config, spec: DatasetSpec, epoch: int, norm: InputNorm | None = None,
                     **extra) -> dict:
    """Our checkpoint format (STYLE rule 6): everything needed to reuse or resume the model; ``norm``
    is the model's input normalisation, its stain target included (None: ``cfg.input_norm``, no stain target)."""
    return {
        "stage": 1,
        "format": CHECKPOINT_FORMAT,
        "arch": {"name": "resnet38", "width": cfg.width, "num_classes": spec.num_classes},
        "model": model.state_dict(),
        "epoch": epoch,
        "best_metric": None,
        "config": cfglib.to_dict(cfg),
        "dataset": spec.name,
        "class_names": list(spec.classes),
        "spec": spec.to_dict(),
        "input_norm": (norm or get_input_norm(cfg.input_norm)).to_dict(),
        "image_size": cfg.image_size,
        "frozen_pretrained": model.is_frozen_pretrained,
        **dataset_scale(spec, cfg.data),  # mpp and patch_size: the scale the model works at
        **extra,
    }


def train(cfg: Stage1Config, resume: bool = False, force: bool = False, given: Collection[str] = ()) -> dict:
    """Train stage 1 (single process or one process of a ``torchrun`` job); returns a summary.

    ``given``: the configuration fields set on the command line, which ``resume`` must not contradict.
    The output folder is held for the run (:func:`wsss.runs.owner.owned_folder`); what it reads is
    checked before training starts."""
    spec = get_spec(cfg.dataset, cfg.labels_csv)
    paths = Stage1Paths(Path(cfg.out), spec.name)
    with owned_folder(paths.out, "train-stage1", key=f"train-stage1 {spec.name}", force=force,
                      read_from=input_folders(cfg.data), enabled=is_main_process()) as owner:
        cfg, state = resume_state(cfg, paths, cfglib.STAGE1_RUNTIME_FIELDS, resume, force, given=given, owner=owner)
        if state is not None:
            check_same_spec(recorded_spec(state, paths.last), spec, paths.last)
        samples, pipeline = _prepare(cfg, spec, paths, owner, state)
        dist = Distributed(cfg.device)
        with contextlib.ExitStack() as cleanup:  # closed however the run ends: an API caller's process goes on
            cleanup.callback(dist.close)
            return _train(cfg, spec, paths, state, dist, samples, pipeline, cleanup)


def _prepare(cfg: Stage1Config, spec: DatasetSpec, paths: Stage1Paths, owner: Owner,
             state: dict | None) -> tuple[list, InputPipeline]:
    """Before the first epoch: a resumed run reads the patches it read before, the outputs are ours
    to write, and every training patch and evaluation mask is valid. Returns the training samples and
    how they become model inputs (the stain target fitted, or the resumed run's)."""
    samples = list_train(cfg.data, spec)
    fitted = check_stain_target(cfg, state)
    inputs = training_inputs(cfg, samples)
    check_same_inputs(owner, inputs, ("train",), state is not None)
    owner.begin(cfglib.to_dict(cfg), inputs)
    owner.claim(paths.outputs)
    problems = validate.train_problems(samples, spec)
    for split in masked_splits(cfg.data, cfg.eval_splits):
        problems += validate.masked_problems(list_masked(cfg.data, split), spec)
    validate.require(problems, cfg.data, spec.name)
    dataset_scale(spec, cfg.data)  # sources of the patches' µm/px that disagree fail here, not after an epoch
    return samples, input_pipeline(cfg, [s.path for s in samples], state, fitted)


def training_inputs(cfg: Stage1Config, samples) -> dict:
    """What the run reads, as hashes: the training patches (names and sizes) and the initial weights."""
    from wsss.data.layout import train_image_dir

    init = Path(cfg.init_weights) if cfg.init_weights is not None else None
    target = Path(cfg.stain_target) if cfg.stain_target is not None else None
    return {"train": listing_hash([s.path for s in samples], train_image_dir(cfg.data)),
            "init_weights": file_sha256(init) if init is not None and init.is_file() else None,
            **({"stain_target": file_sha256(target)} if target is not None and target.is_file() else {})}


def _train(cfg: Stage1Config, spec: DatasetSpec, paths: Stage1Paths, state: dict | None, dist: Distributed,
           samples, pipeline: InputPipeline, cleanup: contextlib.ExitStack) -> dict:
    cfg = start_training(cfg, dist)  # the config records the precision the run computes in
    if state is None and dist.is_main:
        warn_random_init(cfg)
    model = build_model(cfg if state is None else replace(cfg, init_weights=None), spec).to(dist.device)
    model = model.to(memory_format=training_format(dist.device, cfg.precision))
    if state is not None and state.get("frozen_pretrained"):
        model.freeze_pretrained()
    batches = train_loader(cfg, samples, dist, pipeline)
    cleanup.callback(batches.close)  # its workers too
    steps_per_epoch = check_batches(batches, len(samples), cfg.batch_size)
    optimizer, scheduler = build_optimizer(model, cfg, cfg.epochs * steps_per_epoch)
    refitting = state is not None and bool(state.get("refit"))  # resumed inside the refit epochs
    if refitting:
        scheduler = refit_schedule(optimizer, cfg, steps_per_epoch)
    scaler = grad_scaler(dist.device, cfg.precision)
    start = restore_training(state, model, optimizer, scheduler, scaler)
    ddp_model = distributed(model, dist)
    schedule = PdaSchedule(cfg.pda_start, cfg.pda_decay, cfg.pda_floor, cfg.pda_first_epoch)
    writer = tensorboard_writer(paths.logs) if dist.is_main else None
    if writer is not None:
        cleanup.callback(writer.close)  # its thread would outlive a run that fails
    if dist.is_main:
        cfglib.save_json(cfg, paths.config)
        log.info("stage 1: %d patches, %d steps/epoch, device %s, precision %s, world size %d",
                 len(samples), steps_per_epoch, dist.device, cfg.precision, dist.world_size)
    with_refit = cfg.epochs + cfg.refit_epochs
    total = with_refit if refitting else cfg.epochs
    note_epochs(paths, start, total)
    started = time.perf_counter()

    def run(epochs: range, scheduler, total: int, **extra) -> None:
        for epoch in epochs:
            reseed_epoch(cfg, epoch, dist)
            gamma = schedule.gamma_at(epoch) if cfg.pda else None
            stats = train_one_epoch(ddp_model, batches.epoch(epoch), optimizer, scheduler, scaler, gamma, cfg, dist,
                                    writer, epoch, total=total)
            stain.log_counts("training patches of this epoch")
            if dist.is_main:
                _log_epoch(writer, epoch, total, stats, gamma, optimizer)
                save_checkpoint(paths.last, checkpoint_state(
                    model, cfg, spec, epoch, pipeline.norm, optimizer=optimizer.state_dict(),
                    scheduler=scheduler.state_dict(), scaler=scaler.state_dict(), epochs_total=total, **extra))
                note_epochs(paths, epoch + 1, total)
            dist.barrier()

    def check_fit() -> tuple[dict | None, bool]:
        """The fit, measured by the main process; whether it fits, as every process learns it."""
        fit = training_fit(model, cfg, samples, dist.device, pipeline.norm) if dist.is_main else None
        return fit, dist.all_reduce_sum([float(bool(fit and fit["fits"]))])[0] > 0

    fit_before = state.get("fit_before_refit") if refitting else None
    if not refitting:
        run(range(start, cfg.epochs), scheduler, cfg.epochs)
        fit, fits = check_fit()
        if not fits and cfg.refit_epochs > 0:
            fit_before, total = fit, with_refit
            if dist.is_main:
                log.warning("stage 1 does not fit its training labels yet (label accuracy %.3f < %.2f): %d more "
                            "epochs on a restarted learning-rate schedule (--refit-epochs)",
                            fit["label_acc"], FIT_LABEL_ACC, cfg.refit_epochs)
            scheduler, start, refitting = refit_schedule(optimizer, cfg, steps_per_epoch), cfg.epochs, True
            model.to(memory_format=training_format(dist.device, cfg.precision))  # the fit check's layout undone
    if refitting:
        run(range(start, total), scheduler, total, refit=True, fit_before_refit=fit_before)
        fit, _ = check_fit()
    batches.close()
    seconds = time.perf_counter() - started
    summary = {"train_seconds": round(seconds, 1), "epochs": total, "checkpoint": str(paths.checkpoint)}
    if dist.is_main:
        if fit_before is not None:
            fit = {**fit, "refit_epochs": cfg.refit_epochs, "before_refit": fit_before}
        summary["fit"] = fit
        report_fit(fit)
        save_checkpoint(paths.checkpoint, checkpoint_state(model, cfg, spec, total - 1, pipeline.norm, fit=fit))
        note_saved(f"training finished ({paths.checkpoint} saved); the CAM evaluation was cut short", True)
        if cfg.eval_splits:
            summary["cam_metrics"] = evaluate_and_save(model, cfg, spec, dist.device, paths.cam_metrics, pipeline.norm)
        if writer is not None:
            writer.close()
    return summary


def refit_schedule(optimizer, cfg: Stage1Config, steps_per_epoch: int):
    """The refit epochs' learning rates: the poly schedule again from the start (every group's
    initial rate), over ``cfg.refit_epochs`` epochs."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, poly_lambda(cfg.refit_epochs * steps_per_epoch))


FIT_LABEL_ACC = 0.95
"""A stage-1 classifier whose label accuracy on its own training patches (eval mode, no
augmentation) ends below this has not fitted its labels, and its CAMs are poor: the run says so."""


@torch.no_grad()
def training_fit(model: ResNet38Classifier, cfg: Stage1Config, samples, device: torch.device, norm: InputNorm,
                 batch_size: int = 32) -> dict:
    """How well the trained classifier fits its training labels: label accuracy (right label bits)
    and exact match (all labels of a patch right) over the training patches, as they are (eval mode,
    no augmentation), per class too; ``fits`` compares the label accuracy with :data:`FIT_LABEL_ACC`."""
    dataset = ClassificationDataset(samples, cfg.image_size, None, stain_norm=norm.stain)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=cfg.workers, pin_memory=device.type == "cuda")
    layout = memory_format(device, cfg.precision)
    model.eval().to(memory_format=layout)
    right_bits, exact, n = None, 0, 0
    for x, y, _ in progress_bar(loader, True, desc="stage1 fit", leave=False):
        with autocast(device, cfg.precision):
            logits = model(device_images(x, norm, device, layout))
        right = ((logits.float() > 0).cpu().float() == y)
        right_bits = right.sum(0) if right_bits is None else right_bits + right.sum(0)
        exact += int(right.all(dim=1).sum())
        n += x.shape[0]
    per_class = (right_bits / max(n, 1)).tolist()
    label_acc = sum(per_class) / len(per_class)
    return {"label_acc": round(label_acc, 4), "exact_match": round(exact / max(n, 1), 4),
            "per_class_acc": [round(a, 4) for a in per_class], "threshold": FIT_LABEL_ACC,
            "fits": label_acc >= FIT_LABEL_ACC}


def report_fit(fit: dict) -> None:
    """One line: how well stage 1 fits its training labels, and what to try when it does not."""
    if fit["fits"]:
        log.info("stage 1 fits its training labels: label accuracy %.3f, exact match %.3f",
                 fit["label_acc"], fit["exact_match"])
        return
    log.warning("warning: stage 1 does not fit its training labels (label accuracy %.3f < %.2f, exact match %.3f): "
                "its CAMs and pseudo-masks will be poor; try more --epochs, a larger --width, the patches' own "
                "--image-size, or another --seed", fit["label_acc"], fit["threshold"], fit["exact_match"])


def _log_epoch(writer, epoch, total: int, stats: EpochStats, gamma, optimizer) -> None:
    gamma_text = "off" if gamma is None else f"{gamma:.4f}"
    log.info("epoch %d/%d  loss %.4f  exact-match %.3f  label acc %.3f  PDA gamma %s",
             epoch + 1, total, stats.loss, stats.exact_match, stats.label_acc, gamma_text)
    if writer is not None:
        writer.add_scalar("train/loss", stats.loss, epoch)
        writer.add_scalar("train/exact_match_acc", stats.exact_match, epoch)
        writer.add_scalar("train/label_acc", stats.label_acc, epoch)
        writer.add_scalar("train/lr_epoch_end", optimizer.param_groups[0]["lr"], epoch)
        writer.add_scalar("train/pda_gamma", 0.0 if gamma is None else gamma, epoch)
        writer.flush()


# --------------------------------------------------------------------------- loading and CAM evaluation


@torch.no_grad()
def predict_cams(model: ResNet38Classifier, x: torch.Tensor, size: tuple[int, int], threshold: float,
                 tie_rule: str = "ours", precision: str = "fp32") -> torch.Tensor:
    """Images (B, 3, S, S) → CAM segmentation (B, H, W) at the masks' size ``(H, W)``; the model runs
    in ``precision`` (resolved), the sigmoid, upsampling and min-max normalisation in fp32."""
    with autocast(x.device, precision):
        cams, logits = model.cams_and_logits(x)
    return cam_to_segmentation(upsample_cams(cams.float(), size), torch.sigmoid(logits.float()), threshold, tie_rule)


def evaluate_cams(model, data: Path, split: str, spec: DatasetSpec, *, norm: InputNorm, image_size: int | None,
                  device: torch.device, threshold: float = 0.25, batch_size: int = 16, workers: int = 0,
                  precision: str = "fp32", tie_rule: str = "ours") -> dict:
    """CAM segmentation metrics of ``split`` (JSON dict of :func:`wsss.metrics.scores_to_json`), the
    classifier run in ``precision`` (resolved); the CAMs are upsampled and normalised in fp32."""
    samples = list_masked(data, split)
    validate.require(validate.masked_problems(samples, spec), data, spec.name)
    norm = norm.for_set(lambda: stain.measure_paths([s.image for s in samples], image_size), f"the {split} split")
    loader = DataLoader(MaskedDataset(samples, image_size, norm, spec), batch_size=batch_size, num_workers=workers,
                        pin_memory=device.type == "cuda")
    meter = ConfusionMeter(spec.num_classes, spec.background_index)
    layout = memory_format(device, precision)
    model.eval().to(device, memory_format=layout)
    for x, mask, _ in progress_bar(loader, True, desc=f"CAM eval {split}", leave=False):
        x = x.to(device, non_blocking=True).contiguous(memory_format=layout)
        pred = predict_cams(model, x, tuple(mask.shape[-2:]), threshold, tie_rule, precision)
        meter.update(pred.cpu(), mask)
    stain.log_counts(f"{split} patches")
    return meter.to_json(list(spec.classes))


def evaluate_and_save(model, cfg: Stage1Config, spec: DatasetSpec, device, path: Path, norm: InputNorm) -> dict:
    results = {}
    skipped = without_masks(cfg.data, cfg.eval_splits, "their CAM evaluation is left out (stage 1 keeps its last "
                                                        "epoch either way)")
    if skipped:
        log.info(skipped)
    for split in masked_splits(cfg.data, cfg.eval_splits):
        results[split] = evaluate_cams(model, cfg.data, split, spec, norm=norm, image_size=cfg.image_size, device=device,
                                       threshold=cfg.cam_threshold, workers=cfg.workers, precision=cfg.precision,
                                       tie_rule=cfg.cam_tie_rule)
        log.info(format_table(results[split], f"stage-1 CAM segmentation, {split} split"))
    write_json(path, results)
    return results
