"""Runtime helpers: atomic file writes, checkpoints, seeding, devices, numeric precision."""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import platform
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | Path, owned: bool = True) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it over ``path``.

    A crash or Ctrl-C leaves either the old file or the new one, never a half-written file. Under a
    folder a command owns (:func:`wsss.runs.owner.owned_folder`) the write must be allowed (``path``
    absent, written by wsss, or ``--force``) and is recorded in the folder's manifest (``owned=False``:
    scratch files a command keeps for itself, rewritten often, e.g. predict-wsi's progress). An OS
    error (disk full, no permission) becomes a :class:`WsssError` naming ``path``.
    """
    from wsss.errors import WsssError
    from wsss.runs.owner import owner_of

    path = Path(path)
    owner = owner_of(path) if owned else None
    if owner is not None:
        owner.may_write(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as exc:
        raise WsssError(f"cannot write {path}: {os_reason(exc)}") from None
    tmp = Path(tmp_name)
    try:
        yield tmp
        # mkstemp creates 0600; give the file the permissions a plain open() would.
        os.chmod(tmp, 0o666 & ~_umask())
        if owner is not None:
            owner.record(path, written=tmp)  # before the rename: a crash in between leaves the old file
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise WsssError(f"cannot write {path}: {os_reason(exc)}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def os_reason(exc: BaseException) -> str:
    """The cause of an OS error in words (``No space left on device``), without the errno prefix."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = str(exc).strip()
    return text.splitlines()[-1] if text else type(exc).__name__


# --------------------------------------------------------------------------- checkpoints

CHECKPOINT_FORMAT = 1

_corrupt = "the file is truncated or corrupt, or not a PyTorch checkpoint"


def save_checkpoint(path: str | Path, state: dict) -> None:
    """``torch.save`` through a temporary file, so an interruption never leaves half a file.

    torch reports a failed write (a full disk) as a RuntimeError of its zip writer; the OS error
    underneath is raised instead, so that it names the file and the cause."""
    import torch

    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            sink = _WriteErrors(f)
            try:
                torch.save(state, sink)
                f.flush()
                os.fsync(f.fileno())
            except RuntimeError:
                if sink.error is not None:
                    raise sink.error from None
                raise


class _WriteErrors:
    """A file-like ``write`` target that keeps the OSError of a failed write, which torch turns into
    a RuntimeError of its own (``unexpected pos``). A short write (the disk filled up in the middle)
    is retried for the rest, so that the OS says why it fails."""

    def __init__(self, f) -> None:
        self.f = f
        self.error: OSError | None = None

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        done = 0
        try:
            while done < len(view):
                n = self.f.write(view[done:])
                if not n:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                done += n
        except OSError as exc:
            self.error = exc
            raise
        return done

    def flush(self) -> None:
        self.f.flush()


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
    except pickle.UnpicklingError as exc:
        # weights_only refused an object that is not a tensor or a plain value. torch's message goes
        # on to explain how to run the file's code anyway; that is never our advice.
        if "weights only" in str(exc).lower() or "weights_only" in str(exc):
            raise WsssError(f"cannot load checkpoint {path}: it holds Python objects other than tensors and plain "
                            "values (e.g. a whole pickled model); wsss reads weights only and never runs code from "
                            "a checkpoint file: save the model's state_dict instead") from None
        raise WsssError(f"cannot load checkpoint {path}: {_corrupt}") from None
    except (RuntimeError, EOFError, ValueError, KeyError, IndexError, AttributeError, UnicodeDecodeError):
        raise WsssError(f"cannot load checkpoint {path}: {_corrupt}") from None
    except OSError as exc:
        raise WsssError(f"cannot read checkpoint {path}: {os_reason(exc)}") from None
    if not isinstance(obj, dict):
        raise WsssError(f"{path} holds a {type(obj).__name__}, not a checkpoint dict")
    return obj


# --------------------------------------------------------------------------- what an interruption keeps

_SAVED: dict[str, object] = {}


_WARNED: set[str] = set()


