"""Train/val/test splits by slide, so that no slide (and no patient) is in two splits.

Patches of one slide share its stain, scanner and patient: patches of a slide in both the training
and the test split make the test a measure of memory. So the split is drawn over *groups*: a slide's
patient (a ``patient`` column of the manifest) when known, else the slide itself.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence

from wsss.errors import WsssError

SPLITS = ("train", "val", "test")


def assign_splits(slides: Sequence[str], patients: Mapping[str, str | None] | None = None,
                  val_slides: Sequence[str] = (), test_slides: Sequence[str] = (),
                  val_fraction: float = 0.0, test_fraction: float = 0.0, seed: int = 0) -> dict[str, str]:
    """``{slide name: "train" | "val" | "test"}``.

    Named slides (``val_slides``, ``test_slides``, names without extension) go where they are named
    and every other slide is a training slide; or (no names) ``val_fraction`` and ``test_fraction`` of
    the groups (patients, else slides), at least one each when the fraction is above 0, are drawn
    with ``seed`` from the groups sorted by name, and the rest train. A patient whose slides the names
    put in two splits, an unknown name, or splits that leave nothing to train on are user errors.
    """
    patients = {s: (patients or {}).get(s) or None for s in slides}
    if val_slides or test_slides:
        if val_fraction or test_fraction:
            raise WsssError("give --val-slides/--test-slides or --val-fraction/--test-fraction, not both")
        split = _named(slides, val_slides, test_slides)
    else:
        split = _drawn(slides, patients, val_fraction, test_fraction, seed)
    _check_patients(split, patients)
    if "train" not in split.values():
        raise WsssError("every slide is in val or test: no slide is left to train on")
    return split


def _named(slides: Sequence[str], val: Sequence[str], test: Sequence[str]) -> dict[str, str]:
    known = set(slides)
    for option, names in (("--val-slides", val), ("--test-slides", test)):
        unknown = [n for n in names if n not in known]
        if unknown:
            raise WsssError(f"{option}: no slide named {', '.join(unknown)} (slides are named by their file name "
                            f"without extension: {', '.join(sorted(known)[:8])}{', ...' if len(known) > 8 else ''})")
    both = sorted(set(val) & set(test))
    if both:
        raise WsssError(f"{', '.join(both)} named in both --val-slides and --test-slides")
    return {s: "val" if s in val else "test" if s in test else "train" for s in slides}


def _drawn(slides: Sequence[str], patients: Mapping[str, str | None], val_fraction: float, test_fraction: float,
           seed: int) -> dict[str, str]:
    for option, f in (("--val-fraction", val_fraction), ("--test-fraction", test_fraction)):
        if not 0.0 <= f < 1.0:
            raise WsssError(f"{option} is a fraction of the slides (of the patients, with a patient column), "
                            f"0 or more and below 1, not {f:g}")
    if val_fraction + test_fraction >= 1.0:
        raise WsssError(f"--val-fraction {val_fraction:g} and --test-fraction {test_fraction:g} leave nothing to "
                        "train on")
    group_of = {s: patients[s] or s for s in slides}
    groups = sorted(set(group_of.values()))
    random.Random(seed).shuffle(groups)
    n_val, n_test = (_count(f, len(groups)) for f in (val_fraction, test_fraction))
    unit = "patients" if any(patients.values()) else "slides"
    if n_val + n_test >= len(groups):
        raise WsssError(f"{len(groups)} {unit} cannot give {n_val} to val and {n_test} to test and keep one to "
                        "train on: lower --val-fraction/--test-fraction")
    where = {g: "val" for g in groups[:n_val]}
    where.update({g: "test" for g in groups[n_val:n_val + n_test]})
    return {s: where.get(group_of[s], "train") for s in slides}


def _count(fraction: float, groups: int) -> int:
    """Groups a split gets: the fraction rounded, at least one when the fraction is above 0."""
    return 0 if fraction == 0 else max(1, round(fraction * groups))


def _check_patients(split: Mapping[str, str], patients: Mapping[str, str | None]) -> None:
    seen: dict[str, tuple[str, str]] = {}
    for slide, where in split.items():
        patient = patients.get(slide)
        if patient is None:
            continue
        other = seen.setdefault(patient, (slide, where))
        if other[1] != where:
            raise WsssError(f"patient {patient} has slides in {other[1]} ({other[0]}) and in {where} ({slide}): "
                            "put all of a patient's slides in one split")
