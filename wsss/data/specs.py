"""Dataset specifications: class names, colours, the background value and how white pixels are treated.

``--dataset`` takes ``luad``, ``bcss`` (two specs shipped with the package, ``wsss/data/spec_files/``)
or the path of a TOML spec file::

    name = "wsss4luad"                                # names runs and checkpoint files
    classes = ["tumor", "stroma", "normal"]           # label order
    colors = [[205, 51, 51], [255, 165, 0], [0, 255, 0]]
    white_is_background = true                        # the luad rule; false = the bcss rule
    background_index = 3                              # optional; default = number of classes
    background_color = [255, 255, 255]               # optional; default white
    mask_encoding = "index"                           # optional: "index" (palette or greyscale PNGs
                                                      #   of class indices) or "rgb" (colour -> class)
    labels_csv = "train/labels.csv"                   # optional: training labels from a CSV (a
                                                      #   relative path is under the dataset folder)
                                                      #   instead of from the file names
    mpp = 1.0                                         # optional: µm per pixel of the patches (the
                                                      #   magnification a model trained on them works at)

Mask values ``0 .. C-1`` are the classes in label order and ``background_index`` is background (not
evaluated, ignored by the losses); any other value in a mask is an error. A spec travels inside every
checkpoint as a plain dict (:meth:`DatasetSpec.to_dict`), so a checkpoint names its own classes.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

from wsss.errors import WsssError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

RGB = tuple[int, int, int]
WHITE: RGB = (255, 255, 255)
MAX_VALUE = 255  # masks are 8-bit
BACKGROUND_NAME = "background"
MASK_ENCODINGS = ("index", "rgb")
SHIPPED = ("luad", "bcss")

REQUIRED_KEYS = ("name", "classes", "colors", "white_is_background")
OPTIONAL_KEYS = ("background_index", "background_color", "mask_encoding", "labels_csv", "mpp")
IDENTITY_KEYS = ("name", "classes", "colors", "white_is_background", "background_index", "background_color")
"""What a model trained on a spec depends on; ``mask_encoding`` and ``labels_csv`` only say how a copy
of the data is stored, so a checkpoint may be used with data stored otherwise. ``mpp`` is not among
them: a checkpoint records the µm/px it was trained at itself (:mod:`wsss.data.scale`), and a
spec file without ``mpp`` names the same classes."""

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class DatasetSpec:
    """What the pipeline needs to know about a dataset.

    ``classes`` are the tissue classes in label order (index ``i`` is the ``i``-th digit of a
    file-name label and the mask value ``i``); ``colors`` one RGB colour per class.
    ``background_index`` (default: the number of classes) is the mask value of background / not
    evaluated, drawn in ``background_color``. ``white_is_background`` says whether white pixels are
    background (LUAD) or a real tissue such as fat (BCSS), which matters for pseudo-masks and
    predictions. ``mpp``: µm per pixel of the patches (``wsss extract-patches`` cuts them at it).
    Invalid values raise :class:`WsssError` with one line naming the problem.
    """

    name: str
    classes: tuple[str, ...]
    colors: tuple[RGB, ...]
    white_is_background: bool
    background_index: int | None = None
    background_color: RGB = WHITE
    mask_encoding: str = "index"
    labels_csv: str | None = None
    mpp: float | None = None  # µm per pixel of the patches; None: not said here (wsss.data.scale)
    source: str | None = field(default=None, compare=False)  # the spec file, for messages only

    def __post_init__(self) -> None:
        classes, colors = _classes(self.classes), tuple(_rgb(c, "colors") for c in _list(self.colors, "colors"))
        background = len(classes) if self.background_index is None else self.background_index
        object.__setattr__(self, "classes", classes)
        object.__setattr__(self, "colors", colors)
        object.__setattr__(self, "background_index", background)
        object.__setattr__(self, "background_color", _rgb(self.background_color, "background_color"))
        _check(self)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def palette(self) -> tuple[RGB, ...]:
        """One colour per class, then the background colour (the legend's order)."""
        return (*self.colors, self.background_color)

    def flat_palette(self) -> list[int]:
        """The PNG palette: 768 ints, class ``i``'s colour at entry ``i``, the background colour at
        ``background_index``, unused entries black."""
        table = [(0, 0, 0)] * 256
        table[: self.num_classes] = self.colors
        table[self.background_index] = self.background_color
        return [v for rgb in table for v in rgb]

    def to_dict(self) -> dict[str, Any]:
        """The spec as JSON-like types only (what checkpoints store; ``weights_only`` loading reads it)."""
        return {
            "name": self.name,
            "classes": list(self.classes),
            "colors": [list(c) for c in self.colors],
            "white_is_background": self.white_is_background,
            "background_index": self.background_index,
            "background_color": list(self.background_color),
            "mask_encoding": self.mask_encoding,
            "labels_csv": self.labels_csv,
            "mpp": self.mpp,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str | None = None) -> "DatasetSpec":
        """A spec from a TOML table or a checkpoint's record; unknown or missing keys are errors."""
        where = f"dataset spec {source}" if source else "dataset spec"
        if not isinstance(data, Mapping):
            raise WsssError(f"{where}: expected a table of keys, got {type(data).__name__}")
        unknown = sorted(set(data) - set(REQUIRED_KEYS) - set(OPTIONAL_KEYS))
        if unknown:
            raise WsssError(f"{where}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} "
                            f"(known: {', '.join(REQUIRED_KEYS + OPTIONAL_KEYS)})")
        missing = [k for k in REQUIRED_KEYS if k not in data]
        if missing:
            raise WsssError(f"{where}: missing key{'s' if len(missing) > 1 else ''} {', '.join(missing)}")
        try:
            return cls(**{k: data[k] for k in (*REQUIRED_KEYS, *OPTIONAL_KEYS) if k in data}, source=source)
        except WsssError as exc:
            raise WsssError(f"{where}: {exc}") from None

    def identity(self) -> dict[str, Any]:
        """The keys a trained model depends on (:data:`IDENTITY_KEYS`), as :meth:`to_dict` writes them."""
        d = self.to_dict()
        return {k: d[k] for k in IDENTITY_KEYS}

    def with_labels_csv(self, path: str | Path | None) -> "DatasetSpec":
        """The same spec reading its training labels from ``path`` (None: keep the spec's own source)."""
        if path is None:
            return self
        return self._with(labels_csv=str(path))

    def with_mpp(self, mpp: float | None) -> "DatasetSpec":
        """The same spec with ``mpp`` µm per pixel."""
        return self._with(mpp=mpp)

    def _with(self, **changes: Any) -> "DatasetSpec":
        return DatasetSpec(**{**{f.name: getattr(self, f.name) for f in fields(self)}, **changes})

    def to_toml(self) -> str:
        """The spec as a TOML spec file (``None`` values left out); :func:`load_spec_file` reads it back."""
        lines = []
        for key, value in self.to_dict().items():
            if value is not None:
                lines.append(f"{key} = {_toml_value(value)}")
        return "\n".join(lines) + "\n"

    def labels_csv_path(self, root: str | Path) -> Path | None:
        """The training-label CSV of the dataset in ``root`` (a relative path is under ``root``), or None."""
        if self.labels_csv is None:
            return None
        path = Path(self.labels_csv).expanduser()
        return path if path.is_absolute() else Path(root) / path

    def mask_values(self) -> frozenset[int]:
        """The values a mask may hold: the classes and the background."""
        return frozenset(range(self.num_classes)) | {self.background_index}


# --------------------------------------------------------------------------- validation


def _list(value: Any, key: str) -> list:
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise WsssError(f"{key} must be a list, not {value!r}")
    return list(value)


def _classes(value: Any) -> tuple[str, ...]:
    classes = _list(value, "classes")
    if not classes:
        raise WsssError("classes is empty: a dataset needs at least one class")
    for c in classes:
        if not isinstance(c, str) or not c.strip() or c != c.strip():
            raise WsssError(f"class names must be non-empty strings without surrounding spaces, not {c!r}")
        if any(ch in c for ch in ',"\n\r'):
            raise WsssError(f"class name {c!r} holds a comma, quote or line break (it names a CSV column)")
    seen: set[str] = set()
    for c in classes:
        if c.lower() in seen:
            raise WsssError(f"duplicate class name {c!r}")
        seen.add(c.lower())
    if BACKGROUND_NAME in seen:
        raise WsssError(f"{BACKGROUND_NAME!r} cannot be a class name: it names the background in tables and legends")
    return tuple(classes)


def _rgb(value: Any, key: str) -> RGB:
    if (isinstance(value, (list, tuple)) and len(value) == 3
            and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in value)):
        return tuple(int(v) for v in value)
    raise WsssError(f"{key}: a colour is three integers 0-255 like [205, 51, 51], not {value!r}")


