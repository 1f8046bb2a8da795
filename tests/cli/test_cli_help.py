"""--help groups every command's options into panels, in one order, each option in the same panel
wherever it appears; every option keeps working under its old name."""

from __future__ import annotations

import re

import pytest

from helpers import run_cli

ORDER = ["Data and outputs", "Model", "Training", "Gate", "Runtime", "Advanced"]

# Written by hand: where a newcomer should find these options.
EXPECTED = {
    "train-stage1": {"--dataset": "Data and outputs", "--data": "Data and outputs", "--out": "Data and outputs",
                     "--preset": "Model", "--width": "Model", "--epochs": "Training", "--lr": "Training",
                     "--device": "Runtime", "--resume": "Runtime", "--pda-start": "Advanced", "--tie-rule": "Advanced"},
    "train-stage2": {"--pm-dir": "Data and outputs", "--backbone": "Model", "--ema": "Training",
                     "--gate": "Gate", "--gate-mode": "Gate", "--stage1-checkpoint": "Gate", "--precision": "Runtime"},
    "predict": {"--checkpoint": "Model", "--out": "Data and outputs", "--tile": "Model", "--gate-threshold": "Gate",
                "--save-probs": "Data and outputs", "--force": "Runtime"},
    "predict-wsi": {"--level": "Data and outputs", "--roi": "Data and outputs", "--shard": "Runtime",
                    "--min-area": "Advanced", "--tta": "Model"},
}


def panels(text: str) -> dict[str, str]:
    """``{option: panel}`` read from a rich --help screen: an option belongs to the box above it."""
    found, panel = {}, None
    for line in text.splitlines():
        header = re.match(r"\s*╭─ (.+?) ─", line)
        if header:
            panel = header.group(1)
            continue
        option = re.match(r"\s*│\s*(?:\*\s+)?(--[a-z0-9-]+)", line)
        if option and panel is not None:
            found.setdefault(option.group(1), panel)
    return found


def help_of(capsys, monkeypatch, command: str) -> str:
    monkeypatch.setenv("COLUMNS", "160")
    code, out, err = run_cli(capsys, monkeypatch, command, "--help")
    assert code == 0, err
    return out


@pytest.mark.parametrize("command", sorted(EXPECTED))
def test_options_sit_in_their_panels_in_order(command, capsys, monkeypatch):
    text = help_of(capsys, monkeypatch, command)
    found = panels(text)
    for option, panel in EXPECTED[command].items():
        assert found.get(option) == panel, (option, found.get(option))
    shown = [p for p in re.findall(r"╭─ (.+?) ─", text) if p in ORDER]
    assert shown == [p for p in ORDER if p in shown] and len(shown) >= 3


def test_every_command_with_options_groups_them(capsys, monkeypatch):
    code, out, _ = run_cli(capsys, monkeypatch, "--help")
    commands = re.findall(r"│ ([a-z][a-z0-9-]+)\s{2,}", out)
    assert "train-stage1" in commands and "predict-wsi" in commands
    for command in commands:
        found = panels(help_of(capsys, monkeypatch, command))
        if command == "cohort-summary":  # an argument, no options
            continue
        found.pop("--help")  # click's own, in the default box
        assert found and set(found.values()) <= set(ORDER), (command, found)


def test_the_config_help_names_its_toml_tables(capsys, monkeypatch):
    """Rich reads "[stage1]" as markup and drops it unless escaped: the help read "whose ,  and  tables"."""
    for command in ("train-stage1", "predict-wsi"):
        text = re.sub(r"[│\s]+", " ", help_of(capsys, monkeypatch, command))
        assert "each command its own ([stage1], [pseudo_masks], [stage2], [predict], [predict_wsi];" in text, command
