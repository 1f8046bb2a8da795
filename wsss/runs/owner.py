"""Output ownership: every command that writes a folder locks it for the run and records what it wrote.

Two files in an output folder ``OUT``::

    OUT/.wsss-lock            the run holding the folder: pid, host, boot id, process start, command
    OUT/.wsss-lock.<scope>    ... or a part of it (``predict-wsi``: one lock per slide, so that runs
                              on other slides can share the folder)
    OUT/.wsss-manifest.jsonl  an append-only log, one JSON object a line:
        {"run": id, "key", "command", "config", "inputs", "pid", "host", "started"}   a run began
        {"file": "sub/name", "run": id, "size", "mtime_ns", "meta"?}                  a file it wrote
        {"end": id, "status": "finished" | "interrupted" | "failed"}                   it ended

The rules (README, "Where files go"):

* **One run at a time.** The lock file (:mod:`wsss.runs.lock`) is created whole and exclusively. A
  second run is refused with one line naming the holder. A lock whose process no longer exists on
  this machine (killed, power cut) is taken over with a warning that says so; a lock taken on
  another host is never guessed about: the message says which file to delete. A whole-folder lock
  and the per-part locks of the same folder exclude each other.
* **Never replace a file wsss did not write.** A file counts as written by wsss when the manifest
  records its path with its current size and modification time; anything else (downloaded weights,
  the user's own masks, a file edited since) is only replaced with ``--force``. Commands claim all
  the outputs they know of before computing anything (:meth:`Owner.claim`), and every atomic write
  under an owned folder (:func:`wsss.runtime.atomic_path`) is checked and recorded again.
* A file's record is appended *before* it is renamed into place, so a run killed between the two
  leaves a record of a file that is still the old one; a path may have several records, and a file
  matching any of them is ours.
* Records carry the run's configuration and input hashes (checkpoints: sha256; datasets: a hash of
  file names and sizes), which resuming and skipping compare (:meth:`Owner.previous_run`).

Nothing here knows about stages; the stages say what they write and what they depend on.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wsss.runs import lock as locks
from wsss.errors import Interrupted, WsssError

log = logging.getLogger(__name__)

LOCK_NAME = ".wsss-lock"
MANIFEST_NAME = ".wsss-manifest.jsonl"
FORMAT = 1


# --------------------------------------------------------------------------- hashing


_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, streamed (cached per path, size and modification time)."""
    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        _SHA_CACHE[key] = digest.hexdigest()
    return _SHA_CACHE[key]


def listing_hash(files: Iterable[Path], root: Path | None = None, times: bool = False) -> str:
    """A hash of file names (relative to ``root``) and sizes: cheap, and unchanged when a dataset is
    moved or copied, changed when a file is added, removed, renamed or rewritten with another size.
    ``times``: modification times too (for files rewritten in place, such as pseudo-masks)."""
    digest = hashlib.sha256()
    for p in sorted(Path(f) for f in files):
        name = str(p.relative_to(root)) if root is not None else p.name
        st = p.stat()
        digest.update(f"{name}\0{st.st_size}{f' {st.st_mtime_ns}' if times else ''}\n".encode())
    return digest.hexdigest()


def short(digest: str | None) -> str:
    return "none" if not digest else digest[:12]


# --------------------------------------------------------------------------- the manifest


@dataclass
class Manifest:
    """What a folder's manifest says: runs in order, and every record of every file."""

    runs: list[dict] = field(default_factory=list)
    ends: dict[str, str] = field(default_factory=dict)
    files: dict[str, list[dict]] = field(default_factory=dict)

    @classmethod
    def read(cls, folder: Path) -> "Manifest":
        manifest = cls()
        path = Path(folder) / MANIFEST_NAME
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return manifest
        except OSError as exc:
            raise WsssError(f"cannot read {path}: {exc.strerror or exc}") from None
        for line in text.splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue  # a line cut short by a crash
            if not isinstance(entry, dict):
                continue
            manifest.add(entry)
        return manifest

    def add(self, entry: dict) -> None:
        if "file" in entry:
            self.files.setdefault(entry["file"], []).append(entry)
        elif "run" in entry:
            self.runs.append(entry)
        elif "end" in entry:
            self.ends[entry["end"]] = entry.get("status", "")

    def record_of(self, rel: str, size: int, mtime_ns: int) -> dict | None:
        """The newest record of ``rel`` that matches a file of this size and time, or None."""
        for entry in reversed(self.files.get(rel, ())):
            if entry.get("size") == size and entry.get("mtime_ns") == mtime_ns:
                return entry
        return None

    def last_run(self, key: str, before: str | None = None) -> dict | None:
        """The newest run record of ``key`` (older than run ``before`` when given)."""
        runs = self.runs
        if before is not None:
            ids = [r.get("run") for r in runs]
            runs = runs[: ids.index(before)] if before in ids else runs
        for run in reversed(runs):
            if run.get("key") == key:
                return run
        return None


