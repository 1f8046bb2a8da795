"""Run the CLI in-process the way a shell would: exit code, stdout, stderr."""

from __future__ import annotations

import sys
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
    pass ``stop_at``."""

    def __init__(self, inner, stop_at: int | None = None) -> None:
        self.inner, self.stop_at, self.calls = inner, stop_at, 0

    def __call__(self, tiles):
        self.calls += 1
        if self.calls == self.stop_at:
            raise KeyboardInterrupt
        return self.inner(tiles)


def spy_on_models(monkeypatch: pytest.MonkeyPatch, module) -> tuple[list[Interrupting], Callable[[int | None], None]]:
    """Wrap ``module.load_models`` so that every run's predictor is an :class:`Interrupting`.

    Returns ``(spies, arm)``: ``arm(stop_at)`` sets where the next run stops (None: never); each
    run appends its predictor to ``spies``."""
    load = module.load_models
    spies: list[Interrupting] = []

    def arm(stop_at: int | None) -> None:
        def patched(cfg, *args):
            predictor, spec = load(cfg, *args)
            spies.append(Interrupting(predictor, stop_at))
            return spies[-1], spec

        monkeypatch.setattr(module, "load_models", patched)

    return spies, arm


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
