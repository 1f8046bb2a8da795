"""``--stain-norm reinhard-set``: one CIE LAB shift per set (the training set's mean colour minus the
set's), checked against LAB computed from its definition in the test (colour_oracle); the training set
shifted by exactly zero (training identical to ``none``); every command that runs a model measuring its
own set; the export's sidecar saying what the graph does not do."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from colour_oracle import srgb_to_lab
from helpers import run_cli
from wsss.config import Stage1Config, Stage2Config
from wsss.data import stain, synth
from wsss.data.datasets import InputNorm
from wsss.data.specs import LUAD
from wsss.data.stain import StainNorm
from wsss.errors import WsssError
from wsss.models import loading
from wsss.models.deeplab import DeepLabArch, DeepLabV3Plus
from wsss.models.resnet38 import ResNet38Classifier
from wsss.runtime import load_checkpoint, save_checkpoint
from wsss.stages import stage1, stage2

TARGET = (62.0, 24.0, -12.0)  # far from any synthetic look: every set gets a visible shift
SPREAD = (1.0, 1.0, 1.0)  # a narrow training set: any such shift is significant


def patch(seed: int, look: str = "default", size: int = 48) -> np.ndarray:
    return synth.make_patch(np.random.default_rng(seed), size, synth.LOOKS[look])[0]


def oracle_glass(image) -> np.ndarray:
    """Flat bool: glass, a luma (0.299 R + 0.587 G + 0.114 B) above 200 with max - min of R, G, B at most 16."""
    pixels = image.reshape(-1, 3)
    luma = pixels.astype(float) @ np.array([0.299, 0.587, 0.114])
    return (luma > 200) & (pixels.max(1).astype(int) - pixels.min(1) <= 16)


def oracle_tissue_means(images, glass_of=None) -> np.ndarray:
    """Each image's mean L*, a*, b* (from the definition) over its tissue pixels (not
    :func:`oracle_glass`; of the images ``glass_of`` when given), for the images with at least 1% of the
    pixels at most 219 in every channel (OD >= 0.15)."""
    means = []
    for im, ref in zip(images, glass_of or images):
        if (ref.reshape(-1, 3) <= 219).all(1).mean() < 0.01:
            continue
        means.append(srgb_to_lab(im).reshape(-1, 3)[~oracle_glass(ref)].mean(axis=0))
    return np.stack(means)


def oracle_set_mean(images, glass_of=None) -> np.ndarray:
    """The set's colour: the mean over ``images`` of :func:`oracle_tissue_means`."""
    return oracle_tissue_means(images, glass_of).mean(axis=0)


def test_a_set_is_shifted_onto_the_reference_and_keeps_the_differences_between_its_patches():
    reference = [patch(s) for s in range(20)]
    target = stain.fit("reinhard-set", reference, "default look")
    assert np.allclose(target.lab_mean, oracle_set_mean(reference), atol=0.1)

    other = [patch(s, "lab-b") for s in range(100, 120)]
    bound = target.for_set(stain.measure_set(other), "lab-b")
    assert np.allclose(bound.set_shift, np.asarray(target.lab_mean) - oracle_set_mean(other), atol=0.1)
    out = [bound(im) for im in other]
    # the set's tissue now has the reference's mean colour (the shifted patches' own means over the
    # pixels that were tissue, from the definition)...
    assert np.allclose(oracle_set_mean(out, glass_of=other), target.lab_mean, atol=0.6)
    # ... and each patch kept what told it apart: its mean colour minus the set's, and its spread
    before = np.stack([srgb_to_lab(im).reshape(-1, 3).mean(0) for im in other])
    after = np.stack([srgb_to_lab(im).reshape(-1, 3).mean(0) for im in out])
    assert np.abs((after - after.mean(0)) - (before - before.mean(0))).max() < 0.8
    spread = lambda ims: np.stack([srgb_to_lab(im).reshape(-1, 3).std(0) for im in ims])
    assert np.abs(spread(out) - spread(other)).max() < 0.8
    assert np.abs(before.mean(0) - after.mean(0)).max() > 3  # it did move


