"""Datasets of stage 2: training patches with their pseudo-masks, and evaluation patches seen by
several models at once (the segmenter and, for the gate, the stage-1 classifier)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter
from torch.utils.data import Dataset

from wsss.data import augment
from wsss.data.datasets import DecodedCache, InputNorm, cached, quadrants, read_masked, resize_mask, resize_rgb, to_tensor, to_uint8_tensor
from wsss.data.layout import MaskedSample, TrainSample, pseudo_mask_path
from wsss.data.png import check_mask_values, read_mask, read_rgb
from wsss.data.specs import DatasetSpec
from wsss.data.stain import StainNorm
from wsss.errors import WsssError


def pseudo_mask_paths(
    samples: Sequence[TrainSample], pm_dir: Path, layers: Sequence[str], dataset: str = "DATASET"
) -> list[list[Path]]:
    """``[[PM_DIR/PM_<layer>/<name>.png for layer in layers] for each sample]``; raises WsssError
    naming the first missing file and how to make the pseudo-masks."""
    paths = [[pseudo_mask_path(pm_dir, layer, s.path) for layer in layers] for s in samples]
    missing = [p for row in paths for p in row if not p.is_file()]
    if missing:
        raise WsssError(
            f"pseudo-mask missing: {missing[0]} ({len(missing)} of {len(samples) * len(layers)} missing); "
            f"make them with `wsss generate-pm --dataset {dataset} --data DATA --checkpoint STAGE1.pth --out {pm_dir}` "
            "or choose other --pm-layers / --pm-dir"
        )
    return paths


def flip_and_blur(image: np.ndarray, masks: np.ndarray, geometric: str = "hflip",
                  stain: float = 0.0, colour: augment.ColourAugment | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Stage-2 augmentation, drawn from torch's RNG (seeded per worker and epoch).

    ``geometric="hflip"`` is the reference's: image (H, W, 3) and masks (L, H, W) flipped left-right
    together with p = 0.5. ``"d4"``: a random one of the square's eight symmetries, applied to both
    (:func:`wsss.data.augment.geometric`). Then HED stain jitter of strength ``stain`` (0: none) and
    the ``colour`` augmentation of the image, and, as the reference, the image alone blurred with
    p = 0.5 by a Gaussian of radius uniform in [0, 1).
    """
    if geometric == "d4":
        image, *planes = augment.geometric([image, *masks], "d4")
        masks = np.stack(planes)
    elif torch.rand(()) < 0.5:
        image = image[:, ::-1]
        masks = masks[:, :, ::-1]
    image = augment.stain_jitter(np.ascontiguousarray(image), stain)
    image = augment.colour(image, colour)
    if torch.rand(()) < 0.5:
        radius = float(torch.rand(()))
        image = np.asarray(Image.fromarray(np.ascontiguousarray(image)).filter(ImageFilter.GaussianBlur(radius)))
    return np.ascontiguousarray(image), np.ascontiguousarray(masks)


def compose_mosaic(images: Sequence[np.ndarray], masks: Sequence[np.ndarray], cut: tuple[int, int]
                   ) -> tuple[np.ndarray, np.ndarray]:
    """A 2×2 mosaic of four equally sized patches, cut at ``cut = (row, col)``.

    ``images[i]`` (H, W, 3) and ``masks[i]`` (L, H, W); quadrant ``i`` (top-left, top-right,
    bottom-left, bottom-right) is the same region of patch ``i``, at its own scale, with its masks.
    """
    image = np.empty_like(images[0])
    mask = np.empty_like(masks[0])
    for (rows, cols), im, ms in zip(quadrants(*cut), images, masks):
        image[rows, cols] = im[rows, cols]
        mask[:, rows, cols] = ms[:, rows, cols]
    return image, mask


