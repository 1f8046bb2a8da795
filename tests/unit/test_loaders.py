"""The training loaders: uint8 images (and stage-2 masks) from the workers, normalised on the device
to the values of the PNGs; one DataLoader whose workers persist over epochs and still give every
epoch the batches a fresh, per-epoch seeded loader gives, so that a resumed run sees what an
uninterrupted one would."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from wsss.data.datasets import ClassificationDataset, DecodedCache, InputNorm, normalise
from wsss.data.layout import list_train
from wsss.data.seg_datasets import PseudoMaskDataset
from wsss.data.specs import LUAD
from wsss.runtime import Distributed, seed_worker
from wsss.stages.common import EpochLoader, device_images

IMAGENET = InputNorm((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def _expected_input(path: Path, size: int, norm: InputNorm) -> np.ndarray:
    """The model input of a patch by the definition: PIL bilinear resize, /255, minus mean, over std."""
    with Image.open(path) as img:
        rgb = np.asarray(img.convert("RGB").resize((size, size), Image.BILINEAR), dtype=np.float32)
    x = rgb / np.float32(255.0)
    x = (x - np.asarray(norm.mean, np.float32)) / np.asarray(norm.std, np.float32)
    return x.transpose(2, 0, 1)


def test_stage1_items_are_uint8_and_normalise_to_the_png_pixels(synth16):
    samples = list_train(synth16, LUAD)[:4]
    dataset = ClassificationDataset(samples, 24, None)
    x, y, index = next(iter(DataLoader(dataset, batch_size=4)))
    assert x.dtype == torch.uint8 and x.shape == (4, 3, 24, 24)
    assert torch.equal(y, torch.tensor([s.label for s in samples], dtype=torch.float32))
    got = device_images(x, IMAGENET, torch.device("cpu")).numpy()
    for i, sample in enumerate(samples):
        np.testing.assert_allclose(got[i], _expected_input(sample.path, 24, IMAGENET), rtol=0, atol=1e-6)
    # the same values as the float items of the evaluation path (to_tensor), to the bit
    floats = torch.stack([ClassificationDataset(samples, 24, IMAGENET)[i][0] for i in range(4)])
    assert torch.equal(normalise(x, IMAGENET), floats)


def test_stage2_items_are_uint8_images_and_masks_with_the_png_values(synth16):
    samples = list_train(synth16, LUAD)[:3]
    gt = [synth16 / "train_gt" / s.path.name for s in samples]
    dataset = PseudoMaskDataset(samples, [[p, p] for p in gt], None, None, LUAD, augment=False)
    x, masks, _ = next(iter(DataLoader(dataset, batch_size=3)))
    assert x.dtype == torch.uint8 and masks.dtype == torch.uint8 and masks.shape == (3, 2, 32, 32)
    for i, (sample, path) in enumerate(zip(samples, gt)):
        with Image.open(path) as img:
            want = np.asarray(img)
        assert np.array_equal(masks[i, 0].numpy(), want) and np.array_equal(masks[i, 1].numpy(), want)
        with Image.open(sample.path) as img:
            assert np.array_equal(x[i].permute(1, 2, 0).numpy(), np.asarray(img.convert("RGB")))


def _augmented(synth16: Path) -> ClassificationDataset:
    """Random d4 symmetries and stain jitter: every item draws from the RNG of whoever prepares it."""
    return ClassificationDataset(list_train(synth16, LUAD), None, None, augment=True, geometric="d4", stain=0.1)


def _fresh_loader_batches(dataset, workers: int, seed: int, epoch: int) -> list:
    """Epoch ``epoch`` as earlier wsss versions loaded it: a new shuffling DataLoader for the epoch, its
    generator seeded from the seed and the epoch, its workers seeded by torch from that generator."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    loader = DataLoader(dataset, batch_size=5, shuffle=True, num_workers=workers, worker_init_fn=seed_worker,
                        generator=generator)
    torch.manual_seed(1000 + epoch)  # the training loop's per-epoch reseeding (used without workers)
    return list(loader)


def _epoch_batches(loader: EpochLoader, epoch: int) -> list:
    torch.manual_seed(1000 + epoch)
    return list(loader.epoch(epoch))


def _same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for ba, bb in zip(a, b) for x, y in zip(ba, bb))


@pytest.mark.parametrize("workers", [0, 2])
def test_every_epoch_gives_the_batches_of_a_fresh_per_epoch_loader(synth16, workers):
    dataset = _augmented(synth16)
    loader = EpochLoader(dataset, 5, workers, 3, Distributed("cpu"), drop_last=False)
    assert len(loader) == 4
    for epoch in range(3):
        got = _epoch_batches(loader, epoch)
        assert _same(got, _fresh_loader_batches(dataset, workers, 3, epoch)), f"epoch {epoch}"
    loader.close()