def test_a_set_is_shifted_only_when_its_mean_is_significantly_off_the_training_sets():
    """z: the per-channel difference over its standard error, spread × sqrt(1/n + 1/n_reference) with n
    the set's size capped at 32, computed here by hand; shifted when the norm of z exceeds 4.03 (chi,
    3 dof, 0.999)."""
    target = StainNorm("reinhard-set", lab_mean=(60.0, 20.0, -10.0), lab_std=(8.0, 6.0, 4.0), patches=200, source="t")
    for n in (10 ** 4, 32):  # any set of 32 or more patches is judged as one of 32
        se = np.array([8.0, 6.0, 4.0]) * np.sqrt(1 / 32 + 1 / 200)  # (1.52, 1.14, 0.76)
        for offset, shifted in (((3.0, -0.6, 1.6), False),  # |z| = 2.9: a test split's sampling noise
                                ((3.4, 5.9, 6.4), True),  # |z| = 10.1: another lab
                                ((5.6, 1.0, 1.0), False),  # |z| = 4.00
                                ((5.7, 1.0, 1.0), True)):  # |z| = 4.06
            assert (np.linalg.norm(np.asarray(offset) / se) > 4.03) == shifted  # the case is what it says
            mean = tuple(np.asarray(target.lab_mean) - offset)
            bound = target.for_set(stain.SetColour(mean, n, n, (8.0, 6.0, 4.0)), f"a set of {n}")
            assert np.allclose(bound.set_shift, offset if shifted else (0, 0, 0))


def saved_patches(folder: Path, n: int) -> list[Path]:
    """Default-look patches of seeds 0..n-1 written as PNGs into ``folder``."""
    paths = [folder / f"p{s}.png" for s in range(n)]
    for s, path in enumerate(paths):
        Image.fromarray(patch(s)).save(path)
    return paths


