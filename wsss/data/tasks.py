"""Random synthetic tasks: a new appearance for every class, drawn from a seed.

``wsss synth`` draws each class with one fixed, hand-written texture (:mod:`wsss.data.synth`), so a
method tuned on it may be tuned to those four textures. A *task* (``wsss synth --task-seed K``)
replaces them with textures drawn from a family wide enough to cover what tells tissues apart in
H&E: nuclear size, shape, darkness, density and arrangement (sheets, scattered, clusters, rows),
fibres (their presence, width, orientation and waviness), the texture scale of the eosin ground,
necrosis-like debris and haze, and the mix of the two stains. Quality claims are means and worsts
over several task seeds × training seeds, so that no preset can be fitted to one texture set.

``difficulty`` (0..1, default 0.5) moves three things together: how close two classes of a task
may be in appearance (the minimum distance, :func:`appearance_distance`, between any two classes),
how small a labelled region may be (the smallest Voronoi region of a patch's layout) and how fine
the distinguishing texture is (smaller nuclei, finer fibres).

Every length is in pixels of a 224-px patch at the generator's reference scale (as in
:mod:`wsss.data.synth`) and scales with the patch's zoom.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import numpy as np

from wsss.errors import WsssError

ARRANGEMENTS = ("sheet", "scattered", "clusters", "rows")
"""How nuclei are placed: a jittered lattice, uniformly at random, in clumps, or in lines."""

DEFAULT_DIFFICULTY = 0.5
_MAX_TRIES = 2000  # draws per class before the minimum distance is relaxed


@dataclass(frozen=True)
class Appearance:
    """How one class of a task looks. Lengths in px at the reference scale (224-px patch, zoom 1)."""

    radius: float  # nuclear semi-major axis, mean
    radius_spread: float  # ratio of the largest to the smallest nucleus (pleomorphism)
    spacing: float  # centre-to-centre distance of neighbouring nuclei
    density: float  # fraction of the sites that hold a nucleus (0.25-1)
    arrangement: str  # one of ARRANGEMENTS
    aspect: float  # minor / major axis (1: round, 0.25: spindle)
    aligned: bool  # nuclei point along the fibre direction
    roughness: float  # outline irregularity
    darkness: float  # haematoxylin density of a nucleus
    chromatin: float  # mottling of the nuclei (vesicular vs solid)
    fibres: float  # contrast of eosinophilic fibres (0: none)
    fibre_width: float  # across a fibre
    waviness: float  # fibre undulation amplitude
    ground: float  # eosin density of the ground between nuclei
    ground_scale: float  # correlation length of the ground's texture
    ground_contrast: float  # its amplitude
    debris: float  # necrosis-like nuclear fragments (0: none, 1: many)
    haze: float  # diffuse haematoxylin (smudged, dying cells)
    gain_h: float  # stain mix of the class: haematoxylin multiplier
    gain_e: float  # eosin multiplier

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Appearance:
        return cls(**{f.name: data[f.name] for f in fields(cls)})


@dataclass(frozen=True)
class Task:
    """A random synthetic task: one :class:`Appearance` per class, the smallest region fraction of a
    layout, and the task's stain (hue rotation of both stain vectors in degrees, optical-density
    scale)."""

    seed: int
    difficulty: float
    classes: tuple[Appearance, ...]
    min_region: float
    hue: float
    stain: float

    def to_dict(self) -> dict:
        return {"seed": self.seed, "difficulty": self.difficulty, "min_region": self.min_region, "hue": self.hue,
                "stain": self.stain, "classes": [a.to_dict() for a in self.classes]}

    @classmethod
    def from_dict(cls, data: dict) -> Task:
        return cls(int(data["seed"]), float(data["difficulty"]),
                   tuple(Appearance.from_dict(a) for a in data["classes"]), float(data["min_region"]),
                   float(data["hue"]), float(data["stain"]))


def check_difficulty(difficulty: float) -> None:
    if not 0.0 <= difficulty <= 1.0:
        raise WsssError(f"--difficulty must be in [0, 1], not {difficulty:g}")


def _draw(rng: np.random.Generator, difficulty: float) -> Appearance:
    """One class appearance; finer textures at higher difficulty."""
    fine = 1.0 - 0.35 * difficulty
    radius = float(np.exp(rng.uniform(math.log(1.8), math.log(7.0)))) * fine
    arrangement = str(rng.choice(ARRANGEMENTS))
    packing = rng.uniform(2.2, 4.2) if arrangement != "scattered" else rng.uniform(3.0, 6.5)
    fibres = float(rng.choice([0.0, rng.uniform(0.35, 1.0)], p=[0.5, 0.5]))
    aspect = float(rng.choice([rng.uniform(0.7, 1.0), rng.uniform(0.25, 0.6)], p=[0.65, 0.35]))
    debris = float(rng.choice([0.0, rng.uniform(0.3, 1.0)], p=[0.75, 0.25]))
    return Appearance(
        radius=radius,
        radius_spread=float(rng.uniform(1.1, 1.8)),
        spacing=radius * packing,
        density=float(rng.uniform(0.4, 1.0)),
        arrangement=arrangement,
        aspect=aspect,
        aligned=bool(aspect < 0.6 or (fibres > 0 and rng.random() < 0.5)),
        roughness=float(rng.uniform(0.0, 0.3)),
        darkness=float(rng.uniform(0.65, 1.25)),
        chromatin=float(rng.uniform(0.0, 0.3)),
        fibres=fibres,
        fibre_width=float(rng.uniform(1.3, 3.5)) * fine,
        waviness=float(rng.uniform(0.0, 5.0)),
        ground=float(rng.uniform(0.3, 0.8)),
        ground_scale=float(rng.uniform(3.0, 30.0)),
        ground_contrast=float(rng.uniform(0.05, 0.3)),
        debris=debris,
        haze=float(rng.uniform(0.0, 0.25)) if debris > 0 else float(rng.uniform(0.0, 0.06)),
        gain_h=float(rng.uniform(0.8, 1.2)),
        gain_e=float(rng.uniform(0.85, 1.2)),
    )


def appearance_distance(a: Appearance, b: Appearance) -> float:
    """How different two appearances look, roughly in "clearly visible steps": 1 is about a 1.6×
    change of nuclear size, or nuclei at half the density, or fibres appearing. Euclidean over the
    properties a pathologist (or a small CNN) would see first."""
    terms = [
        1.5 * math.log2(a.radius / b.radius),
        1.0 * math.log2((a.spacing / a.radius) / (b.spacing / b.radius)),
        1.5 * (a.density - b.density),
        1.5 * (a.aspect - b.aspect),
        1.5 * (a.fibres - b.fibres),
        1.2 * (a.debris - b.debris),
        2.0 * (a.ground - b.ground),
        1.0 * (a.darkness * a.gain_h - b.darkness * b.gain_h),
        0.7 * (a.arrangement != b.arrangement),
    ]
    return float(math.sqrt(sum(t * t for t in terms)))


def min_distance(difficulty: float) -> float:
    """The least :func:`appearance_distance` between two classes of a task of this difficulty."""
    return 1.6 - 1.2 * difficulty


def sample_task(seed: int, num_classes: int, difficulty: float = DEFAULT_DIFFICULTY) -> Task:
    """The task of ``seed``: ``num_classes`` appearances, each at least :func:`min_distance` from the
    others (drawn in turn, redrawn until far enough). Pure given its arguments."""
    check_difficulty(difficulty)
    if num_classes < 1:
        raise WsssError("a task needs at least one class")
    rng = np.random.default_rng(np.random.SeedSequence(entropy=seed, spawn_key=(0x7A5C,)))
    wanted = min_distance(difficulty)
    classes: list[Appearance] = []
    for _ in range(num_classes):
        best, best_d = None, -1.0
        for _ in range(_MAX_TRIES):
            cand = _draw(rng, difficulty)
            d = min((appearance_distance(cand, c) for c in classes), default=math.inf)
            if d >= wanted:
                best = cand
                break
            if d > best_d:
                best, best_d = cand, d
        classes.append(best)
    return Task(seed=seed, difficulty=difficulty, classes=tuple(classes),
                min_region=0.04 - 0.025 * difficulty, hue=float(rng.uniform(-8.0, 8.0)),
                stain=float(rng.uniform(0.85, 1.15)))


# --------------------------------------------------------------------------- rendering


def render(app: Appearance, rng: np.random.Generator, size: int, zoom: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Haematoxylin and eosin densities ``(size, size)`` float32 of a region of class ``app``
    (the same contract as the fixed textures of :mod:`wsss.data.synth`)."""
    from wsss.data import synth as S

    s = size / S._REF_SIZE * zoom
    th = rng.uniform(0, np.pi)  # the tissue's direction (fibres, rows, aligned nuclei)
    cy, cx = _centres(app, rng, size, s, th)
    n = len(cy)
    r = app.radius * s
    lo, hi = r / math.sqrt(app.radius_spread), r * math.sqrt(app.radius_spread)
    theta = th + rng.normal(0, 0.15, n) if app.aligned else None
    aspect = (max(0.15, app.aspect * 0.85), min(1.0, app.aspect * 1.15))
    ink, owner = S._random_nuclei(rng, size, (cy, cx), (lo, hi), aspect, (app.roughness * 0.5, app.roughness), theta)
    dark = S._per_nucleus(rng.uniform(0.8, 1.2, n) * app.darkness, owner)
    chrom = 1.0 + app.chromatin * S._smooth_noise(rng, size, max(1.0, 1.2 * s))
    ground = app.ground * (1.0 + app.ground_contrast * S._smooth_noise(rng, size, app.ground_scale * s))
    h = 0.08 + ink * dark * chrom
    e = ground
    if app.fibres > 0:
        fib = _wavy_streaks(rng, size, th, app.fibre_width * s, app.waviness * s)
        e = ground * (1.0 - 0.6 * app.fibres) + app.fibres * 0.85 * (0.3 + 0.8 * fib)
        h = h + 0.08 * app.fibres * fib
    if app.debris > 0:
        frag = _fragments(rng, size, s, zoom, app.debris)
        h = h + 0.9 * frag
        ink = np.maximum(ink, frag)
    if app.haze > 0:
        h = h + app.haze * np.clip(1.0 + 0.6 * S._smooth_noise(rng, size, 15 * s), 0.1, None)
    e = e * (1.0 - 0.65 * ink)
    return (h * app.gain_h).astype(np.float32), (e * app.gain_e).astype(np.float32)


