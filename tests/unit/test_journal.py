"""wsss.runs.journal on its own: the progress file of a run and the one way settings differences are said."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from wsss.errors import WsssError
from wsss.runs.journal import Journal, diff_settings


def test_diff_settings_names_each_changed_key_once_in_order():
    old = {"epochs": 4, "lr": 0.01, "layers": ("b4_5", "bn7"), "out": Path("a"), "gone": 1}
    new = {"epochs": 4, "lr": 0.5, "layers": ["b4_5", "bn7"], "out": "a", "added": True}
    # tuples and lists, paths and strings are the same setting; a key on one side only is a change
    assert diff_settings(old, new) == ["added: null → true", "gone: 1 → null", "lr: 0.01 → 0.5"]
    assert diff_settings(old, new, ["lr", "epochs"]) == ["lr: 0.01 → 0.5"]
    assert diff_settings({"tile": (224, 224), "lr": 0.01}, {"tile": (112, 112), "lr": 0.01}, options=True) == [
        "--tile 224,224 → 112,112"]
    digest_a, digest_b = "a" * 64, "b" * 64
    assert diff_settings({"checkpoint": digest_a}, {"checkpoint": digest_b}) == [
        "checkpoint: sha256 aaaaaaaaaaaa… → sha256 bbbbbbbbbbbb…"]
    assert diff_settings({"x": "y" * 100}, {"x": 1})[0] == f'x: "{"y" * 56}... → 1'


def test_a_journal_keeps_finished_steps_for_the_same_settings_only(tmp_path):
    path = tmp_path / "progress.json"
    journal = Journal.open(path, {"preset": "cpu", "seeds": (0, 1)})
    assert journal.done("stage1") is None and not path.exists()  # nothing written before a step ends
    journal.finish("stage1", 12.34, {"mIoU": 0.5})
    assert json.loads(path.read_text()) == {"signature": {"preset": "cpu", "seeds": [0, 1]},
                                            "steps": {"stage1": {"seconds": 12.3, "result": {"mIoU": 0.5}}}}
    again = Journal.open(path, {"seeds": [0, 1], "preset": "cpu"})
    assert again.done("stage1") == {"seconds": 12.3, "result": {"mIoU": 0.5}}
    assert Journal.open(path, {"preset": "cpu", "seeds": [0, 1]}, force=True).done("stage1") is None

    with pytest.raises(WsssError, match=r'progress.json records a run with other settings \(preset: "cpu" → "best"\); '
                                        r"pass --force to start over$"):
        Journal.open(path, {"preset": "best", "seeds": [0, 1]})
    restarted = Journal.open(path, {"preset": "best", "seeds": [0, 1]}, on_change="restart", state={"rows": 0})
    assert restarted.done("stage1") is None and restarted.state == {"rows": 0}
    # a setting added since: the old file meant its default, and ``upgrade`` says so
    assert Journal.open(path, {"preset": "cpu", "seeds": [0, 1], "look": None},
                        upgrade=lambda old: {"look": None, **old}).done("stage1") is not None


def test_state_round_trips_and_unreadable_or_old_files_are_handled(tmp_path, caplog):
    path = tmp_path / "state.json"
    journal = Journal.open(path, {"tile": 224}, state={"rows_done": 0})
    journal.state["rows_done"] += 3
    journal.save()
    assert Journal.open(path, {"tile": 224}).state == {"rows_done": 3}
    path.write_text("{not json")
    assert Journal.open(path, {"tile": 224}, state={"rows_done": 0}).state == {"rows_done": 0}
    assert "unreadable" in caplog.text
    # predict-wsi's state.json as older versions wrote it: the fingerprint beside the counters
    path.write_text(json.dumps({"fingerprint": {"tile": 224}, "rows_done": 7, "segmented": 5}))
    old = Journal.open(path, {"tile": 224})
    assert old.state == {"rows_done": 7, "segmented": 5} and old.signature == {"tile": 224}
