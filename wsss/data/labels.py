"""Patch-level labels carried in file names.

LUAD-HistoSeg writes ``1031280-2300-27920-[1 0 0 1].png`` (digits separated by spaces), BCSS-WSSS
writes ``TCGA-..._MPP-0.2500+0[1101].png`` (no spaces). Both styles are accepted for any dataset.
"""

from __future__ import annotations

import re
from pathlib import Path

from wsss.errors import WsssError

# The last bracketed group of 0/1 digits (optionally space-separated) before the extension.
_LABEL_RE = re.compile(r"\[([01](?:\s*[01])*)\s*\][^\[]*$")


def parse_label(name: str | Path, num_classes: int) -> tuple[int, ...]:
    """Return the multi-hot label ``(0|1, ...)`` of length ``num_classes`` from a file name.

    Raises :class:`WsssError` naming the file when the name carries no label, the label has the
    wrong number of digits, or no class is present.
    """
    fname = Path(name).name
    match = _LABEL_RE.search(Path(fname).stem)
    if match is None:
        raise WsssError(
            f"file name carries no label like '[1 0 0 1]' or '[1001]': {fname}"
        )
    digits = tuple(int(d) for d in re.sub(r"\s+", "", match.group(1)))
    if len(digits) != num_classes:
        raise WsssError(
            f"label in {fname} has {len(digits)} digits, expected {num_classes}"
        )
    if not any(digits):
        raise WsssError(f"label in {fname} names no class")
    return digits


def format_label(label: tuple[int, ...] | list[int], spaced: bool = True) -> str:
    """Format a multi-hot label the LUAD way (``[1 0 0 1]``) or the BCSS way (``[1001]``)."""
    sep = " " if spaced else ""
    return "[" + sep.join(str(int(d)) for d in label) + "]"
