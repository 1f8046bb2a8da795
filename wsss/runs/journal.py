"""A run's progress on disk, and the one way wsss says what changed between two settings.

A :class:`Journal` is a small JSON file a long command keeps beside its outputs::

    {"signature": {...},                         the settings the run computes with
     "steps": {"name": {"seconds", "result"}},   the steps finished, in any order
     "state": {...}}                             what a step in progress has done so far

``wsss reproduce`` records each finished step of its chain (``REPORT/progress.json``) and skips it
on the next call; ``predict-wsi`` records how many window rows of a slide are in its memory-mapped
label image (``OUT/.partial/<slide>/state.json``) and continues from there. A journal whose
signature differs from the settings of this call is, by the caller's choice, refused (one line
naming each difference: ``reproduce`` will not mix two configurations in one report) or started
afresh (a slide's scratch rows are worth less than an explanation). An unreadable journal is
started afresh with a warning; it is scratch, not an output the folder's manifest protects
(:mod:`wsss.runs.owner`), so a user may edit or delete it to redo a step.

:func:`diff_settings` is what every command says when settings differ: a resumed training run given
other options, a prediction folder of another model, pseudo-masks of another classifier, a
reproduce report of another preset.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from wsss.errors import WsssError

log = logging.getLogger(__name__)


def diff_settings(old: Mapping, new: Mapping, names: Iterable[str] | None = None, *,
                  options: bool = False) -> list[str]:
    """``["key: old → new", ...]`` for the keys (all of both by default, else ``names``) whose values
    differ once written as JSON (tuples and lists, paths and strings compare equal). ``options``:
    the keys are spelled as command-line options and the values as typed (``--epochs 1 → 4``)."""
    keys = list(names) if names is not None else sorted(set(old) | set(new))
    out = []
    for key in keys:
        a, b = old.get(key), new.get(key)
        if _json(a) == _json(b):
            continue
        if options:
            out.append(f"--{key.replace('_', '-')} {_typed(a)} → {_typed(b)}")
        else:
            out.append(f"{key}: {_show(a)} → {_show(b)}")
    return out


def _json(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _show(value: Any) -> str:
    if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        return f"sha256 {value[:12]}…"
    text = json.dumps(_json(value))
    return text if len(text) <= 60 else text[:57] + "..."


def _typed(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


@dataclass
class Journal:
    """The progress file of one run (module docstring). ``open`` it, ask :meth:`done`, call
    :meth:`finish` after each step or :meth:`save` after changing :attr:`state`; every save
    replaces the file atomically, so a kill leaves the last finished step recorded."""

    path: Path
    signature: dict
    steps: dict[str, dict] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def open(cls, path: Path, signature: Mapping, *, force: bool = False,
             on_change: Literal["refuse", "restart"] = "refuse", advice: str = "pass --force to start over",
             upgrade: Callable[[dict], dict] | None = None, state: Mapping | None = None) -> Journal:
        """The journal at ``path`` when it records ``signature`` (its saved one passed through
        ``upgrade`` first: settings added since default to what older runs computed), else a new
        one with ``state`` (not written until the first save). ``force`` starts afresh."""
        signature = _json(dict(signature))
        fresh = cls(Path(path), signature, {}, dict(state or {}))
        if force or not fresh.path.is_file():
            return fresh
        try:
            saved = json.loads(fresh.path.read_text(encoding="utf-8"))
            if not isinstance(saved, dict):
                raise ValueError("not an object")
        except (OSError, ValueError):
            log.warning("%s is unreadable: starting its bookkeeping afresh", fresh.path)
            return fresh
        if "signature" not in saved and "fingerprint" in saved:  # predict-wsi's state.json as older versions wrote it
            saved = {"signature": saved.pop("fingerprint"), "state": saved}
        old = _json(saved.get("signature") or {})
        if upgrade is not None:
            old = _json(upgrade(old))
        changed = diff_settings(old, signature)
        if not changed:
            return cls(fresh.path, signature, dict(saved.get("steps") or {}), dict(saved.get("state") or {}))
        if on_change == "refuse":
            raise WsssError(f"{fresh.path} records a run with other settings ({'; '.join(changed)}); {advice}")
        log.info("%s records a run with other settings (%s): starting over", fresh.path, "; ".join(changed))
        return fresh

    def done(self, step: str) -> dict | None:
        """The record of ``step`` (``{"seconds", "result"}``) if it finished, else None."""
        return self.steps.get(step)

    def finish(self, step: str, seconds: float, result: Any = None) -> None:
        self.steps[step] = {"seconds": round(seconds, 1), "result": result}
        self.save()

    def save(self) -> None:
        from wsss.runtime import atomic_path

        # Scratch the run rereads (and a user may edit to redo a step): not recorded in the manifest.
        with atomic_path(self.path, owned=False) as tmp:
            body = {"signature": self.signature, "steps": self.steps}
            if self.state:
                body["state"] = self.state
            tmp.write_text(json.dumps(body, indent=2) + "\n", encoding="utf-8")


__all__ = ["Journal", "diff_settings"]
