"""What the two training stages share: their output file names, resuming, the training loader, the
optimizer step, the loss check, tensorboard logs and the model's input pipeline (stain target, colour
augmentation)."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Collection
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, ClassVar

import torch

from wsss import config as cfglib
from wsss.errors import WsssError
from wsss.runs.journal import diff_settings
from wsss.runs.owner import Owner
from wsss.models.loading import expect_stage
from wsss.runtime import (
    Distributed, load_checkpoint, load_scaler_state, note_saved, resolve_precision, seed_everything, seed_worker,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunPaths:
    """Files of one training run of stage ``STAGE`` on ``dataset`` in the folder ``out``."""

    out: Path
    dataset: str

    STAGE: ClassVar[int] = 0

    @property
    def checkpoint(self) -> Path:
        """The model other commands load (the final one for stage 1, the best on val for stage 2)."""
        return self.out / f"stage{self.STAGE}_checkpoint_trained_on_{self.dataset}.pth"

    @property
    def last(self) -> Path:
        """Resumable state after the last finished epoch."""
        return self.out / f"stage{self.STAGE}_{self.dataset}_last.pth"

    @property
    def config(self) -> Path:
        return self.out / f"stage{self.STAGE}_{self.dataset}_config.json"

    @property
    def logs(self) -> Path:
        return self.out / "runs" / f"stage{self.STAGE}_{self.dataset}"

    @property
    def outputs(self) -> list[Path]:
        """The files of ``out`` the run writes (its tensorboard logs apart)."""
        return [self.checkpoint, self.last, self.config]


def resume_state(cfg: Any, paths: RunPaths, runtime_fields: Collection[str], resume: bool, force: bool,
                 read: Callable[[Path], dict] = load_checkpoint, given: Collection[str] = (),
                 owner: Owner | None = None) -> tuple[Any, dict | None]:
    """The configuration to run with and the saved state to continue from (or None).

    Resuming keeps what the saved run computes (its configuration) and takes how it runs
    (``runtime_fields``: device, workers, ...) from this invocation; an option the user ``given``
    with another value than the saved run's is refused (one line naming each). Without ``resume``
    an earlier run in the folder is an error unless ``force``, and so is a checkpoint wsss did not
    write there (downloaded weights: ``owner`` tells).
    """
    stage = paths.STAGE
    if resume and force:
        raise WsssError("--resume continues the saved run and --force starts over: pass one of them")
    if not resume:
        if not force:
            _refuse_earlier_run(paths, owner)
        return cfg, None
    if not paths.last.exists():
        log.info("no earlier run in %s: starting from scratch", paths.out)
        return cfg, None
    legacy = owner is not None and owner.active and not owner.manifest.files  # outputs of a wsss without manifests
    if owner is not None and owner.active and not legacy and not owner.ours(paths.last):
        raise WsssError(f"{paths.last} was not written by wsss in {paths.out} (copied there, or changed since): "
                        "it is not resumed; move it, or pass --force instead of --resume to start over")
    state = read(paths.last)
    expect_stage(state, paths.last, stage)
    if legacy:
        _adopt_legacy_run(owner, paths, state, read)
    _refuse_unknown_settings(type(cfg), state["config"], paths)
    saved = cfglib.from_dict(type(cfg), state["config"])
    _refuse_other_options(cfg, saved, paths, set(given) - set(runtime_fields) - {"dataset", "data", "out"})
    cfg = replace(saved, **{k: getattr(cfg, k) for k in runtime_fields})
    # the epochs the saved run was working towards (stage 1's refit epochs included); older states: cfg.epochs
    log.info("resuming %s after epoch %d of %d", paths.last, state["epoch"] + 1, state.get("epochs_total", cfg.epochs))
    return cfg, state


def _adopt_legacy_run(owner: Owner, paths: RunPaths, state: dict, read: Callable[[Path], dict]) -> None:
    """A folder an older wsss wrote (no manifest) holds the run ``--resume`` names: its resumable
    state, and its model when that records the same configuration, are recorded as this run's."""
    for path in paths.outputs:
        if not path.is_file() or path == paths.checkpoint:
            continue
        owner.record(path)
    if paths.checkpoint.is_file():
        model = read(paths.checkpoint)
        if model.get("stage") == paths.STAGE and model.get("config") == state["config"]:
            owner.record(paths.checkpoint)
    log.info("%s was written by an older wsss: resuming it, and recording its files as this run's", paths.out)