def _centres(app: Appearance, rng: np.random.Generator, size: int, s: float, th: float):
    """Nucleus centres ``(N,), (N,)`` (row, col) of the class's arrangement, spacing in px."""
    from wsss.data import synth as S

    sp = app.spacing * s
    if app.arrangement == "sheet":
        return S._grid_points(rng, size, sp, 0.2, keep=app.density)
    area = (size + 2 * sp) ** 2
    if app.arrangement == "scattered":
        k = rng.poisson(app.density * area / (sp * sp))
        return rng.uniform(-sp, size + sp, k), rng.uniform(-sp, size + sp, k)
    if app.arrangement == "clusters":
        per = 8
        k = rng.poisson(app.density * area / (sp * sp) / per) + 1
        ky, kx = rng.uniform(-sp, size + sp, k), rng.uniform(-sp, size + sp, k)
        m = rng.poisson(per, k) + 1
        spread = rng.normal(0, 1.1 * sp, (2, m.sum()))
        return np.repeat(ky, m) + spread[0], np.repeat(kx, m) + spread[1]
    # rows: lines along th, 1.8 spacings apart, nuclei one spacing apart along them
    gap = 1.8 * sp
    half = 0.75 * size + gap
    across = np.arange(-half, half, gap) + rng.uniform(0, gap)
    along = np.arange(-half, half, sp)
    vv, uu = np.meshgrid(across, along, indexing="ij")
    uu = uu + rng.normal(0, 0.15 * sp, uu.shape)
    vv = vv + rng.normal(0, 0.1 * sp, vv.shape)
    keep = rng.random(uu.shape) < app.density
    uu, vv = uu[keep], vv[keep]
    cy = uu * math.sin(th) + vv * math.cos(th) + size / 2
    cx = uu * math.cos(th) - vv * math.sin(th) + size / 2
    inside = (cy > -sp) & (cy < size + sp) & (cx > -sp) & (cx < size + sp)
    return cy[inside], cx[inside]


