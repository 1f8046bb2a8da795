"""Lock files: one process at a time works on a slide (or merges the cohort tables), across the
ranks and shard jobs that write into one output folder, on one host or several sharing a file system.

A lock is a small JSON file (host, pid, the process's start time, who took it and when), created
whole with ``os.link`` of a finished temporary file: the link fails if the lock exists, and it is
atomic on local file systems and NFS alike, so two processes can never both hold it and nobody
reads a half-written lock. ``O_EXCL`` would be atomic too, but leaves an empty file between create
and write.

A lock left by a process that died (SIGKILL, out of memory, a node rebooted) is stale. On the same
host this is checked: the pid no longer runs, or runs with another start time (the pid was reused).
Breaking a stale lock is itself guarded by a second lock file (``<lock>.break``), so that two
processes finding the same stale lock cannot both take the slide. A lock held by a process on
another host cannot be checked from here: the slide is left alone, and the message says which host
and process hold it and which file to delete when that job is known to be gone.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

HOST = socket.gethostname()


def process_start(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot, Linux ``/proc``); None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    try:  # the command name (field 2) may hold spaces and parentheses: split after its last ")"
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (IndexError, ValueError):
        return None


def pid_running(pid: int, start: int | None) -> bool:
    """Whether process ``pid`` (started at ``start`` when known) still runs on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by another user
        pass
    if start is not None:
        now = process_start(pid)
        if now is not None and now != start:
            return False  # the pid was reused by another process
    return True


def owner_record(**extra) -> dict:
    """Who takes a lock: this host and process, and anything else worth saying (shard, rank)."""
    return {"host": HOST, "pid": os.getpid(), "start": process_start(os.getpid()),
            "since": time.strftime("%Y-%m-%d %H:%M:%S"), **extra}


def describe(owner: dict) -> str:
    who = f"pid {owner.get('pid')} on {owner.get('host')}"
    return f"{who} since {owner['since']}" if owner.get("since") else who


@dataclass
class Lock:
    """A lock held by this process; :meth:`release` (or leaving the ``with`` block) removes it."""

    path: Path
    owner: dict

    def release(self) -> None:
        try:
            if json.loads(self.path.read_text(encoding="utf-8")) == self.owner:
                self.path.unlink()
        except (OSError, ValueError):
            pass

    def __enter__(self) -> Lock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class LockHeld(Exception):
    """The lock is held by another process (its message says by whom and what to do)."""


def _read(path: Path) -> dict | None:
    try:
        owner = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # unreadable: treated as held by someone unknown
    return owner if isinstance(owner, dict) else {}


def _create(path: Path, owner: dict) -> bool:
    """Create ``path`` holding ``owner`` if it does not exist; False if it does."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{HOST}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(owner), encoding="utf-8")
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)


def is_stale(owner: dict) -> bool:
    """A lock of a process on this host that no longer runs."""
    return (owner.get("host") == HOST and isinstance(owner.get("pid"), int)
            and not pid_running(owner["pid"], owner.get("start")))


def _break_stale(path: Path, stale: dict, me: dict) -> None:
    """Remove ``path`` if it still holds ``stale``, guarded by ``<path>.break``."""
    guard = path.with_name(path.name + ".break")
    if not _create(guard, me):
        holder = _read(guard)
        if holder is None or not is_stale(holder):
            return  # someone else is breaking it right now
        guard.unlink(missing_ok=True)  # a breaker that died within these few lines
        if not _create(guard, me):
            return
    try:
        if _read(path) == stale:
            path.unlink(missing_ok=True)
    finally:
        guard.unlink(missing_ok=True)


def acquire(path: Path, what: str, wait: float = 0.0, **extra) -> Lock:
    """Take the lock at ``path`` for this process, breaking it when it is stale; raise
    :class:`LockHeld` when another live (or uncheckable) process holds it, after waiting up to
    ``wait`` seconds for it to be released. ``what`` names the locked thing in the message."""
    me = owner_record(**extra)
    deadline = time.monotonic() + wait
    while True:
        if _create(path, me):
            return Lock(path, me)
        owner = _read(path)
        if owner is None:
            continue  # released meanwhile
        if is_stale(owner):
            _break_stale(path, owner, me)
            continue
        if time.monotonic() < deadline:
            time.sleep(0.1)
            continue
        if owner.get("host") not in (None, HOST):
            raise LockHeld(f"{what} is locked by {describe(owner)}, another host: whether that process still "
                           f"runs cannot be checked from {HOST}; if it is gone, delete {path}")
        raise LockHeld(f"{what} is being processed by {describe(owner)} (lock {path})")
