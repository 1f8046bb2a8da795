"""The ownership rules on their own (no model): what counts as written by wsss, the lock files, the journal."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from helpers import dead_pid
from wsss.runs import lock as K
from wsss.errors import WsssError
from wsss.runs.owner import MANIFEST_NAME, Manifest, owned_folder, owner_of
from wsss.runtime import atomic_path


def write(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def test_files_written_through_atomic_path_are_ours_until_changed(tmp_path):
    out = tmp_path / "out"
    with owned_folder(out, "demo") as owner:
        write(out / "a.txt", "one")
        write(out / "sub" / "b.txt", "two")
        assert owner_of(out / "sub" / "b.txt") is owner
        assert owner.ours(out / "a.txt") and owner.ours(out / "sub" / "b.txt")
    assert owner_of(out / "a.txt") is None and not (out / ".wsss-lock").exists()

    (out / "sub" / "b.txt").write_text("edited by hand")  # same path, other size
    (out / "c.txt").write_text("the user's")
    with owned_folder(out, "demo") as owner:
        write(out / "a.txt", "three")  # ours: replaced
        for name in ("sub/b.txt", "c.txt"):
            with pytest.raises(WsssError, match=f"{name.split('/')[-1]} exists and was not written by wsss"):
                write(out / name, "x")
        assert (out / "sub" / "b.txt").read_text() == "edited by hand" and (out / "c.txt").read_text() == "the user's"
    with owned_folder(out, "demo", force=True):
        write(out / "c.txt", "forced")
    assert (out / "c.txt").read_text() == "forced"


def test_a_record_whose_rename_never_happened_leaves_the_old_file_ours(tmp_path):
    """The journal gets a file's record before the rename; killed in between, the old file stays ours."""
    out = tmp_path / "out"
    with owned_folder(out, "demo"):
        write(out / "a.txt", "old")
    with pytest.raises(RuntimeError):
        with owned_folder(out, "demo") as owner:
            tmp = out / ".a.txt.partial.tmp"
            tmp.write_text("a longer new content")
            owner.record(out / "a.txt", written=tmp)
            tmp.unlink()
            raise RuntimeError("the process dies before os.replace")
    assert len(Manifest.read(out).files["a.txt"]) == 2
    with owned_folder(out, "demo") as owner:
        assert owner.ours(out / "a.txt")
        write(out / "a.txt", "new")
    assert (out / "a.txt").read_text() == "new"


def test_the_journal_is_compacted_to_the_files_there_and_cut_lines_are_skipped(tmp_path):
    out = tmp_path / "out"
    with owned_folder(out, "demo", config={"n": 1}):
        for i in range(5):
            write(out / "a.txt", f"version {i}")
        write(out / "gone.txt", "x")
        (out / "gone.txt").unlink()
    lines = [json.loads(line) for line in (out / MANIFEST_NAME).read_text().splitlines()]
    files = [line["file"] for line in lines if "file" in line]
    assert files == ["a.txt"]  # one record: the current file's
    assert [line["config"] for line in lines if "run" in line and "key" in line] == [{"n": 1}]
    with open(out / MANIFEST_NAME, "a") as f:
        f.write('{"file": "b.txt", "run": "x", "si')  # a line cut short by a crash
    assert set(Manifest.read(out).files) == {"a.txt"}


def test_a_lock_of_a_live_process_refuses_and_a_failed_first_run_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / ".wsss-lock").write_text(json.dumps({"pid": os.getppid(), "host": os.uname().nodename,
                                                "command": "other"}))
    with pytest.raises(WsssError, match=r"in use by `wsss other` \(pid"):
        with owned_folder(out, "demo"):
            pass
    fresh = tmp_path / "fresh"
    with pytest.raises(WsssError, match="boom"):
        with owned_folder(fresh, "demo"):
            raise WsssError("boom")
    assert not fresh.exists()


def test_outputs_never_go_into_an_input_folder_nor_into_a_file(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "afile").write_text("x")
    with pytest.raises(WsssError, match="is an input folder"):
        with owned_folder(tmp_path / "data", "demo", read_from=[tmp_path / "data"]):
            pass
    with pytest.raises(WsssError, match=r"--out .*afile/sub: .*afile is a file; a folder is needed"):
        with owned_folder(tmp_path / "afile" / "sub", "demo"):
            pass


# --------------------------------------------------------------------------- lock files (wsss.locks)


def test_locks_exclude_break_stale_ones_and_cannot_check_other_hosts(tmp_path):
    path = tmp_path / "x" / "lock.json"
    with K.acquire(path, "slide x", shard="0/1") as lock:
        owner = json.loads(path.read_text())
        assert owner == lock.holder and owner["pid"] == os.getpid() and owner["host"] == K.HOST
        assert owner["shard"] == "0/1"
        with pytest.raises(K.LockHeld, match=rf"slide x is in use by pid {os.getpid()} on "):
            K.acquire(path, "slide x")  # held by a live process (this one)
    assert not path.exists()
    # a dead process's lock, and a lock whose pid now belongs to another process (a reused pid)
    for stale in ({"host": K.HOST, "pid": dead_pid(), "proc_start": None},
                  {"host": K.HOST, "pid": os.getpid(), "proc_start": (K.process_start(os.getpid()) or 0) + 1}):
        if stale["proc_start"] == 1 and K.process_start(os.getpid()) is None:
            continue  # no /proc: start times cannot be compared
        path.write_text(json.dumps(stale))
        assert K.alive(stale) is False
        with K.acquire(path, "slide x") as lock:
            assert json.loads(path.read_text()) == lock.holder
        assert not path.with_name("lock.json.break").exists()
    path.write_text(json.dumps({"host": "gpu-node-3", "pid": 1, "since": "2026-11-30 10:00:00"}))
    with pytest.raises(K.LockHeld, match="another host: whether that process still runs cannot be checked"):
        K.acquire(path, "slide x")
    assert json.loads(path.read_text())["host"] == "gpu-node-3"


def test_a_file_system_without_hard_links_gets_exclusive_locks_and_a_full_disk_is_one_line(tmp_path, monkeypatch):
    path = tmp_path / "lock"

    def no_links(src, dst):
        raise PermissionError(1, "Operation not permitted")  # what vfat and some network file systems say

    monkeypatch.setattr(os, "link", no_links)
    with K.acquire(path, "folder x") as lock:
        assert json.loads(path.read_text()) == lock.holder
        with pytest.raises(K.LockHeld, match="folder x is in use by"):
            K.acquire(path, "folder x")
    assert not path.exists() and list(tmp_path.iterdir()) == []

    def full(self, data):
        raise OSError(27, "File too large")

    monkeypatch.setattr(Path, "write_bytes", full)
    with pytest.raises(WsssError, match=rf"cannot write {path}: File too large"):
        K.acquire(path, "folder x")
    assert list(tmp_path.iterdir()) == []
