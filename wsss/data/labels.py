"""Patch-level labels: carried in file names, or listed in a CSV file.

File names hold a multi-hot label in one of three styles, accepted for any dataset:
``1031280-2300-27920-[1 0 0 1].png`` (LUAD-HistoSeg, spaces), ``TCGA-..._MPP-0.2500+0[1101].png``
(BCSS-WSSS, packed) and ``436219-7159-48057-[1, 0, 0].png`` (WSSS4LUAD, commas).

A label CSV has a header row: the file-name column first (any title), then one 0/1 column per class,
titled with the class names of the dataset spec (in any order)::

    file,tumor,stroma,normal
    patch-0001.png,1,0,1
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Sequence
from pathlib import Path

from wsss.errors import WsssError

# The last bracketed group of 0/1 digits (separated by nothing, spaces or commas) before the extension.
_LABEL_RE = re.compile(r"\[\s*([01](?:\s*,?\s*[01])*)\s*,?\s*\][^\[]*$")


def parse_label(name: str | Path, num_classes: int) -> tuple[int, ...]:
    """Return the multi-hot label ``(0|1, ...)`` of length ``num_classes`` from a file name.

    Raises :class:`WsssError` naming the file when the name carries no label, the label has the
    wrong number of digits, or no class is present.
    """
    fname = Path(name).name
    match = _LABEL_RE.search(Path(fname).stem)
    if match is None:
        raise WsssError(f"file name carries no label like '[1 0 0 1]', '[1001]' or '[1, 0, 0, 1]': {fname}")
    digits = tuple(int(d) for d in re.sub(r"[\s,]+", "", match.group(1)))
    return check_label(digits, num_classes, fname)


def check_label(label: Sequence[int], num_classes: int, fname: str) -> tuple[int, ...]:
    """``label`` as a tuple, or :class:`WsssError` naming ``fname`` when its width is not the class
    count or it names no class."""
    label = tuple(int(d) for d in label)
    if len(label) != num_classes:
        raise WsssError(f"label in {fname} has {len(label)} digits, expected {num_classes} (one per class)")
    if not any(label):
        raise WsssError(f"label in {fname} names no class")
    return label


def format_label(label: tuple[int, ...] | list[int], spaced: bool = True) -> str:
    """Format a multi-hot label the LUAD way (``[1 0 0 1]``) or the BCSS way (``[1001]``)."""
    sep = " " if spaced else ""
    return "[" + sep.join(str(int(d)) for d in label) + "]"


# --------------------------------------------------------------------------- CSV


def parse_label_csv(text: str, classes: Sequence[str], source: str) -> dict[str, tuple[int, ...]]:
    """``{file name: label}`` from the text of a label CSV (module doc) for ``classes`` in label order.

    A header that does not name exactly the classes, a repeated file, a value other than 0/1 or a
    row naming no class raise :class:`WsssError` naming ``source`` and the row.
    """
    rows = list(csv.reader(io.StringIO(text.lstrip("\ufeff"))))
    rows = [r for r in rows if any(cell.strip() for cell in r)]
    if not rows:
        raise WsssError(f"label CSV {source} is empty; its first row names a file column and the classes")
    header = [h.strip() for h in rows[0]]
    columns = header[1:]
    missing = [c for c in classes if c not in columns]
    extra = [c for c in columns if c not in classes]
    repeated = sorted({c for c in columns if columns.count(c) > 1})
    if missing or extra or repeated:
        problems = [f"missing {', '.join(missing)}" if missing else "",
                    f"unknown {', '.join(extra)}" if extra else "",
                    f"repeated {', '.join(repeated)}" if repeated else ""]
        raise WsssError(f"label CSV {source}: class columns do not match the spec "
                        f"({'; '.join(p for p in problems if p)}); expected a file column, then "
                        f"{', '.join(classes)}")
    order = [columns.index(c) + 1 for c in classes]
    labels: dict[str, tuple[int, ...]] = {}
    for line, row in enumerate(rows[1:], start=2):
        cells = [cell.strip() for cell in row]
        where = f"label CSV {source}, line {line}"
        if len(cells) != len(header):
            raise WsssError(f"{where}: {len(cells)} columns, the header has {len(header)}")
        name = Path(cells[0]).name
        if not name:
            raise WsssError(f"{where}: no file name")
        if name in labels:
            raise WsssError(f"{where}: {name} is listed twice")
        bad = [cells[i] for i in order if cells[i] not in ("0", "1")]
        if bad:
            raise WsssError(f"{where}: label values are 0 or 1, not {bad[0]!r}")
        labels[name] = check_label([int(cells[i]) for i in order], len(classes), f"{name} ({where})")
    return labels


def read_label_csv(path: Path, classes: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """:func:`parse_label_csv` of the file at ``path``; a missing or unreadable file is a user error."""
    path = Path(path)
    if not path.is_file():
        raise WsssError(f"label CSV not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise WsssError(f"cannot read label CSV {path}: {exc}") from None
    return parse_label_csv(text, classes, str(path))