def _check(spec: DatasetSpec) -> None:
    if not isinstance(spec.name, str) or not _NAME_RE.match(spec.name):
        raise WsssError(f"name must be letters, digits, '.', '_' or '-' (it names files), not {spec.name!r}")
    n = spec.num_classes
    if len(spec.colors) != n:
        raise WsssError(f"{len(spec.colors)} colors for {n} classes: give one colour per class")
    if not isinstance(spec.white_is_background, bool):
        raise WsssError(f"white_is_background must be true or false, not {spec.white_is_background!r}")
    bg = spec.background_index
    if not isinstance(bg, int) or isinstance(bg, bool) or not 0 <= bg <= MAX_VALUE:
        raise WsssError(f"background_index must be an integer 0-{MAX_VALUE}, not {bg!r}")
    if bg < n:
        raise WsssError(f"background_index {bg} collides with class {bg} ({spec.classes[bg]}): "
                        f"classes are 0-{n - 1}, so the background needs {n} or more")
    if n > MAX_VALUE:
        raise WsssError(f"{n} classes: at most {MAX_VALUE} fit in 8-bit masks next to the background")
    if spec.mask_encoding not in MASK_ENCODINGS:
        raise WsssError(f"mask_encoding must be {' or '.join(map(repr, MASK_ENCODINGS))}, not {spec.mask_encoding!r}")
    if spec.mask_encoding == "rgb":
        colours = [*spec.colors, spec.background_color]
        for i, c in enumerate(colours):
            if c in colours[:i]:
                first = colours.index(c)
                raise WsssError(f"mask_encoding 'rgb' needs distinct colours, but {_colour_owner(spec, first)} and "
                                f"{_colour_owner(spec, i)} are both {list(c)}")
    if spec.labels_csv is not None and (not isinstance(spec.labels_csv, str) or not spec.labels_csv.strip()):
        raise WsssError(f"labels_csv must be the path of a CSV file, not {spec.labels_csv!r}")
    if spec.mpp is not None:
        check_mpp(spec.mpp, "mpp")
        object.__setattr__(spec, "mpp", float(spec.mpp))


