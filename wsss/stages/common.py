"""What the two training stages share: their output file names, resuming, the optimizer step, tensorboard logs."""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, ClassVar

import torch

from wsss import config as cfglib
from wsss.errors import WsssError
from wsss.ownership import Owner, differences
from wsss.runtime import Distributed, expect_stage, load_checkpoint, note_saved, seed_worker

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
    log.info("resuming %s after epoch %d of %d", paths.last, state["epoch"] + 1, cfg.epochs)
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
    unknown = {k: v for k, v in saved.items() if k not in known and v not in (None, False, 0, "", [], {})}
    if unknown:
        settings = ", ".join(f"{k.replace('_', '-')} {v}" for k, v in sorted(unknown.items()))
        raise WsssError(f"{paths.last} was saved with settings this version of wsss does not have ({settings}): "
                        "it cannot be continued as it was; pass --force (without --resume) to start over")


def _refuse_other_options(cfg: Any, saved: Any, paths: RunPaths, given: Collection[str]) -> None:
    """``--resume`` with options that change what the saved run computes is a contradiction."""
    changed = []
    for name in sorted(given):
        old, new = getattr(saved, name, None), getattr(cfg, name, None)
        if _plain(old) != _plain(new):
            changed.append(f"--{name.replace('_', '-')} {_plain(old)} → {_plain(new)}")
    if changed:
        raise WsssError(f"--resume continues the run saved in {paths.last} with its own settings, but these options "
                        f"differ from it: {', '.join(changed)}; drop them to continue, or pass --force (without "
                        "--resume) to start over with them")


def _plain(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return value


def check_same_inputs(owner: Owner, inputs: dict, names: Collection[str], resumed: bool) -> None:
    """A resumed run must read what the interrupted one read (``names``: the inputs that matter to the
    epochs still to run); otherwise its result would be no run's. Compared with the folder's record."""
    if not resumed or not owner.active:
        return
    previous = owner.previous_run()
    if previous is None:
        return  # a run of an older wsss: nothing recorded to compare with
    diffs = differences(previous.get("inputs") or {}, inputs, [n for n in names if n in (previous.get("inputs") or {})])
    if diffs:
        raise WsssError(f"the inputs changed since the run in {owner.folder} started ({'; '.join(diffs)}): resuming "
                        "would mix them; pass --force (without --resume) to start over")


def given_options(preset: str | None, options: dict[str, Any]) -> frozenset[str]:
    """The configuration fields set on the command line (not None), ``preset`` included."""
    given = {k for k, v in options.items() if v is not None}
    if preset is not None:
        given.add("preset")
    return frozenset(given)


def epoch_loader(dataset, batch_size: int, workers: int, seed: int, dist: Distributed, epoch: int,
                 drop_last: bool):
    """The training DataLoader of one epoch: shuffled by a generator seeded from ``seed`` and
    ``epoch`` (so a resumed run sees exactly the batches an uninterrupted one would), or, under DDP,
    by a DistributedSampler set to that epoch."""
    import torch
    from torch.utils.data import DataLoader
    from torch.utils.data.distributed import DistributedSampler

    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    sampler = None
    if dist.enabled:
        sampler = DistributedSampler(dataset, num_replicas=dist.world_size, rank=dist.rank, seed=seed, drop_last=True)
        sampler.set_epoch(epoch)
    return DataLoader(dataset, batch_size=batch_size, shuffle=sampler is None, sampler=sampler, num_workers=workers,
                      worker_init_fn=seed_worker, generator=generator, drop_last=drop_last,
                      pin_memory=dist.device.type == "cuda")


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


def optimizer_step(loss: torch.Tensor, optimizer, scheduler, scaler, dist: Distributed, epoch: int, step: int) -> None:
    """Stop on a non-finite loss, else one (scaled) optimizer step and one scheduler step."""
    _check_finite(loss, dist, epoch, step)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()


def log_step(bar, writer, tag: str, loss: float, optimizer, global_step: int) -> None:
    """The progress bar's loss, and the step's loss and learning rate for tensorboard."""
    bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
    if writer is not None:
        writer.add_scalar(tag, loss, global_step)
        writer.add_scalar("train/lr", optimizer.param_groups[0]["lr"], global_step)


def _check_finite(loss: torch.Tensor, dist: Distributed, epoch: int, step: int) -> None:
    """Stop on a NaN/inf loss; under DDP every process stops together instead of hanging."""
    bad = float(not torch.isfinite(loss).item())
    if dist.enabled:
        bad = dist.all_reduce_sum([bad])[0]
    if bad:
        raise WsssError(
            f"loss is not finite at epoch {epoch + 1}, step {step + 1}; try a lower --lr "
            "(the last finished epoch is kept and can be resumed)"
        )


# --------------------------------------------------------------------------- what a model's input is made of


@dataclass(frozen=True)
class InputPipeline:
    """How a run turns its training patches into model inputs: the model's input normalisation (with
    its stain target, recorded in every checkpoint) and the colour augmentation of training."""

    norm: Any  # wsss.data.datasets.InputNorm
    colour: Any  # wsss.data.augment.ColourAugment


def input_pipeline(cfg: Any, paths: list[Path], state: dict | None) -> InputPipeline:
    """The input normalisation and colour augmentation of a training run (either stage).

    The stain target is the one a resumed run's checkpoint recorded, else fitted now on ``--stain-target``
    or on the training patches ``paths`` (each as the model sees it, at ``cfg.image_size``)."""
    from wsss.data import stain
    from wsss.data.augment import ColourAugment
    from wsss.data.datasets import InputNorm, get_input_norm

    target = None
    if cfg.stain_norm != "none":
        recorded = InputNorm.from_dict(state.get("input_norm")).stain if state is not None else None
        if recorded is not None and recorded.method == cfg.stain_norm:
            target = recorded
        elif cfg.stain_target is not None:
            target = stain.fit_image(cfg.stain_norm, Path(cfg.stain_target), cfg.image_size)
        else:
            target = stain.fit_training_set(cfg.stain_norm, paths, cfg.image_size)
    lab = stain.lab_statistics(paths, cfg.image_size) if cfg.lab_jitter > 0 else None
    colour = ColourAugment(cfg.hed_scale, cfg.hed_shift, cfg.lab_jitter, cfg.light_jitter, cfg.blur_jitter,
                           cfg.jpeg_jitter, lab)
    return InputPipeline(replace(get_input_norm(cfg.input_norm), stain=target), colour)


def check_stain_target(cfg: Any) -> None:
    """Fit ``--stain-target`` once before a run claims its outputs, so that an image that is not RGB or
    is mostly glass ends in one line with nothing written."""
    if cfg.stain_norm != "none" and cfg.stain_target is not None:
        from wsss.data import stain

        stain.fit_image(cfg.stain_norm, Path(cfg.stain_target), cfg.image_size)