def _refuse_earlier_run(paths: RunPaths, owner: Owner | None) -> None:
    earlier = [p for p in (paths.last, paths.checkpoint) if p.exists()]
    if not earlier:
        return
    foreign = [p for p in earlier if owner is not None and owner.active and not owner.ours(p)]
    if foreign:
        raise WsssError(f"{foreign[0]} exists and was not written by wsss (downloaded weights?): training would "
                        f"replace it; choose another --out, move the file, or pass --force to replace it")
    raise WsssError(f"{earlier[0]} holds an earlier stage-{paths.STAGE} run; pass --resume to continue it "
                    "or --force to start over")


def _refuse_unknown_settings(cls: type, saved: dict, paths: RunPaths) -> None:
    """A run saved with a setting this version does not have (removed, or from a newer wsss) that was
    on cannot be continued as it was computing: refuse rather than silently drop it."""
    known = {f.name for f in fields(cls)}
    saved = cfglib.upgrade(saved)
    unknown = {k: v for k, v in saved.items() if k not in known and v not in (None, False, 0, "", [], {})}
    if unknown:
        settings = ", ".join(f"{k.replace('_', '-')} {v}" for k, v in sorted(unknown.items()))
        raise WsssError(f"{paths.last} was saved with settings this version of wsss does not have ({settings}): "
                        "it cannot be continued as it was; pass --force (without --resume) to start over")


def _refuse_other_options(cfg: Any, saved: Any, paths: RunPaths, given: Collection[str]) -> None:
    """``--resume`` with options that change what the saved run computes is a contradiction."""
    names = sorted(given)
    changed = diff_settings({n: getattr(saved, n, None) for n in names}, {n: getattr(cfg, n, None) for n in names},
                            options=True)
    if changed:
        raise WsssError(f"--resume continues the run saved in {paths.last} with its own settings, but these options "
                        f"differ from it: {', '.join(changed)}; drop them to continue, or pass --force (without "
                        "--resume) to start over with them")


def check_same_inputs(owner: Owner, inputs: dict, names: Collection[str], resumed: bool) -> None:
    """A resumed run must read what the interrupted one read (``names``: the inputs that matter to the
    epochs still to run); otherwise its result would be no run's. Compared with the folder's record."""
    if not resumed or not owner.active:
        return
    previous = owner.previous_run()
    if previous is None:
        return  # a run of an older wsss: nothing recorded to compare with
    diffs = diff_settings(previous.get("inputs") or {}, inputs, [n for n in names if n in (previous.get("inputs") or {})])
    if diffs:
        raise WsssError(f"the inputs changed since the run in {owner.folder} started ({'; '.join(diffs)}): resuming "
                        "would mix them; pass --force (without --resume) to start over")


def given_options(preset: str | None, options: dict[str, Any]) -> frozenset[str]:
    """The configuration fields set on the command line (not None), ``preset`` included."""
    given = {k for k, v in options.items() if v is not None}
    if preset is not None:
        given.add("preset")
    return frozenset(given)