MPP_RANGE = (0.05, 100.0)
"""µm per pixel a slide or a patch may have: from beyond a 100× objective to a 1× overview."""


def check_mpp(value: Any, what: str) -> None:
    """Refuse a µm/px value that is not a number in :data:`MPP_RANGE`, in one line naming ``what``."""
    lo, hi = MPP_RANGE
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and lo <= value <= hi
    if not ok:
        raise WsssError(f"{what} is µm per pixel, a number from {lo:g} to {hi:g}, not {value!r}")


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a TOML basic string for the names a spec allows
    return "[" + ", ".join(_toml_value(v) for v in value) + "]"


def _colour_owner(spec: DatasetSpec, i: int) -> str:
    return f"class {spec.classes[i]}" if i < spec.num_classes else "the background"


# --------------------------------------------------------------------------- loading


FOLDER_SPEC = "spec.toml"
"""A dataset folder's own spec (``wsss extract-patches`` writes it): ``--dataset`` when not given."""


def load_spec_file(path: str | Path) -> DatasetSpec:
    """Read a TOML spec file; a missing file, a TOML syntax error or a bad spec is one error line."""
    path = Path(path)
    if not path.is_file():
        raise WsssError(f"dataset spec file not found: {path}")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise WsssError(f"cannot read dataset spec {path}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise WsssError(f"dataset spec {path} is not valid TOML: {exc}") from None
    return DatasetSpec.from_dict(data, source=str(path))


def _shipped(name: str) -> DatasetSpec:
    text = resources.files("wsss.data").joinpath("spec_files", f"{name}.toml").read_text(encoding="utf-8")
    return DatasetSpec.from_dict(tomllib.loads(text), source=name)


def get_spec(dataset: str | Path | DatasetSpec, labels_csv: str | Path | None = None) -> DatasetSpec:
    """The spec ``--dataset`` names: ``luad``, ``bcss`` or the path of a TOML spec file.

    ``labels_csv`` (the ``--labels-csv`` option) replaces the spec's label source; a relative path is
    taken from the current folder.
    """
    if isinstance(dataset, DatasetSpec):
        spec = dataset
    elif str(dataset).lower() in SHIPPED:
        spec = _shipped(str(dataset).lower())
    elif Path(dataset).suffix.lower() == ".toml" or Path(dataset).exists():
        spec = load_spec_file(dataset)
    else:
        raise WsssError(f"unknown dataset {str(dataset)!r}: use luad, bcss or the path of a TOML spec file")
    if labels_csv is not None:
        spec = spec.with_labels_csv(Path(labels_csv).resolve())
    return spec


LUAD = _shipped("luad")
BCSS = _shipped("bcss")
SPECS: dict[str, DatasetSpec] = {"luad": LUAD, "bcss": BCSS}


# --------------------------------------------------------------------------- specs recorded in checkpoints


def recorded_spec(ckpt: Mapping[str, Any], path: str | Path) -> DatasetSpec | None:
    """The spec a checkpoint was trained on: its ``spec`` record; for checkpoints older than specs,
    the shipped spec its ``dataset`` entry names; None for files that record neither (published
    state_dicts)."""
    record = ckpt.get("spec")
    if isinstance(record, Mapping):
        return DatasetSpec.from_dict(record, source=f"recorded in {path}")
    name = ckpt.get("dataset")
    if isinstance(name, str) and name.lower() in SPECS:
        spec = SPECS[name.lower()]
        names = ckpt.get("class_names")
        if names is not None and tuple(names) != spec.classes:
            raise WsssError(f"{path} records dataset {name} but classes {', '.join(names)}; "
                            f"the {name} spec has {', '.join(spec.classes)}")
        return spec
    return None


def spec_difference(a: DatasetSpec, b: DatasetSpec) -> str:
    """``"key: a-value vs b-value; ..."`` for every :data:`IDENTITY_KEYS` entry that differs ("" when none)."""
    da, db = a.identity(), b.identity()
    return "; ".join(f"{k} {_show(da[k])} vs {_show(db[k])}" for k in IDENTITY_KEYS if da[k] != db[k])


def _show(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(map(_show, value)) + "]"
    return str(value)


def check_same_spec(recorded: DatasetSpec | None, given: DatasetSpec, path: str | Path) -> None:
    """Refuse a checkpoint trained on another spec than the one given, in one line naming the difference."""
    if recorded is None:
        return
    diff = spec_difference(recorded, given)
    if diff:
        raise WsssError(f"{path} was trained on dataset spec {recorded.name!r}, not the {given.name!r} given "
                        f"(checkpoint vs given: {diff})")


def resolve_with_checkpoint(dataset: str | Path | None, recorded: DatasetSpec | None, path: str | Path,
                            labels_csv: str | Path | None = None) -> DatasetSpec:
    """The spec of a command that loads a checkpoint: the one recorded in it; ``--dataset`` when
    given must be that same spec; files that record none (published ones) need ``--dataset``."""
    if dataset is None:
        if recorded is None:
            raise WsssError(f"{path} does not record its dataset; pass --dataset (luad, bcss or a spec file)")
        return get_spec(recorded, labels_csv)
    spec = get_spec(dataset, labels_csv)
    check_same_spec(recorded, spec, path)
    return spec