def _wavy_streaks(rng: np.random.Generator, size: int, th: float, width: float, amplitude: float) -> np.ndarray:
    """Fibres ``(size, size)`` in [0, 1] along direction ``th``, ``width`` px across, undulating by
    ``amplitude`` px."""
    from scipy import ndimage

    from wsss.data import synth as S

    along = 8.0 * width
    side = int(np.ceil(size * 1.5 + 2 * along + 2 * amplitude))
    base = S._aniso_noise(rng, side, side, width, along)
    u, v = S._rotated(size, th)
    wave = rng.uniform(40, 110) * size / S._REF_SIZE
    v = v - amplitude * np.sin(2 * np.pi * u / wave + rng.uniform(0, 2 * np.pi))
    dens = ndimage.map_coordinates(base, [v + side / 2, u + side / 2], order=1, mode="reflect")
    return (1.0 / (1.0 + np.exp(-2.2 * dens))).astype(np.float32)


def _fragments(rng: np.random.Generator, size: int, s: float, zoom: float, amount: float) -> np.ndarray:
    """Coverage ``(size, size)`` of small dark nuclear fragments (karyorrhexis), clumped."""
    from wsss.data import synth as S

    scale = (size / S._REF_SIZE / zoom) ** 2  # counts fall with the square of the zoom
    k = rng.poisson(amount * 25 * scale) + 1
    ky, kx = rng.uniform(0, size, k), rng.uniform(0, size, k)
    m = rng.poisson(6, k) + 1
    spread = rng.normal(0, 5 * s, (2, m.sum()))
    free = rng.poisson(amount * 80 * scale)
    cy = np.concatenate([np.repeat(ky, m) + spread[0], rng.uniform(0, size, free)])
    cx = np.concatenate([np.repeat(kx, m) + spread[1], rng.uniform(0, size, free)])
    ink, _ = S._random_nuclei(rng, size, (cy, cx), (0.7 * s, 1.6 * s), (0.4, 1.0), (0.1, 0.4))
    return ink