def test_a_sets_colour_does_not_depend_on_how_much_glass_its_windows_hold():
    """A slide's windows at its tissue's edge are mostly glass: the same tissue with glass beside it
    has the same colour, so the shift does not depend on --min-tissue, --roi or the scale."""
    tissue = [patch(s) for s in range(30)]
    rng = np.random.default_rng(0)
    edged = []
    for im in tissue:
        im = im.copy()
        im[:, : im.shape[1] * 3 // 4] = 236 + rng.integers(-4, 5, (im.shape[0], im.shape[1] * 3 // 4, 1))  # glass
        edged.append(im)
    target = StainNorm("reinhard-set", lab_mean=TARGET, lab_std=SPREAD, patches=50, source="t", pixels="tissue")
    whole = target.for_set(stain.measure_set(tissue), "tissue").set_shift
    edges = target.for_set(stain.measure_set(edged), "edges").set_shift
    assert np.allclose(whole, np.asarray(TARGET) - oracle_set_mean(tissue), atol=0.1)
    assert np.allclose(edges, np.asarray(TARGET) - oracle_set_mean(edged), atol=0.1)
    assert np.abs(np.subtract(whole, edges)).max() < 1.5  # the glass moved the all-pixel mean by far more:
    all_pixels = lambda ims: np.mean([srgb_to_lab(im).reshape(-1, 3).mean(0) for im in ims], axis=0)
    assert np.abs(all_pixels(tissue) - all_pixels(edged)).max() > 10


def test_a_reference_recorded_before_tissue_pixels_measures_sets_over_all_pixels():
    """Checkpoints written before the reference left glass out record no ``pixels``: their sets are
    measured as their reference was, each patch's mean over all its pixels; ``pixels`` round-trips."""
    images = [patch(s, "lab-b") for s in range(100, 120)]
    all_pixels = np.mean([srgb_to_lab(im).reshape(-1, 3).mean(0) for im in images], axis=0)
    assert np.abs(all_pixels - oracle_set_mean(images)).max() > 0.3  # the two measures differ on this set
    old = {"method": "reinhard-set", "lab_mean": list(TARGET), "lab_std": list(SPREAD), "patches": 50, "source": "t"}
    bound = StainNorm.from_dict(old).for_set(stain.measure_set(images), "lab-b")
    assert np.allclose(bound.set_shift, np.asarray(TARGET) - all_pixels, atol=0.1)
    new = StainNorm.from_dict({**old, "pixels": "tissue"})
    assert new.to_dict()["pixels"] == "tissue" and StainNorm.from_dict(new.to_dict()) == new
    assert np.allclose(new.for_set(stain.measure_set(images), "lab-b").set_shift,
                       np.asarray(TARGET) - oracle_set_mean(images), atol=0.1)
    with pytest.raises(WsssError, match="malformed"):
        StainNorm.from_dict({**old, "pixels": "glass"})


def test_a_sample_of_the_training_look_is_left_as_it_is_and_another_labs_is_shifted(tmp_path):
    paths = saved_patches(tmp_path, 60)
    target = stain.fit_training_set("reinhard-set", paths, None)
    assert np.allclose(target.lab_std, oracle_tissue_means([patch(s) for s in range(60)]).std(0), atol=0.1)
    assert target.pixels == "tissue"
    same = target.for_set(stain.measure_set(patch(s) for s in range(500, 540)), "more default-look patches")
    assert same.set_shift == (0.0, 0.0, 0.0)
    other = target.for_set(stain.measure_set(patch(s, "lab-b") for s in range(500, 540)), "lab-b")
    assert np.linalg.norm(other.set_shift) > 5


def test_the_training_set_itself_is_shifted_by_exactly_zero_and_left_as_it_is(tmp_path):
    paths = saved_patches(tmp_path, 30)
    target = stain.fit_training_set("reinhard-set", paths, None)
    bound = target.for_set(stain.measure_paths(paths, None), "the training set")
    assert bound.set_shift == (0.0, 0.0, 0.0)
    image = patch(3)
    assert bound(image) is image


def test_too_small_a_set_and_glass_are_left_as_they_are(caplog):
    caplog.set_level("INFO")
    target = StainNorm("reinhard-set", lab_mean=TARGET, lab_std=SPREAD, patches=50, source="t")
    few = [patch(s, "lab-b") for s in range(stain.MIN_SET_PATCHES - 1)]
    bound = target.for_set(stain.measure_set(few), "a few patches")
    assert bound.set_shift == (0.0, 0.0, 0.0) and "needed to measure a set's colour; not shifted" in caplog.text
    assert all(np.array_equal(bound(im), im) for im in few)
    glass = np.full((40, 40, 3), 243, np.uint8)
    many = [patch(s) for s in range(20)]
    moved = target.for_set(stain.measure_set([*many, glass]), "a set with glass")
    assert moved.set_shift == target.for_set(stain.measure_set(many), "the same without").set_shift  # left out
    assert np.array_equal(moved(glass), glass)  # and passes through unchanged


def test_an_unbound_target_is_refused_and_the_shift_is_never_stored():
    target = StainNorm("reinhard-set", lab_mean=TARGET, lab_std=SPREAD, patches=50, source="t")
    with pytest.raises(WsssError, match="before its set's colour was measured"):
        target.transform(patch(0))
    bound = target.for_set(stain.SetColour((50.0, 10.0, 0.0), 40, 40, (1.0, 1.0, 1.0)))
    d = InputNorm(stain=bound).to_dict()
    assert "set_shift" not in d["stain"] and InputNorm.from_dict(d).stain == target


# --------------------------------------------------------------------------- every command measures its set


@pytest.fixture(scope="module")
def set_ckpts(tmp_path_factory) -> dict[str, Path]:
    """Untrained thin checkpoints with reinhard-set targets: stage 1 (tagged "stage 1") and stage 2."""
    root = tmp_path_factory.mktemp("set_ckpts")
    torch.manual_seed(0)
    cfg1 = Stage1Config(dataset="luad", data=Path("."), width=0.125, image_size=32, stain_norm="reinhard-set")
    s1 = root / "s1.pth"
    target = lambda tag: StainNorm("reinhard-set", lab_mean=TARGET, lab_std=SPREAD, patches=9, source=tag,
                                   pixels="tissue")
    save_checkpoint(s1, stage1.checkpoint_state(ResNet38Classifier(4, width=0.125), cfg1, LUAD, 0,
                                                InputNorm(stain=target("stage 1"))))
    cfg2 = Stage2Config(dataset="luad", data=Path("."), backbone="resnet18", head_channels=8, image_size=32,
                        stain_norm="reinhard-set")
    s2 = root / "s2.pth"
    save_checkpoint(s2, stage2.checkpoint_state(DeepLabV3Plus(DeepLabArch("resnet18", 16, 4, 8)), cfg2, LUAD, 0, {},
                                                InputNorm(stain=target("stage 2"))))
    return {"s1": s1, "s2": s2}


@pytest.fixture
def shifts(monkeypatch) -> list[tuple[str, tuple | None]]:
    """``(source, set_shift)`` of every stain step applied; sets of 2 stained patches are measured."""
    monkeypatch.setattr(stain, "MIN_SET_PATCHES", 2)
    calls = []
    original = StainNorm.__call__

    def recording(self, image):
        calls.append((self.source, self.set_shift))
        return original(self, image)

    monkeypatch.setattr(StainNorm, "__call__", recording)
    return calls


def expected_shift(images) -> tuple:
    return tuple(np.asarray(TARGET) - oracle_set_mean(images))


def assert_shifts(calls, source: str, images, count: int) -> None:
    mine = [shift for s, shift in calls if s == source]
    assert len(mine) == count
    assert all(np.allclose(shift, expected_shift(images), atol=0.1) for shift in mine), (mine[0], expected_shift(images))


def read(paths) -> list[np.ndarray]:
    return [np.asarray(Image.open(p).convert("RGB")) for p in sorted(paths)]


def test_eval_cam_generate_pm_and_evaluate_measure_the_split_they_run_on(synth16, set_ckpts, shifts, tmp_path, capsys,
                                                                          monkeypatch):
    code, _, err = run_cli(capsys, monkeypatch, "eval-cam", "--data", synth16, "--checkpoint", set_ckpts["s1"],
                           "--split", "val", "--device", "cpu")
    assert code == 0, err
    assert_shifts(shifts, "stage 1", read((synth16 / "val" / "img").glob("*.png")), 4)
    shifts.clear()
    code, _, err = run_cli(capsys, monkeypatch, "generate-pm", "--data", synth16, "--checkpoint", set_ckpts["s1"],
                           "--out", tmp_path / "pm", "--workers", 0, "--device", "cpu")
    assert code == 0, err
    assert_shifts(shifts, "stage 1", read((synth16 / "train").glob("*.png")), 16)
    shifts.clear()
    code, _, err = run_cli(capsys, monkeypatch, "evaluate", "--data", synth16, "--checkpoint", set_ckpts["s2"],
                           "--gate", "--stage1-checkpoint", set_ckpts["s1"], "--device", "cpu")
    assert code == 0, err
    test = read((synth16 / "test" / "img").glob("*.png"))
    assert_shifts(shifts, "stage 1", test, 4)
    assert_shifts(shifts, "stage 2", test, 4)


def test_predict_measures_its_images_and_predict_wsi_each_slide(set_ckpts, shifts, tmp_path, capsys, monkeypatch):
    images = [patch(1, size=64), patch(2, "lab-b", size=64)]
    for i, image in enumerate(images):
        Image.fromarray(image).save(tmp_path / f"im{i}.png")
    gate = ("--gate", "--stage1-checkpoint", set_ckpts["s1"], "--checkpoint", set_ckpts["s2"], "--tile", 32,
            "--overlap", 0, "--device", "cpu")
    code, _, err = run_cli(capsys, monkeypatch, "predict", tmp_path / "im0.png", tmp_path / "im1.png",
                           "--out", tmp_path / "p", *gate)
    assert code == 0, err
    windows = [im[r:r + 32, c:c + 32] for im in images for r in (0, 32) for c in (0, 32)]
    assert_shifts(shifts, "stage 2", windows, 8)  # both images are one set
    assert_shifts(shifts, "stage 1", windows, 8)
    slides = tmp_path / "slides"
    slides.mkdir()
    for i, image in enumerate(images):
        tifffile.imwrite(slides / f"slide{i}.tif", image, tile=(32, 32), photometric="rgb")
    shifts.clear()
    code, _, err = run_cli(capsys, monkeypatch, "predict-wsi", slides, "--out", tmp_path / "cohort",
                           "--min-tissue", 0, *gate)
    assert code == 0, err
    for i, image in enumerate(images):  # each slide its own set
        own = [image[r:r + 32, c:c + 32] for r in (0, 32) for c in (0, 32)]
        assert sum(np.allclose(s, expected_shift(own), atol=0.1) for _, s in shifts) == 8


def test_train_stage1_with_reinhard_set_trains_exactly_as_none_and_records_the_reference(synth16, tmp_path, capsys,
                                                                                         monkeypatch):
    weights = {}
    for method in ("none", "reinhard-set"):
        out = tmp_path / method
        code, _, err = run_cli(capsys, monkeypatch, "train-stage1", "--dataset", "luad", "--data", synth16, "--preset",
                               "cpu", "--image-size", 32, "--epochs", 1, "--out", out, "--stain-norm", method,
                               "--refit-epochs", 0, "--device", "cpu", "--seed", 3)
        assert code == 0, err
        weights[method] = load_checkpoint(out / "stage1_checkpoint_trained_on_luad.pth")
    for key, value in weights["none"]["model"].items():
        assert torch.equal(value, weights["reinhard-set"]["model"][key]), key
    recorded = weights["reinhard-set"]["input_norm"]["stain"]
    train = read((synth16 / "train").glob("*.png"))
    assert recorded["method"] == "reinhard-set" and np.allclose(recorded["lab_mean"], oracle_set_mean(train), atol=0.1)


def test_export_leaves_the_shift_to_the_caller_and_says_so(set_ckpts, tmp_path, capsys, monkeypatch):
    out = tmp_path / "m.pt"
    code, _, err = run_cli(capsys, monkeypatch, "export", set_ckpts["s2"], "--format", "torchscript", "--out", out)
    assert code == 0, err
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["input"]["stain"]["in_graph"] is False
    assert sidecar["input"]["stain"]["lab_mean"] == list(TARGET)
    assert "set's mean" in sidecar["input"]["stain"]["meaning"]
    # the whole rule, significance included (docs/stain.md: z above 4.03, a set counted as 32 at most)
    assert "above 4.03" in sidecar["input"]["stain"]["meaning"] and "32 at most" in sidecar["input"]["stain"]["meaning"]
    # ... and which pixels a patch's mean is over: these checkpoints' references are of tissue pixels
    assert sidecar["input"]["stain"]["pixels"] == "tissue"
    assert "over its tissue pixels (glass left out: ITU-R 601 grey above 200 with max - min of R, G, B at most 16)" \
        in sidecar["input"]["stain"]["meaning"]


def test_the_python_api_measures_the_image_or_patches_of_each_call(set_ckpts, shifts):
    from wsss import api

    image = patch(5, "lab-b", size=64)
    api.load_model(set_ckpts["s2"], set_ckpts["s1"], device="cpu", tile=32, overlap=0).predict(image)
    own = [image[r:r + 32, c:c + 32] for r in (0, 32) for c in (0, 32)]
    assert_shifts(shifts, "stage 2", own, 4)
    shifts.clear()
    patches = [patch(s, "pale", size=32) for s in range(3)]
    api.load_classifier(set_ckpts["s1"], device="cpu").classify(patches)
    assert_shifts(shifts, "stage 1", patches, 3)


def test_figures_measure_the_split_their_patches_come_from(synth16, set_ckpts, shifts, tmp_path):
    from wsss import figures

    figures.cam_figure(LUAD, synth16, set_ckpts["s1"], tmp_path / "cams.png")
    train = read((synth16 / "train").glob("*.png"))
    assert shifts and all(np.allclose(s, expected_shift(train), atol=0.1) for _, s in shifts)
    shifts.clear()
    figures.examples_figure(LUAD, synth16, set_ckpts["s1"], {}, tmp_path / "examples.png", n=2)
    test = read((synth16 / "test" / "img").glob("*.png"))
    assert shifts and all(np.allclose(s, expected_shift(test), atol=0.1) for _, s in shifts)