def warn_once(logger: logging.Logger, message: str) -> None:
    """``message`` as a warning of ``logger``, the first time this process says it: a run opens one
    slide several times (the finished check, the lock, the segmentation)."""
    if message not in _WARNED:
        _WARNED.add(message)
        logger.warning("%s", message)


def note_saved(what: str, resume_flag: bool = False) -> None:
    """Say what is on disk so far and whether continuing needs ``--resume`` (else: the same command
    again). The CLI prints it when the run is interrupted (Ctrl-C, SIGTERM)."""
    _SAVED.update(what=what, resume_flag=resume_flag)


def continue_with_same_command() -> None:
    """From now on in this process, the same command continues (``wsss reproduce`` runs the stages,
    whose own notes would ask for ``--resume``)."""
    _SAVED["same_command"] = True


def saved_note() -> tuple[str, bool] | None:
    """The last :func:`note_saved` of this process: ``(what, needs --resume)``, or None."""
    if "what" not in _SAVED:
        return None
    return str(_SAVED["what"]), bool(_SAVED["resume_flag"]) and not _SAVED.get("same_command")


def clear_saved_note() -> None:
    _SAVED.clear()


def is_main_process() -> bool:
    """Rank 0 of a ``torchrun`` job, or a plain process: the one that writes outputs."""
    return int(os.environ.get("RANK", "0")) == 0


# --------------------------------------------------------------------------- devices, seeds, DDP


def resolve_device(name: str, local_rank: int = 0):
    """``auto`` → CUDA when available else CPU; ``cuda`` without a GPU is a user error. A CUDA device
    gets the process-wide settings of :func:`configure_device`."""
    import torch

    from wsss.errors import WsssError

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise WsssError("--device cuda was asked for, but no CUDA GPU is available")
        device = torch.device("cuda", local_rank) if name == "cuda" else torch.device(name)
        configure_device(device)
        return device
    if name != "cpu":
        raise WsssError(f"unknown device {name!r}; use auto, cpu or cuda")
    return torch.device("cpu")


def configure_device(device) -> None:
    """Process-wide settings that make a CUDA device fast: cuDNN picks the fastest convolution for
    each input shape (fixed patch sizes: measured once), and float32 matrix products and
    convolutions use TF32 tensor cores (a 10-bit mantissa on products, float32 sums). Nothing
    changes on the CPU."""
    import torch

    if device.type != "cuda":
        return
    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.allow_tf32 = True
    torch.set_float32_matmul_precision("high")


def memory_format(device, precision: str = "fp32"):
    """The layout of models and images on ``device`` in ``precision`` (resolved):
    ``torch.channels_last`` on CUDA (what cuDNN's tensor-core convolutions read without a
    transpose) and for bf16 on the CPU (oneDNN's bf16 convolutions want NHWC and reorder NCHW
    inputs at every layer: bench/precision.py), else ``torch.contiguous_format``, so that fp32 on
    the CPU computes exactly as before. ResNet38's training step on the CPU is the exception
    (:func:`wsss.stages.stage1.training_format`)."""
    import torch

    if device.type == "cuda" or (device.type == "cpu" and precision == "bf16"):
        return torch.channels_last
    return torch.contiguous_format


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, as ``taskset`` or a container's cpuset
    sets it), not all the machine's: ``os.cpu_count()`` counts every CPU of the host."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # no sched_getaffinity (macOS, Windows)
        return max(1, os.cpu_count() or 1)


# --------------------------------------------------------------------------- numeric precision

PRECISIONS = ("fp32", "bf16", "fp16", "auto")
"""``--precision`` values. ``auto``: bf16 where the hardware has it (CUDA GPUs of compute capability
8 and later, CPUs with AVX512-BF16 or AMX), else fp32. ``amp`` is accepted too, as the old
``--amp``: fp16 on CUDA, bf16 on the CPU."""