PREFETCH_BATCHES = 4
"""Batches each loader worker prepares ahead (DataLoader ``prefetch_factor``): uint8 batches are
small, and a GPU step can be shorter than a worker's slowest batch."""


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The generator that draws epoch ``epoch``'s shuffle and its loader workers' seeds."""
    return torch.Generator().manual_seed(seed * 100_003 + epoch)


class EpochSampler(torch.utils.data.Sampler):
    """Keys ``(epoch, index)`` of the patches of one epoch, in that epoch's order.

    The order depends only on ``seed`` and the epoch (:meth:`set_epoch`): a resumed run sees the
    batches an uninterrupted one would. Without DDP it is the permutation a shuffling DataLoader
    with :func:`epoch_generator` drew (after the one number it takes for its workers' seeds), so the
    batches are those of earlier wsss versions; under DDP, a DistributedSampler's share set to the
    epoch. The epoch travels with each index so that persistent workers know when to reseed
    (:class:`EpochSeeded`)."""

    def __init__(self, size: int, seed: int, dist: Distributed) -> None:
        from torch.utils.data.distributed import DistributedSampler

        self.size, self.seed, self.epoch = size, seed, 0
        self.shares = None
        if dist.enabled:
            self.shares = DistributedSampler(range(size), num_replicas=dist.world_size, rank=dist.rank, seed=seed,
                                             drop_last=True)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if self.shares is not None:
            self.shares.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.shares) if self.shares is not None else self.size

    def __iter__(self):
        if self.shares is not None:
            order = list(self.shares)
        else:
            generator = epoch_generator(self.seed, self.epoch)
            torch.empty((), dtype=torch.int64).random_(generator=generator)  # the workers' base seed came first
            order = torch.randperm(self.size, generator=generator).tolist()
        return iter([(self.epoch, i) for i in order])


class EpochSeeded(torch.utils.data.Dataset):
    """``dataset`` read by :class:`EpochSampler` keys. In a loader worker, the first key of a new
    epoch reseeds the worker's RNGs as a fresh worker of that epoch was seeded (the DataLoader's
    ``base_seed + worker_id``, then :func:`seed_worker`), so persistent workers draw the same
    augmentations as workers started anew every epoch, and a resumed run the same as an
    uninterrupted one. In the main process (no workers) the training loop's per-epoch reseeding
    of the global RNGs does that."""

    def __init__(self, dataset, seed: int) -> None:
        self.dataset, self.seed, self.epoch = dataset, seed, None

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        worker = torch.utils.data.get_worker_info()
        if worker is not None and epoch != self.epoch:
            generator = epoch_generator(self.seed, epoch)
            base = int(torch.empty((), dtype=torch.int64).random_(generator=generator).item())
            torch.manual_seed(base + worker.id)
            seed_worker(worker.id)
            self.epoch = epoch
        return self.dataset[index]


class EpochLoader:
    """The training batches of a whole run from one DataLoader: its workers (``workers`` > 0) start
    once, stay for every epoch (``persistent_workers``) and prepare :data:`PREFETCH_BATCHES` each
    ahead; :meth:`epoch` sets which epoch's order and augmentations the next pass gives."""

    def __init__(self, dataset, batch_size: int, workers: int, seed: int, dist: Distributed, drop_last: bool) -> None:
        from torch.utils.data import DataLoader

        self.sampler = EpochSampler(len(dataset), seed, dist)
        extra = {"persistent_workers": True, "prefetch_factor": PREFETCH_BATCHES} if workers > 0 else {}
        # The loader's own generator only seeds workers at their start; EpochSeeded reseeds them per epoch.
        self.loader = DataLoader(EpochSeeded(dataset, seed), batch_size=batch_size, sampler=self.sampler,
                                 num_workers=workers, worker_init_fn=seed_worker,
                                 generator=torch.Generator().manual_seed(seed), drop_last=drop_last,
                                 pin_memory=dist.device.type == "cuda", **extra)

    def __len__(self) -> int:
        return len(self.loader)

    def epoch(self, epoch: int):
        """The batches of ``epoch`` (iterate once)."""
        self.sampler.set_epoch(epoch)
        return self.loader

    def close(self) -> None:
        """Stop the workers (they would otherwise stay until the loader is garbage-collected)."""
        self.loader = None


