"""Dataset specifications: class names, palettes and how white pixels are treated."""

from __future__ import annotations

from dataclasses import dataclass

from wsss.errors import WsssError

BACKGROUND_INDEX = 4
"""Mask value for white background / not evaluated, in every dataset."""


@dataclass(frozen=True)
class DatasetSpec:
    """What the pipeline needs to know about a dataset.

    ``classes`` are the tissue classes in label order (index ``i`` is the ``i``-th digit of the
    file-name label). ``palette`` holds one RGB colour per tissue class followed by the background
    colour. ``white_is_background`` says whether white pixels are background (LUAD) or a real
    tissue such as fat (BCSS), which matters for pseudo-masks.
    """

    name: str
    classes: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]
    white_is_background: bool
    background_index: int = BACKGROUND_INDEX

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def flat_palette(self) -> list[int]:
        """The palette as PIL wants it: 768 ints, unused entries black."""
        flat = [c for rgb in self.palette for c in rgb]
        return flat + [0] * (768 - len(flat))


_WHITE = (255, 255, 255)

LUAD = DatasetSpec(
    name="luad",
    classes=("TE", "NEC", "LYM", "TAS"),
    palette=((205, 51, 51), (0, 255, 0), (65, 105, 225), (255, 165, 0), _WHITE),
    white_is_background=True,
)

BCSS = DatasetSpec(
    name="bcss",
    classes=("TUM", "STR", "LYM", "NEC"),
    palette=((255, 0, 0), (0, 255, 0), (0, 0, 255), (153, 0, 255), _WHITE),
    white_is_background=False,
)

SPECS: dict[str, DatasetSpec] = {s.name: s for s in (LUAD, BCSS)}


def get_spec(name: str) -> DatasetSpec:
    """Look up a dataset spec by name (``luad`` or ``bcss``)."""
    try:
        return SPECS[name.lower()]
    except KeyError:
        raise WsssError(f"unknown dataset {name!r}; choose one of {', '.join(SPECS)}") from None
