"""Shared test helpers: run the CLI in-process the way a shell would (exit code, stdout, stderr), a
predictor that stops a run, lock files of processes that run or no longer run."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest

from wsss.cli import main


def run_cli(capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch, *args: str):
    monkeypatch.setattr(sys, "argv", ["wsss", *map(str, args)])
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    out, err = capsys.readouterr()
    return code, out, err


class Interrupting:
    """A predictor that counts its forward passes and stops the run (as Ctrl-C or a kill would) at
    pass ``stop_at``; ``on_call`` looks at the run from inside (e.g. its lock) before each pass."""

    def __init__(self, inner, stop_at: int | None = None, on_call: Callable[[], None] | None = None) -> None:
        self.inner, self.stop_at, self.on_call, self.calls = inner, stop_at, on_call, 0

    def __call__(self, tiles):
        if self.on_call is not None:
            self.on_call()
        self.calls += 1
        if self.calls == self.stop_at:
            raise KeyboardInterrupt
        return self.inner(tiles)


def spy_on_models(monkeypatch: pytest.MonkeyPatch, module) -> tuple[list[Interrupting], Callable[[int | None], None]]:
    """Wrap ``module.load_models`` so that every run's predictor is an :class:`Interrupting`.

    Returns ``(spies, arm)``: ``arm(stop_at, on_call)`` sets where the next run stops (None: never)
    and what its predictor calls before each pass; each run appends its predictor to ``spies``."""
    load = module.load_models
    spies: list[Interrupting] = []

    def arm(stop_at: int | None, on_call: Callable[[], None] | None = None) -> None:
        def patched(cfg, *args):
            predictor, spec = load(cfg, *args)
            spies.append(Interrupting(predictor, stop_at, on_call))
            return spies[-1], spec

        monkeypatch.setattr(module, "load_models", patched)

    return spies, arm


def dead_pid() -> int:
    """The pid of a process that has finished (what a lock left by a killed run names)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def live_lock(folder: Path, command: str, scope: str | None = None) -> subprocess.Popen:
    """A lock on ``folder`` (or on its part ``scope``: a slide) in the documented format, held by a
    process that is running (``sleep``); kill it to leave a stale lock."""
    proc = subprocess.Popen(["sleep", "60"])
    write_lock(folder, command, proc.pid, scope)
    return proc


def write_lock(folder: Path, command: str, pid: int, scope: str | None = None) -> Path:
    """``folder/.wsss-lock`` (``.wsss-lock.<scope>``) naming process ``pid`` of this host."""
    folder.mkdir(parents=True, exist_ok=True)
    boot = Path("/proc/sys/kernel/random/boot_id")
    stat = Path(f"/proc/{pid}/stat")
    start = int(stat.read_text().rsplit(")", 1)[1].split()[19]) if stat.exists() else None
    path = folder / (".wsss-lock" if scope is None else f".wsss-lock.{scope}")
    path.write_text(json.dumps({
        "pid": pid, "host": socket.gethostname(), "boot": boot.read_text().strip() if boot.exists() else None,
        "proc_start": start, "command": command, "since": "2026-01-01 00:00:00"}))
    return path


def record_calls(monkeypatch: pytest.MonkeyPatch, module, name: str, result=None) -> list[tuple[tuple, dict]]:
    """Replace ``module.name`` by a stand-in that records each call's ``(args, kwargs)`` and returns
    ``result`` (called with the same arguments when it is callable); returns the list of calls.

    For checking what a command would run with (its resolved configuration) without running it."""
    calls: list[tuple[tuple, dict]] = []

    def stand_in(*args, **kwargs):
        calls.append((args, kwargs))
        return result(*args, **kwargs) if callable(result) else result

    monkeypatch.setattr(module, name, stand_in)
    return calls