def device_images(x: torch.Tensor, norm, device: torch.device,
                  layout: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """A batch of uint8 images (B, 3, H, W) from the loader → normalised float32 model input on
    ``device`` in ``layout`` (:func:`wsss.runtime.memory_format`): the loader's workers send a
    quarter of the bytes (mapped onto ``norm``'s stain target already), and the scaling runs where
    the model does (:func:`wsss.data.datasets.normalise`)."""
    from wsss.data.datasets import normalise

    x = normalise(x.to(device, non_blocking=True), norm)
    return x.contiguous(memory_format=layout)


def note_epochs(paths: RunPaths, done: int, epochs: int) -> None:
    """What an interruption now would keep, for the CLI's last line."""
    if done == 0:
        note_saved(f"no epoch finished yet in {paths.out} (continuing starts from the beginning)", True)
    else:
        note_saved(f"epoch {done} of {epochs} saved in {paths.last}", True)


def tensorboard_writer(log_dir: Path):
    """A tensorboardX writer (imported here: only training processes of rank 0 need it)."""
    from tensorboardX import SummaryWriter

    return SummaryWriter(str(log_dir))


def optimizer_step(loss: torch.Tensor, optimizer, scheduler, scaler) -> None:
    """One (scaled) optimizer step and one scheduler step. The loss is checked by :class:`StepLosses`."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()


CHECK_EVERY = 20
"""Steps between reading the losses back from the device: the finite-loss check, the progress bar
and tensorboard's per-step loss wait for the device (and, under DDP, for every process) this
often and at the end of an epoch, instead of at every step."""


class StepLosses:
    """The losses of an epoch's steps, kept on the device and read back every :data:`CHECK_EVERY`
    steps and at the epoch's end (:meth:`flush`): then a non-finite one stops the run, naming its
    step (every process of a DDP job stops at the same check instead of hanging), and each step's
    loss and learning rate go to tensorboard as before. A NaN's later steps until the check may run
    on NaN weights: the run stops before saving them, and the last finished epoch is kept."""

    def __init__(self, dist: Distributed, epoch: int, first_step: int, bar, writer, tag: str, optimizer) -> None:
        self.dist, self.epoch, self.first_step = dist, epoch, first_step
        self.bar, self.writer, self.tag, self.optimizer = bar, writer, tag, optimizer
        self.pending: list[tuple[int, torch.Tensor, float]] = []

    def add(self, step: int, loss: torch.Tensor) -> None:
        """Record step ``step``'s loss (after its optimizer step: the learning rate is the next step's, as logged before)."""
        self.pending.append((step, loss.detach(), self.optimizer.param_groups[0]["lr"]))
        if len(self.pending) >= CHECK_EVERY:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        values = torch.stack([loss.float() for _, loss, _ in self.pending]).tolist()  # the one wait
        bad = [0.0 if math.isfinite(v) else 1.0 for v in values]
        if self.dist.enabled:
            bad = self.dist.all_reduce_sum(bad)
        if any(bad):
            step = self.pending[[i for i, b in enumerate(bad) if b][0]][0]
            raise WsssError(
                f"loss is not finite at epoch {self.epoch + 1}, step {step + 1}; try a lower --lr "
                "(the last finished epoch is kept and can be resumed)"
            )
        if self.dist.is_main:
            self.bar.set_postfix(loss=f"{values[-1]:.4f}", refresh=False)
            if self.writer is not None:
                for (step, _, lr), value in zip(self.pending, values):
                    self.writer.add_scalar(self.tag, value, self.first_step + step)
                    self.writer.add_scalar("train/lr", lr, self.first_step + step)
        self.pending = []


# --------------------------------------------------------------------------- what a model's input is made of


@dataclass(frozen=True)
class InputPipeline:
    """How a run turns its training patches into model inputs: the model's input normalisation (with
    its stain target, recorded in every checkpoint) and the colour augmentation of training."""

    norm: Any  # wsss.data.datasets.InputNorm
    colour: Any  # wsss.data.augment.ColourAugment


def input_pipeline(cfg: Any, paths: list[Path], state: dict | None, fitted: Any = None) -> InputPipeline:
    """The input normalisation and colour augmentation of a training run (either stage).

    The stain target is the one a resumed run's checkpoint recorded, else ``fitted`` (what
    :func:`check_stain_target` fitted on ``--stain-target``), else fitted now on the training patches
    ``paths`` (each as the model sees it, at ``cfg.image_size``)."""
    from wsss.data import stain
    from wsss.data.augment import ColourAugment
    from wsss.data.datasets import get_input_norm

    target = None
    if cfg.stain_norm != "none":
        target = recorded_stain_target(cfg, state) or fitted
        if target is None and cfg.stain_target is not None:
            target = stain.fit_image(cfg.stain_norm, Path(cfg.stain_target), cfg.image_size)
        elif target is None:
            target = stain.fit_training_set(cfg.stain_norm, paths, cfg.image_size)
        if target.method == stain.SET_METHOD:
            # the training patches are a set like any other: shift zero, unless --stain-target
            target = target.for_set(stain.measure_paths(paths, cfg.image_size), "the training set")
    lab = stain.lab_statistics(paths, cfg.image_size) if cfg.lab_jitter > 0 else None
    colour = ColourAugment(cfg.hed_scale, cfg.hed_shift, cfg.lab_jitter, cfg.light_jitter, cfg.blur_jitter,
                           cfg.jpeg_jitter, lab)
    return InputPipeline(replace(get_input_norm(cfg.input_norm), stain=target), colour)


def recorded_stain_target(cfg: Any, state: dict | None) -> Any:
    """The stain target (of ``cfg.stain_norm``'s method) a resumed run's last checkpoint recorded; None
    for a new run."""
    if state is None or cfg.stain_norm == "none":
        return None
    from wsss.data.datasets import InputNorm

    try:
        recorded = InputNorm.from_dict(state.get("input_norm")).stain
    except WsssError as exc:
        raise WsssError(f"the run's last checkpoint: {exc}") from None
    return recorded if recorded is not None and recorded.method == cfg.stain_norm else None


def check_stain_target(cfg: Any, state: dict | None = None) -> Any:
    """``--stain-target`` fitted before a run claims its outputs, so that an image that is not RGB, is
    too small or is mostly glass ends in one line with nothing written; returned for
    :func:`input_pipeline` (fitted once). None without one, or when a resumed run recorded its target
    (the file is not read again: the run goes on with the target it started with)."""
    if cfg.stain_norm == "none" or cfg.stain_target is None or recorded_stain_target(cfg, state) is not None:
        return None
    from wsss.data import stain

    return stain.fit_image(cfg.stain_norm, Path(cfg.stain_target), cfg.image_size)


# --------------------------------------------------------------------------- the training skeleton
# What both training stages do around their own train_one_epoch (as torchvision's references share
# their utilities, not a trainer class).


def start_training(cfg, dist: Distributed):
    """The configuration a run computes with (its precision resolved: auto → bf16 or fp32 here),
    after seeding every process and quietening the logs of all but the main one."""
    if not dist.is_main:
        logging.getLogger("wsss").setLevel(logging.WARNING)
    cfg = replace(cfg, precision=resolve_precision(cfg.precision, dist.device))
    seed_everything(cfg.seed, dist.rank)
    return cfg


def check_batches(batches, patches: int, batch_size: int) -> int:
    """The steps of an epoch; none is a user error (too few patches for one batch)."""
    if len(batches) == 0:
        raise WsssError(f"{patches} training patches make no batch of {batch_size}")
    return len(batches)


def restore_training(state: dict | None, model: torch.nn.Module, optimizer, scheduler, scaler) -> int:
    """Load a saved run (model, optimizer, poly schedule, gradient scaler) into a freshly built one;
    returns the first epoch still to train (0 for a new run)."""
    if state is None:
        return 0
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if scaler.is_enabled() and not load_scaler_state(scaler, state.get("scaler")):
        log.info("the saved run did not use fp16: the gradient scaler starts afresh")
    return state["epoch"] + 1


def distributed(model: torch.nn.Module, dist: Distributed, sync_batchnorm: bool = False) -> torch.nn.Module:
    """The model a step trains: ``model`` itself, or under DDP its DistributedDataParallel wrapper
    (``sync_batchnorm``: BatchNorm synchronised across GPUs first, as the reference's stage 2)."""
    if not dist.enabled:
        return model
    if sync_batchnorm and dist.device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None
    )


def reseed_epoch(cfg, epoch: int, dist: Distributed) -> None:
    """Seed an epoch from the run's seed and its index, so that a resumed run draws the same dropout
    masks, flips and blurs as an uninterrupted one."""
    seed_everything(cfg.seed + 7919 * epoch, dist.rank)