def test_persistent_workers_give_a_resumed_run_the_batches_of_an_uninterrupted_one(synth16):
    dataset = _augmented(synth16)
    whole = EpochLoader(dataset, 5, 2, 7, Distributed("cpu"), drop_last=True)
    uninterrupted = [_epoch_batches(whole, epoch) for epoch in range(3)]
    resumed = EpochLoader(dataset, 5, 2, 7, Distributed("cpu"), drop_last=True)  # new workers, from epoch 2
    assert _same(_epoch_batches(resumed, 2), uninterrupted[2])
    assert not _same(uninterrupted[1], uninterrupted[2])  # epochs differ (order and augmentations)
    assert [len(b[0]) for b in uninterrupted[0]] == [5, 5, 5]  # drop_last: 16 patches, 3 full batches
    whole.close()
    resumed.close()


def test_uint8_items_are_mapped_onto_the_models_stain_target_in_the_workers(synth16):
    """With --stain-norm the workers send each patch already mapped onto the model's target (the uint8
    part of its input normalisation), as the evaluation path's to_tensor maps it; only the scaling is
    left for the device. One worker process: the target travels to it with the dataset."""
    from wsss.data.stain import StainNorm

    target = StainNorm("reinhard", lab_mean=(55.0, 25.0, -12.0), lab_std=(14.0, 7.0, 6.0))
    samples = list_train(synth16, LUAD)[:4]
    gt = [synth16 / "train_gt" / s.path.name for s in samples]
    stage1 = ClassificationDataset(samples, None, None, stain_norm=target)
    stage2 = PseudoMaskDataset(samples, [[p] for p in gt], None, None, LUAD, augment=False, stain_norm=target)
    changed = 0
    for dataset in (stage1, stage2):
        x = next(iter(DataLoader(dataset, batch_size=4, num_workers=1)))[0]
        assert x.dtype == torch.uint8
        for i, sample in enumerate(samples):
            with Image.open(sample.path) as img:
                pixels = np.asarray(img.convert("RGB"))
            assert np.array_equal(x[i].permute(1, 2, 0).numpy(), target(pixels))
            changed += not np.array_equal(x[i].permute(1, 2, 0).numpy(), pixels)
        floats = torch.stack([ClassificationDataset(samples, None, InputNorm(stain=target))[i][0] for i in range(4)])
        assert torch.equal(normalise(x, InputNorm()), floats)
    assert changed >= 4  # the target moved most patches' colours


# --------------------------------------------------------------------------- the decoded cache


def test_the_decoded_cache_holds_read_only_arrays_up_to_its_budget():
    reads = []

    def read(key: int) -> tuple[np.ndarray]:
        reads.append(key)
        return (np.full((4, 4), key, np.uint8),)  # 16 bytes

    cache = DecodedCache(budget=40)  # room for two
    got = [cache.get(key, lambda key=key: read(key))[0] for key in (0, 1, 2, 0, 1, 2)]
    assert reads == [0, 1, 2, 2]  # 0 and 1 kept; 2 would pass the budget and is read again
    assert [int(a[0, 0]) for a in got] == [0, 1, 2, 0, 1, 2]
    assert got[3] is got[0] and cache.used == 32
    with pytest.raises(ValueError):  # an augmentation writing into a kept array fails loudly
        got[3][0, 0] = 9
    assert DecodedCache.for_workers(0) is not None and DecodedCache.for_workers(2) is None


def _cacheable(synth16: Path, stage: int, cache: DecodedCache | None):
    """Every augmentation that may return its input unchanged (d4 identity, no blur drawn), mosaic,
    colour augmentation and a stain target: nothing may write into what it was given."""
    from wsss.data.augment import ColourAugment
    from wsss.data.stain import StainNorm

    samples = list_train(synth16, LUAD)
    colour = ColourAugment(hed_scale=0.1, light=0.1, blur=1.0, jpeg=60)
    target = StainNorm("reinhard", lab_mean=(55.0, 25.0, -12.0), lab_std=(14.0, 7.0, 6.0))
    if stage == 1:
        return ClassificationDataset(samples, None, None, augment=True, geometric="d4", colour=colour,
                                     stain_norm=target, cache=cache)
    gt = [synth16 / "train_gt" / s.path.name for s in samples]
    return PseudoMaskDataset(samples, [[p, p] for p in gt], None, None, LUAD, geometric="d4", mosaic=0.5,
                             colour=colour, stain_norm=target, cache=cache)


@pytest.mark.parametrize("stage", [1, 2])
def test_epochs_from_the_decoded_cache_give_the_items_of_epochs_read_from_disk(synth16, stage):
    plain, cached = _cacheable(synth16, stage, None), _cacheable(synth16, stage, DecodedCache())
    for epoch in range(3):  # the first epoch fills the cache, the next ones read from it
        torch.manual_seed(epoch)
        want = [plain[i] for i in range(len(plain))]
        torch.manual_seed(epoch)
        got = [cached[i] for i in range(len(cached))]
        assert all(torch.equal(a, b) for w, g in zip(want, got) for a, b in zip(w[:2], g[:2])), f"epoch {epoch}"
    assert len(cached.cache.items) == len(cached)