class PseudoMaskDataset(Dataset):
    """Training patches with one pseudo-mask per layer.

    Item: ``(image (3, S, S) float, masks (L, S, S) long, index)``; with ``norm`` None the image and the
    masks are uint8 (a sixth of the bytes), the image mapped onto the stain target ``stain_norm`` (if
    given) and to be scaled on the device (:func:`wsss.data.datasets.normalise`). Image resized bilinearly and masks
    by nearest neighbour to ``image_size`` (``None``: the patches' own size), after augmentation.
    Mask values are tissue classes ``0..C-1`` or the spec's background index (ignored by the loss);
    any other value is an error naming the file. Pseudo-masks (and the synthetic ``train_gt``
    masks used as the upper bound) are palette PNGs of values, whatever the spec's mask encoding.
    ``cache``: patches and masks as read (and checked), kept for the next epochs
    (:class:`wsss.data.datasets.DecodedCache`).
    """

    def __init__(
        self,
        samples: Sequence[TrainSample],
        mask_paths: Sequence[Sequence[Path]],
        image_size: int | None,
        norm: InputNorm | None,
        spec: DatasetSpec,
        augment: bool = True,
        geometric: str = "hflip",
        stain: float = 0.0,
        mosaic: float = 0.0,
        colour: augment.ColourAugment | None = None,
        stain_norm: StainNorm | None = None,
        cache: DecodedCache | None = None,
    ) -> None:
        self.samples = list(samples)
        self.mask_paths = [list(row) for row in mask_paths]
        self.cache = cache
        self.image_size = image_size
        self.norm = norm
        self.spec = spec
        self.augment = augment
        self.geometric = geometric
        self.stain = stain
        self.mosaic = mosaic
        self.colour = colour
        self.stain_norm = stain_norm
        # Patches with one class: their pseudo-masks are exact (that class, or background on white).
        self.single = [i for i, sample in enumerate(self.samples) if sum(sample.label) == 1]

    def __len__(self) -> int:
        return len(self.samples)

    def _masks(self, index: int, shape: tuple[int, int]) -> np.ndarray:
        masks = []
        for path in self.mask_paths[index]:
            mask = read_mask(path)
            if mask.shape != shape:
                raise WsssError(f"pseudo-mask {path} is {mask.shape[1]}×{mask.shape[0]}, its patch {shape[1]}×{shape[0]}")
            check_mask_values(mask, self.spec, path)
            masks.append(mask)
        return np.stack(masks)

    def _read(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        def read() -> tuple[np.ndarray, np.ndarray]:
            image = read_rgb(self.samples[index].path)
            return image, self._masks(index, image.shape[:2])

        return cached(self.cache, index, read)

    def __getitem__(self, index: int):
        image, masks = self._read(index)
        if self.augment and self.mosaic > 0 and len(self.single) >= 2 and float(torch.rand(())) < self.mosaic:
            image, masks = self._mosaic(image.shape[:2]) or (image, masks)
        if self.augment:
            image, masks = flip_and_blur(image, masks, self.geometric, self.stain, self.colour)
        image = resize_rgb(image, self.image_size)
        masks = np.stack([resize_mask(m, self.image_size) for m in masks])
        if self.norm is None:
            return to_uint8_tensor(image, self.stain_norm), torch.from_numpy(masks.astype(np.uint8)), index
        return to_tensor(image, self.norm), torch.from_numpy(masks.astype(np.int64)), index


    def _mosaic(self, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray] | None:
        """Four random single-class patches of ``shape`` cut together (PistoSeg-style mosaic); their
        masks are exact labels. None when the draw holds a patch of another size."""
        picks = [self.single[int(i)] for i in torch.randint(len(self.single), (4,))]
        parts = [self._read(i) for i in picks]
        if any(im.shape[:2] != tuple(shape) for im, _ in parts):
            return None
        h, w = shape
        cut = (int(torch.randint(h // 4, h - h // 4 + 1, ())), int(torch.randint(w // 4, w - w // 4 + 1, ())))
        return compose_mosaic([im for im, _ in parts], [ms for _, ms in parts], cut)


class MultiViewMaskedDataset(Dataset):
    """Evaluation patches prepared for several models, each with its own input size and scaling.

    Item: ``(views, mask (H, W) long at the mask's own size, index)`` where ``views[i]`` is the image
    as ``(3, S_i, S_i)`` for ``sizes[i]`` / ``norms[i]`` (size ``None``: unresized).
    """

    def __init__(self, samples: Sequence[MaskedSample], sizes: Sequence[int | None], norms: Sequence[InputNorm],
                 spec: DatasetSpec) -> None:
        if len(sizes) != len(norms):
            raise ValueError("one size per normalisation")
        self.samples = list(samples)
        self.sizes = list(sizes)
        self.norms = list(norms)
        self.spec = spec

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        image, mask = read_masked(self.samples[index], self.spec)
        views = tuple(to_tensor(resize_rgb(image, s), n) for s, n in zip(self.sizes, self.norms))
        return views, torch.from_numpy(mask.astype(np.int64)), index
