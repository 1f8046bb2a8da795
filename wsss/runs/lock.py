"""Lock files: one process at a time holds an output folder, a part of one (a slide of
``predict-wsi``), or the merge of a cohort's tables, across processes on one host or on several
sharing a file system.

A lock is a small JSON file (host, pid, boot id, the process's start time, the command that took it
and when), created whole with ``os.link`` of a finished temporary file: the link fails if the lock
exists, it is atomic on local file systems and NFS alike, and nobody ever reads a half-written lock
(``O_EXCL`` would be atomic on a local disk too, but leaves an empty file between create and write).

A lock left by a process that died (SIGKILL, out of memory, a power cut) is stale. On the same host
this is checked: the machine restarted since (another boot id), the pid no longer runs, or runs with
another start time (the pid was reused). A stale lock is taken over with a warning naming it;
breaking it is guarded by a second lock file (``<lock>.break``), so that two processes finding the
same stale lock cannot both take it. A lock held on another host is never guessed about: the message
names the host, the process and the file to delete once that run is known to be gone.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from wsss.errors import WsssError

log = logging.getLogger(__name__)

HOST = socket.gethostname()
SPINS = 200  # attempts at a lock that keeps vanishing or being broken by others before giving up


class LockHeld(WsssError):
    """The lock is held by another process (the message says by whom and what to do)."""


# --------------------------------------------------------------------------- process identity


def boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def process_start(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot, Linux ``/proc``); None where unknown.

    Together with the boot id this tells a live process from a later one that got the same pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    try:  # the command name (field 2) may hold spaces and parentheses: fields start after its last ")"
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (IndexError, ValueError):
        return None


def pid_running(pid: int, start: int | None) -> bool:
    """Whether process ``pid`` (started at ``start`` when known) still runs on this host."""
    try:
        # signal 0 only asks whether the process exists; PermissionError: it does, owned by another user
        with contextlib.suppress(PermissionError):
            os.kill(pid, 0)
    except ProcessLookupError:
        return False
    if start is not None:
        now = process_start(pid)
        if now is not None and now != start:
            return False  # the pid was reused by a later process
    return True


def identity(**extra) -> dict:
    """Who takes a lock: this host and process, when, and anything else worth saying (the command)."""
    pid = os.getpid()
    return {"pid": pid, "host": HOST, "boot": boot_id(), "proc_start": process_start(pid),
            "since": time.strftime("%Y-%m-%d %H:%M:%S"), **extra}


def alive(holder: Mapping) -> bool | None:
    """Whether the process that wrote ``holder`` (a lock's content) still runs: True, False, or None
    when this machine cannot know (another host, or a lock that names no host)."""
    if not holder or holder.get("host") != HOST:
        return None
    boot = boot_id()
    if holder.get("boot") and boot and holder["boot"] != boot:
        return False  # the machine restarted since
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    return pid_running(pid, holder.get("proc_start"))


def describe(holder: Mapping) -> str:
    """``wsss predict-wsi`` (pid 12 on node-3, since 2026-01-01 10:00:00), or the part in
    parentheses alone for a lock that names no command."""
    who = f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}"
    if holder.get("since"):
        who += f", since {holder['since']}"
    return f"`wsss {holder['command']}` ({who})" if holder.get("command") else who


# --------------------------------------------------------------------------- lock files


@dataclass
class Lock:
    """A lock held by this process; :meth:`release` (or leaving the ``with`` block) removes it,
    unless another process has taken it over meanwhile (ours was judged stale)."""

    path: Path
    holder: dict

    def release(self) -> None:
        if read_holder(self.path, retries=0) == self.holder:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> Lock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def read_holder(path: Path, retries: int = 20) -> dict | None:
    """A lock file's content; None when there is none, ``{}`` when it cannot be read as a lock. A lock
    written by ``O_EXCL`` (the fallback of :func:`_create`) may read empty for a moment: retried."""
    for attempt in range(retries + 1):
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError):
            return {}
        try:
            holder = json.loads(text)
            if isinstance(holder, dict):
                return holder
        except ValueError:
            pass
        if attempt < retries:
            time.sleep(0.05)
    return {}


_NO_LINKS = (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS)


def _create(path: Path, holder: Mapping) -> bool:
    """Create ``path`` holding ``holder`` if it does not exist; False if it does. An OS error (a full
    disk, no permission) is a :class:`WsssError` naming the lock."""
    content = json.dumps(holder).encode()
    tmp = path.with_name(f".{path.name}.{HOST}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(content)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        except OSError as exc:
            if exc.errno not in _NO_LINKS:
                raise
            return _create_exclusive(path, content)  # a file system without hard links
        return True
    except OSError as exc:
        raise WsssError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        tmp.unlink(missing_ok=True)


def _create_exclusive(path: Path, content: bytes) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    try:
        if os.write(fd, content) != len(content):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    except OSError:
        path.unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)
    return True


def _break_stale(path: Path, stale: Mapping, me: Mapping) -> bool:
    """Remove ``path`` if it still holds ``stale``, guarded by ``<path>.break``; True if removed here."""
    guard = path.with_name(path.name + ".break")
    if not _create(guard, me):
        holder = read_holder(guard)
        if holder is None or alive(holder) is not False:
            return False  # someone else is breaking it right now
        guard.unlink(missing_ok=True)  # a breaker that died within these few lines
        if not _create(guard, me):
            return False
    try:
        if read_holder(path) == stale:
            path.unlink(missing_ok=True)
            return True
        return False
    finally:
        guard.unlink(missing_ok=True)


def acquire(path: Path, what: str, *, wait: float = 0.0, advice: str = "", **extra) -> Lock:
    """Take the lock at ``path`` for this process, taking over a stale one (with a warning); raise
    :class:`LockHeld` when another live (or uncheckable) process holds it, after waiting up to
    ``wait`` seconds for it to be released. ``what`` names the locked thing in the messages,
    ``advice`` ends the message of a lock held by a live process; ``extra`` goes into the lock."""
    path = Path(path)
    me = identity(**extra)
    deadline = time.monotonic() + wait
    spins = 0
    while spins < SPINS:
        if _create(path, me):
            return Lock(path, me)
        holder = read_holder(path)
        if holder is None:
            spins += 1
            continue  # released meanwhile
        state = alive(holder)
        if state is False:
            spins += 1
            if _break_stale(path, holder, me):
                log.warning("warning: %s was left by %s, which is no longer running (killed?); taking it over",
                            path, describe(holder))
            else:
                time.sleep(0.02)
            continue
        if time.monotonic() < deadline:
            time.sleep(0.1)
            continue
        raise LockHeld(held_message(path, what, holder, state, advice))
    raise LockHeld(f"{what} keeps being locked and unlocked by other runs ({path}); try again")


def held_message(path: Path, what: str, holder: Mapping, state: bool | None, advice: str = "") -> str:
    """Why ``what`` cannot be had: held by a live process, or by one this machine cannot check."""
    if state:
        return f"{what} is in use by {describe(holder)}: wait for it to finish{advice} (lock {path})"
    if holder.get("host"):
        return (f"{what} is locked by {describe(holder)}, another host: whether that process still runs cannot "
                f"be checked from {HOST}; if it is gone, delete {path}")
    return (f"{what} is locked by {path}, which names no process this machine can check; if no run is going on, "
            "delete it")


__all__ = ["HOST", "Lock", "LockHeld", "acquire", "alive", "describe", "held_message", "identity", "process_start",
           "read_holder"]