def check_precision(precision: str) -> str:
    """``precision`` if it is a ``--precision`` value (or ``amp``); otherwise a user error."""
    from wsss.errors import WsssError

    if precision not in (*PRECISIONS, "amp"):
        raise WsssError(f"--precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    return precision


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bfloat16 products natively (AVX512-BF16 or AMX on x86, the BF16
    extension on Arm): there bf16 matrix products run several times faster than fp32; elsewhere
    oneDNN emulates them, slower than fp32 (2.5x slower for a 3x3 convolution's step on AVX-512
    without BF16, 15x on AVX2).

    torch's own check (oneDNN's) says yes on every AVX-512 CPU, emulation included, so on x86 the
    CPU's flags decide, and torch's check must agree too (it says no when ``ONEDNN_MAX_CPU_ISA``
    caps oneDNN below bf16)."""
    torch_says = _onednn_bf16()
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return torch_says
    flags = _x86_cpu_flags()
    return torch_says and ("avx512_bf16" in flags or "amx_bf16" in flags)


def _onednn_bf16() -> bool:
    """oneDNN's answer (torch's ``_is_mkldnn_bf16_supported``): bf16 kernels exist, native or emulated."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _x86_cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux lists them (none where /proc/cpuinfo cannot be read)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def resolve_precision(precision: str, device) -> str:
    """The precision a run on ``device`` computes in: ``fp32``, ``bf16`` or ``fp16``.

    ``auto``: bf16 on a CUDA GPU that supports it and on a CPU that has it natively, else fp32.
    ``amp`` (the old ``--amp``): fp16 on CUDA, bf16 on the CPU."""
    import torch

    check_precision(precision)
    if precision in ("amp", "bf16") and device.type == "cpu" and not cpu_has_bf16():
        _warn_emulated_bf16()
    if precision == "amp":
        return "fp16" if device.type == "cuda" else "bf16"
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp32"
    return "bf16" if device.type == "cpu" and cpu_has_bf16() else "fp32"


@functools.cache
def _warn_emulated_bf16() -> None:
    log.warning("warning: this CPU has no native bf16 (AVX512-BF16 or AMX): bf16 is emulated and runs slower "
                "than fp32, up to 15x; --precision auto picks fp32 here")


def autocast(device, precision: str):
    """The autocast context of a resolved ``precision`` on ``device``; fp32: a no-op context.

    Inside it, convolutions and matrix products run in bf16/fp16 while autocast keeps reductions,
    softmax and losses in float32; callers still cast model outputs with ``.float()`` before a loss,
    a softmax or a normalisation."""
    import torch

    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if dtype is None:
        raise ValueError(f"autocast needs a resolved precision (fp32, bf16, fp16), not {precision!r}")
    return torch.autocast(device.type, dtype=dtype)


def full_precision(t):
    """``t`` as float32 when autocast made it bf16/fp16; float32 and float64 tensors as they are."""
    import torch

    return t.float() if t.dtype in (torch.bfloat16, torch.float16) else t


def grad_scaler(device, precision: str):
    """A gradient scaler, enabled for fp16 only (its 5-bit exponent underflows small gradients);
    bf16 has float32's exponent range and needs none."""
    import torch

    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def load_scaler_state(scaler, state: dict | None) -> bool:
    """Restore a saved scaler state into ``scaler``; True when it was restored.

    A run saved without fp16 (fp32, bf16, or the old ``--amp`` off) saved a disabled scaler's state,
    which is empty, and ``GradScaler.load_state_dict`` refuses an empty state; resuming such a run
    in fp16 starts from a fresh scaler (scale 65536, grown or shrunk within the first steps). A
    resumed run that no longer uses fp16 drops the saved scale."""
    if not scaler.is_enabled() or not state:
        return False
    scaler.load_state_dict(state)
    return True


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


def progress_bar(iterable, main: bool = True, **kw):
    """A tqdm bar over ``iterable``, shown by the main process only: redrawn every 0.5 s on a
    terminal, every 15 s when stderr is a log file."""
    from tqdm import tqdm

    return tqdm(iterable, disable=not main, mininterval=0.5 if sys.stderr.isatty() else 15, **kw)