def manifest_record(manifest: Manifest, folder: Path, path: Path) -> dict | None:
    try:
        st = path.stat()
        rel = path.resolve().relative_to(folder.resolve()).as_posix()
    except (OSError, ValueError):
        return None
    return manifest.record_of(rel, st.st_size, st.st_mtime_ns)


# --------------------------------------------------------------------------- locks


@dataclass
class _Held:
    lock: locks.Lock
    count: int = 1


_LOCKS: dict[Path, _Held] = {}  # held by this process, by lock file; re-entered by nested commands


def _lock_path(folder: Path, scope: str | None) -> Path:
    return folder / (LOCK_NAME if scope is None else f"{LOCK_NAME}.{_safe(scope)}")


def _safe(scope: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in scope)


def _acquire(folder: Path, scope: str | None, command: str, option: str) -> _Held:
    path = _lock_path(folder, scope)
    held = _LOCKS.get(path)
    if held is not None:
        held.count += 1
        return held
    what = str(folder) if scope is None else f"{folder} ({scope})"
    advice = f", or choose another {option}"
    held = _Held(locks.acquire(path, what, advice=advice, command=command, scope=scope))
    _LOCKS[path] = held
    try:
        _check_other_scopes(folder, scope, what, advice)
    except BaseException:
        _release(held)
        raise
    return held


def _check_other_scopes(folder: Path, scope: str | None, what: str, advice: str) -> None:
    """A whole-folder lock excludes the per-part locks of the same folder, and the other way round."""
    others = [folder / LOCK_NAME] if scope is not None else sorted(folder.glob(f"{LOCK_NAME}.*"))
    for other in others:
        if other.name.endswith(".break"):
            continue  # the guard of a stale lock being broken, not a lock
        holder = locks.read_holder(other)
        if holder is None:
            continue
        state = locks.alive(holder)
        if state is not False:
            raise locks.LockHeld(locks.held_message(other, what, holder, state, advice))


def _release(held: _Held) -> None:
    held.count -= 1
    if held.count > 0:
        return
    _LOCKS.pop(held.lock.path, None)
    held.lock.release()


# --------------------------------------------------------------------------- owners


_OWNERS: dict[Path, list["Owner"]] = {}  # owned folders (resolved) → owners, innermost command last
_MANIFESTS: dict[Path, Manifest] = {}  # the manifest of each owned folder as read and appended by this process


