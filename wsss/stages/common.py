"""What the two training stages share: their output file names, resuming, tensorboard logs."""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

from wsss import config as cfglib
from wsss.errors import WsssError
from wsss.runtime import Distributed, expect_stage, load_checkpoint, seed_worker

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


def resume_state(cfg: Any, paths: RunPaths, runtime_fields: Collection[str], resume: bool, force: bool,
                 read: Callable[[Path], dict] = load_checkpoint) -> tuple[Any, dict | None]:
    """The configuration to run with and the saved state to continue from (or None).

    Resuming keeps what the saved run computes (its configuration) and takes how it runs
    (``runtime_fields``: device, workers, ...) from this invocation. Without ``resume`` an earlier
    run in the folder is an error unless ``force``.
    """
    stage = paths.STAGE
    if not resume:
        if paths.last.exists() and not force:
            raise WsssError(f"{paths.last} holds an earlier stage-{stage} run; pass --resume to continue it "
                            "or --force to start over")
        return cfg, None
    if not paths.last.exists():
        log.info("no earlier run in %s: starting from scratch", paths.out)
        return cfg, None
    state = read(paths.last)
    expect_stage(state, paths.last, stage)
    saved = cfglib.from_dict(type(cfg), state["config"])
    cfg = replace(saved, **{k: getattr(cfg, k) for k in runtime_fields})
    log.info("resuming %s after epoch %d of %d", paths.last, state["epoch"] + 1, cfg.epochs)
    return cfg, state


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


def tensorboard_writer(log_dir: Path):
    """A tensorboardX writer (imported here: only training processes of rank 0 need it)."""
    from tensorboardX import SummaryWriter

    return SummaryWriter(str(log_dir))
