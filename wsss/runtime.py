"""Runtime helpers: atomic file writes, checkpoints, seeding, devices."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it over ``path``.

    A crash or Ctrl-C leaves either the old file or the new one, never a half-written file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        # mkstemp creates 0600; give the file the permissions a plain open() would.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------- checkpoints

CHECKPOINT_FORMAT = 1


def save_checkpoint(path: str | Path, state: dict) -> None:
    """``torch.save`` through a temporary file, so an interruption never leaves half a file."""
    import torch

    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint onto the CPU with ``weights_only=True`` (no code runs from the file)."""
    import pickle

    import torch

    from wsss.errors import WsssError

    path = Path(path)
    if not path.is_file():
        raise WsssError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise WsssError(f"cannot load checkpoint {path}: {first}") from None
    if not isinstance(obj, dict):
        raise WsssError(f"{path} holds a {type(obj).__name__}, not a checkpoint dict")
    return obj


def expect_stage(ckpt: dict, path: str | Path, stage: int, spec=None) -> None:
    """Refuse a checkpoint of another stage, class count or dataset spec with one clear message.

    ``spec`` is a :class:`wsss.data.specs.DatasetSpec` (the checkpoint's recorded spec must be the
    same), a class count, or None (no check).
    """
    from wsss.data.specs import DatasetSpec, check_same_spec, recorded_spec
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


# --------------------------------------------------------------------------- devices, seeds, DDP


def resolve_device(name: str, local_rank: int = 0):
    """``auto`` → CUDA when available else CPU; ``cuda`` without a GPU is a user error."""
    import torch

    from wsss.errors import WsssError

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise WsssError("--device cuda was asked for, but no CUDA GPU is available")
        return torch.device("cuda", local_rank) if name == "cuda" else torch.device(name)
    if name != "cpu":
        raise WsssError(f"unknown device {name!r}; use auto, cpu or cuda")
    return torch.device("cpu")


def seed_everything(seed: int, rank: int = 0) -> None:
    """Seed Python, NumPy and torch; each process gets ``seed + rank`` so ranks differ."""
    import random

    import numpy as np
    import torch

    random.seed(seed + rank)
    np.random.seed((seed + rank) % 2**32)
    torch.manual_seed(seed + rank)


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: derive NumPy/random seeds from torch's per-worker seed."""
    import random

    import numpy as np
    import torch

    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


class Distributed:
    """The process's place in a ``torchrun`` job (a single process when not under torchrun)."""

    def __init__(self, device_name: str = "auto") -> None:
        import torch
        import torch.distributed as dist

        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = resolve_device(device_name, self.local_rank)
        if self.enabled and not dist.is_initialized():
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            dist.init_process_group(backend="nccl" if self.device.type == "cuda" else "gloo")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        import torch.distributed as dist

        if self.enabled:
            dist.barrier()

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        """Sum a few numbers over all processes (used for epoch statistics)."""
        import torch
        import torch.distributed as dist

        if not self.enabled:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def close(self) -> None:
        import torch.distributed as dist

        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()