class Owner:
    """A command's hold on an output folder: what it may write, what it wrote, what ran there before.

    Made by :func:`owned_folder`; paths are files under :attr:`folder` (subfolders included).
    """

    def __init__(self, folder: Path, key: str, command: str, force: bool, option: str,
                 manifest: Manifest | None = None) -> None:
        self.folder = folder
        self.key = key
        self.command = command
        self.force = force
        self.option = option
        self.active = manifest is not None
        self.run_id = f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}-{id(self) & 0xFFFF:04x}"
        # Shared by the nested commands of one process on the same folder (reproduce → train-stage1).
        self.manifest = manifest if manifest is not None else Manifest()
        self._meta: dict[str, dict] = {}
        self.begun = False
        self._begun_blank = False

    # ------------------------------------------------------------------ questions

    def _rel(self, path: Path) -> str:
        return Path(path).resolve().relative_to(self.folder.resolve()).as_posix()

    def record_of(self, path: Path) -> dict | None:
        """The record of ``path`` if wsss wrote it as it is now, else None."""
        return manifest_record(self.manifest, self.folder, Path(path))

    def ours(self, path: Path) -> bool:
        return self.record_of(path) is not None

    def previous_run(self) -> dict | None:
        """The newest earlier run of this command (same key) in the folder, or None."""
        return self.manifest.last_run(self.key, before=self.run_id)

    def foreign(self, paths: Iterable[Path]) -> list[Path]:
        """Those of ``paths`` that exist and were not written by wsss (as they are now)."""
        out = []
        for p in paths:
            p = Path(p)
            if (p.exists() or p.is_symlink()) and not self.ours(p):
                out.append(p)
        return out

    # ------------------------------------------------------------------ rules

    def claim(self, paths: Iterable[Path], what: str = "") -> None:
        """Refuse, before any work, to replace files wsss did not write (unless ``--force``)."""
        if self.force or not self.active:
            return
        paths = list(paths)
        bad = self.foreign(paths)
        if bad:
            more = f" (and {len(bad) - 1} more{f' {what}' if what else ''})" if len(bad) > 1 else ""
            raise WsssError(f"{bad[0]} exists and was not written by wsss{more}: it would be replaced; move it, "
                            f"choose another {self.option}, or pass --force to replace it")

    def may_write(self, path: Path) -> None:
        """Raise unless ``path`` is absent, ours, or ``--force`` was given (a directory is never ours)."""
        path = Path(path)
        if path.is_dir() and not path.is_symlink():
            raise WsssError(f"{path} is a folder; a file would be written there")
        self.claim([path])

    def set_meta(self, path: Path, meta: Mapping[str, Any]) -> None:
        """Extra facts recorded with the next write of ``path`` (e.g. the source image it was made from)."""
        self._meta[self._rel(path)] = dict(meta)

    # ------------------------------------------------------------------ the manifest

    def record(self, path: Path, written: Path | None = None) -> None:
        """Record that ``path`` holds (or is about to hold, renamed from ``written``) a file of ours."""
        if not self.active:
            return
        if not self.begun:
            self.begin(None, None)
            self._begun_blank = True
        st = Path(written if written is not None else path).stat()
        rel = self._rel(path)
        entry = {"file": rel, "run": self.run_id, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
        meta = self._meta.pop(rel, None)
        if meta:
            entry["meta"] = meta
        self._append(entry)

    def _append(self, entry: dict) -> None:
        line = (json.dumps(entry, separators=(",", ":"), default=str) + "\n").encode()
        # O_APPEND: concurrent writers (the per-slide shards of a cohort) never interleave a line.
        path = self.folder / MANIFEST_NAME
        try:
            fd = os.open(path, os.O_CREAT | os.O_APPEND | os.O_WRONLY, 0o644)
            try:
                if os.write(fd, line) != len(line):
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            finally:
                os.close(fd)
        except OSError as exc:
            raise WsssError(f"cannot write {path}: {exc.strerror or exc}") from None
        self.manifest.add(entry)

    def begin(self, config: Mapping | None, inputs: Mapping | None) -> None:
        """Record the run: its configuration and input hashes (what a later run compares with)."""
        if not self.active or (self.begun and not (self._begun_blank and config is not None)):
            return
        self.begun, self._begun_blank = True, False  # a run begun blank by an early record gets its config now
        self._append({"run": self.run_id, "key": self.key, "command": self.command, "format": FORMAT,
                      "config": dict(config or {}), "inputs": dict(inputs or {}), "pid": os.getpid(),
                      "host": locks.HOST, "started": time.strftime("%Y-%m-%d %H:%M:%S")})

    def end(self, status: str) -> None:
        if self.active and self.begun:
            self._append({"end": self.run_id, "status": status})


def owner_of(path: Path) -> Owner | None:
    """The innermost command of this process that owns a folder holding ``path``, or None."""
    if not _OWNERS:
        return None
    try:
        parent = Path(path).parent.resolve()
    except OSError:
        return None
    for folder in (parent, *parent.parents):
        owners = _OWNERS.get(folder)
        if owners:
            return owners[-1]
    return None


def remove_ours(path: Path) -> None:
    """Remove ``path``, an output of an earlier run that this run does not write again (another
    label-image format, a GeoJSON not asked for this time), only if wsss wrote it as it is now: a
    file of the user's of that name stays, even with ``--force``. Outside an owned folder there are
    no rules (as for :func:`wsss.runtime.atomic_path`): it is removed."""
    path = Path(path)
    owner = owner_of(path)
    if owner is not None and owner.active and not owner.ours(path):
        if path.exists() or path.is_symlink():
            log.info("%s was not written by wsss: left as it is", path)
        return
    path.unlink(missing_ok=True)


def check_output_folder(folder: Path, option: str = "--out") -> None:
    """An output folder must be a folder (or not exist yet), and so must every parent of it."""
    folder = Path(folder)
    for p in (folder, *folder.parents):
        if p.exists() and not p.is_dir():
            where = f"{option} {folder}" if p == folder else f"{option} {folder}: {p}"
            raise WsssError(f"{where} is a file; a folder is needed")
        if p.is_dir():
            break


def refuse_input_folders(folder: Path, inputs: Iterable[Path], option: str = "--out") -> None:
    """Refuse an output folder that is a folder the command reads its data from (a dataset split, a
    folder of images): outputs never go among the inputs."""
    try:
        target = Path(folder).resolve()
    except OSError:
        return
    for inp in inputs:
        inp = Path(inp)
        if inp.is_dir() and inp.resolve() == target:
            raise WsssError(f"{option} {folder} is an input folder ({inp}); choose another {option}")


@contextlib.contextmanager
def owned_folder(folder: str | Path, command: str, *, key: str | None = None, config: Mapping | None = None,
                 inputs: Mapping | None = None, force: bool = False, scope: str | None = None,
                 option: str = "--out", read_from: Iterable[Path] = (), enabled: bool = True) -> Iterator[Owner]:
    """Hold ``folder`` for one run of ``command``: the lock, the manifest, the write rules.

    ``key`` names the run for :meth:`Owner.previous_run` (default: ``command``); ``config`` and
    ``inputs`` (input hashes) are recorded with it, now, or (``config=None``) when the command calls
    :meth:`Owner.begin` once it knows them (a resumed run's configuration). ``scope`` locks a part of a shared folder
    instead of all of it. ``read_from``: the command's input folders, which ``folder`` must not be.
    ``enabled=False`` (the non-main processes of a DDP job, which write nothing) checks nothing.
    """
    folder = Path(folder)
    if not enabled:
        yield Owner(folder, key or command, command, force, option)
        return
    check_output_folder(folder, option)
    refuse_input_folders(folder, read_from, option)
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WsssError(f"cannot create {option} {folder}: {exc.strerror or exc}") from None
    try:
        held = _acquire(folder, scope, command, option)
    except BaseException:
        if created:
            _remove_if_unused(folder)
        raise
    status = "failed"
    resolved = folder.resolve()
    try:
        if resolved not in _MANIFESTS:
            _MANIFESTS[resolved] = Manifest.read(folder)
        owner = Owner(folder, key or command, command, force, option, _MANIFESTS[resolved])
        _OWNERS.setdefault(resolved, []).append(owner)
        try:
            if config is not None:
                owner.begin(config, inputs)
            yield owner
            status = "finished"
        except (KeyboardInterrupt, Interrupted):
            status = "interrupted"
            raise
        finally:
            with contextlib.suppress(OSError):
                owner.end(status)
            _OWNERS[resolved].remove(owner)
            if not _OWNERS[resolved]:
                del _OWNERS[resolved]
                _MANIFESTS.pop(resolved, None)
            if scope is None and held.count == 1 and status == "finished":
                with contextlib.suppress(OSError):
                    compact(folder)
    finally:
        _release(held)
        if created and held.count == 0:
            _remove_if_unused(folder)


def _remove_if_unused(folder: Path) -> None:
    """A folder this run created and left without any output (it failed before writing) is removed,
    bookkeeping included: a failed command leaves nothing behind."""
    try:
        names = {p.name for p in folder.iterdir()}
    except OSError:
        return
    if names - {MANIFEST_NAME, LOCK_NAME}:
        return
    with contextlib.suppress(OSError):
        (folder / MANIFEST_NAME).unlink(missing_ok=True)
        folder.rmdir()


def compact(folder: Path) -> None:
    """Rewrite the manifest without the records of files that are gone or were replaced since, and
    without the runs nothing refers to any more (the newest run of each key is always kept)."""
    manifest = Manifest.read(folder)
    keep_files: list[dict] = []
    for rel, entries in manifest.files.items():
        try:
            st = (folder / rel).stat()
        except OSError:
            continue
        match = manifest.record_of(rel, st.st_size, st.st_mtime_ns)
        if match is not None:
            keep_files.append(match)
    used = {e["run"] for e in keep_files}
    newest = {}
    for run in manifest.runs:
        newest[run.get("key")] = run.get("run")
    used |= set(newest.values())
    lines = []
    for run in manifest.runs:
        if run.get("run") in used:
            lines.append(run)
            if run["run"] in manifest.ends:
                lines.append({"end": run["run"], "status": manifest.ends[run["run"]]})
    lines += keep_files
    text = "".join(json.dumps(e, separators=(",", ":"), default=str) + "\n" for e in lines)
    fd, tmp = tempfile.mkstemp(prefix=f"{MANIFEST_NAME}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, folder / MANIFEST_NAME)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


__all__ = [
    "LOCK_NAME", "MANIFEST_NAME", "Manifest", "Owner", "check_output_folder", "compact",
    "file_sha256", "listing_hash", "manifest_record", "owned_folder", "owner_of", "refuse_input_folders",
    "remove_ours", "short",
]
