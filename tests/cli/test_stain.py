"""Stain normalisation as a model property: what the normalisers compute (checked against the
Beer-Lambert and CIE LAB definitions and against torchstain), the target stored in checkpoints, every
command that runs a model applying that model's own target, and bad targets ending in one line."""

from __future__ import annotations

import os
import shutil
import struct
import threading
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from helpers import assert_one_line_error, interrupt_at_epoch, run_cli
from colour_oracle import srgb_to_lab, stain_od
from wsss.models import loading
from wsss.config import Stage1Config, Stage2Config
from wsss.data import stain, synth
from wsss.data.datasets import InputNorm
from wsss.data.specs import LUAD
from wsss.data.stain import StainNorm
from wsss.models.deeplab import DeepLabArch, DeepLabV3Plus
from wsss.models.resnet38 import ResNet38Classifier
from wsss.runtime import load_checkpoint, save_checkpoint
from wsss.stages import stage1, stage2

SIZE = 96


def patch(seed: int, look: str = "default", size: int = SIZE) -> tuple[np.ndarray, np.ndarray]:
    return synth.make_patch(np.random.default_rng(seed), size, synth.LOOKS[look])


@pytest.fixture(scope="module")
def default_targets() -> dict[str, StainNorm]:
    """Macenko, Reinhard and Reinhard-means targets fitted on 40 default-look patches (seeds 100-139)."""
    images = [patch(seed)[0] for seed in range(100, 140)]
    return {method: stain.fit(method, images, "default look") for method in ("macenko", "reinhard", "reinhard-mean")}


# --------------------------------------------------------------------------- what the normalisers compute


@pytest.mark.parametrize("method, look, tolerance", [
    ("macenko", "lab-b", 0.2), ("macenko", "dark", 0.05),
    ("reinhard", "lab-b", 0.05), ("reinhard", "dark", 0.05), ("reinhard", "pale", 0.05),
])
def test_normalising_another_look_gives_the_stain_densities_of_the_training_look(default_targets, method, look,
                                                                                 tolerance):
    """The same 20 tissue patches in two looks. With normalisation the model trains on normalised
    default-look patches; normalised, the other look's mean H and E densities are theirs (within
    ``tolerance``), which the raw patches were far from (30-100%). Macenko on pale is not in the list:
    with weak eosin fewer pixels pass its stained-in-every-channel rule and H ends 42% low (docs/stain.md)."""
    target = default_targets[method]
    training, before, after, raw = [], [], [], []
    for seed in range(20):
        image, mask = patch(seed)
        other, _ = patch(seed, look)
        raw.append(stain_od(image, mask))
        training.append(stain_od(target(image), mask))
        before.append(stain_od(other, mask))
        after.append(stain_od(target(other), mask))
    raw, training, before, after = (np.mean(v, axis=0) for v in (raw, training, before, after))
    assert np.abs(before / raw - 1).max() > 0.3  # the look really differs
    assert np.abs(after / training - 1).max() < tolerance


def test_reinhard_gives_each_patch_the_targets_lab_mean_and_spread(default_targets):
    target = default_targets["reinhard"]
    for seed in range(5):
        other, _ = patch(seed, "lab-b")
        lab = srgb_to_lab(target(other)).reshape(-1, 3)
        # within the rounding of the 8-bit output (and torchstain's truncation towards 0); the spread a
        # little less where mapped colours leave the sRGB gamut and are clipped (up to 10% measured)
        np.testing.assert_allclose(lab.mean(axis=0), target.lab_mean, atol=1.0)
        np.testing.assert_allclose(lab.std(axis=0), target.lab_std, rtol=0.15)


def test_reinhard_mean_gives_each_patch_the_targets_lab_mean_and_keeps_its_own_spread(default_targets):
    """``reinhard-mean`` moves each LAB channel's mean onto the target's (as Reinhard) and leaves the
    patch's spread as it was (what full Reinhard replaces by the target's): LAB from the CIE
    definition, computed in the test."""
    target, full = default_targets["reinhard-mean"], default_targets["reinhard"]
    assert target.lab_mean == full.lab_mean and target.lab_std == full.lab_std  # the same fit
    spreads_differ = 0
    for seed in range(5):
        other, _ = patch(seed, "lab-b")
        before = srgb_to_lab(other).reshape(-1, 3)
        lab = srgb_to_lab(target(other)).reshape(-1, 3)
        np.testing.assert_allclose(lab.mean(axis=0), target.lab_mean, atol=1.0)
        np.testing.assert_allclose(lab.std(axis=0), before.std(axis=0), rtol=0.1)
        spreads_differ += not np.allclose(before.std(axis=0), target.lab_std, rtol=0.1)
    assert spreads_differ >= 3  # the patches' own spreads are not the target's: the test tells the two apart


@pytest.mark.parametrize("method", ["reinhard", "reinhard-mean"])
def test_the_graph_form_maps_each_image_of_a_batch_as_the_patch_path_does(default_targets, method):
    """What ``wsss export`` puts in the graph: torch operations on a float batch, each image on its own.
    Against the CIE LAB definition (computed in the test): each image's mean onto the target, the spread
    the target's or the image's own; a glass image passes through unchanged."""
    target = default_targets[method]
    images = [patch(seed, look)[0] for seed, look in ((0, "lab-b"), (1, "dark"), (2, "pale"))]
    images.append(np.full((SIZE, SIZE, 3), 240, dtype=np.uint8))
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()
    out = stain.ReinhardGraph(target)(x).permute(0, 2, 3, 1).numpy()
    assert np.array_equal(out[-1], images[-1])
    for image, mapped in zip(images[:-1], out[:-1]):
        assert np.array_equal(mapped, np.floor(mapped)) and mapped.min() >= 0 and mapped.max() <= 255
        lab = srgb_to_lab(mapped.astype(np.uint8)).reshape(-1, 3)
        np.testing.assert_allclose(lab.mean(axis=0), target.lab_mean, atol=1.0)
        spread = target.lab_std if method == "reinhard" else srgb_to_lab(image).reshape(-1, 3).std(axis=0)
        np.testing.assert_allclose(lab.std(axis=0), spread, rtol=0.15)
        # and the patch path's output, but for a rare pixel a grey level away (float32 rounding at truncation)
        difference = np.abs(mapped - target(image).astype(np.float32))
        assert difference.max() <= 1 and (difference > 0).mean() < 1e-3


def test_macenko_is_torchstains_algorithm_solved_faster(default_targets):
    from torchstain.numpy.normalizers import NumpyMacenkoNormalizer

    target = default_targets["macenko"]
    oracle = NumpyMacenkoNormalizer()
    oracle.HERef = np.asarray(target.stain_matrix)
    oracle.maxCRef = np.asarray(target.max_concentration)
    for seed in range(5):
        image, _ = patch(seed, "lab-b")
        expected = oracle.normalize(image, Io=256, stains=False)[0].astype(int)
        # torchstain rebuilds I = 256·exp(-OD) and truncates; the inverse of OD = -ln((I + 1) / 256) is one less
        assert np.abs(target(image).astype(int) - expected).max() <= 1


def test_the_training_target_is_the_median_of_per_patch_fits_skipping_glass(tmp_path):
    from torchstain.numpy.normalizers import NumpyMacenkoNormalizer

    paths, fits = [], []
    for i, seed in enumerate(range(20)):
        image, _ = patch(seed)
        paths.append(tmp_path / f"p{i:02d}.png")
        Image.fromarray(image).save(paths[-1])
        oracle = NumpyMacenkoNormalizer()
        oracle.fit(image, Io=256)
        fits.append(np.concatenate([oracle.HERef.ravel(), oracle.maxCRef]))
    glass = np.full((SIZE, SIZE, 3), 246, np.uint8)
    glass[:10, :10] = (120, 60, 140)  # a speck of tissue on glass: skipped
    Image.fromarray(glass).save(tmp_path / "z-glass.png")
    target = stain.fit_training_set("macenko", sorted(tmp_path.glob("*.png")), None)
    median = np.median(fits, axis=0)
    he = median[:6].reshape(3, 2) / np.linalg.norm(median[:6].reshape(3, 2), axis=0)
    np.testing.assert_allclose(np.asarray(target.stain_matrix), he, atol=1e-6)
    np.testing.assert_allclose(target.max_concentration, median[6:], rtol=1e-6)
    assert target.patches == 20 and target.source == "the training set"


@pytest.mark.parametrize("method", ["macenko", "reinhard", "reinhard-mean"])
def test_glass_and_flat_patches_pass_through_unchanged_and_are_counted(default_targets, method):
    target = default_targets[method]
    rng = np.random.default_rng(0)
    near_white = (245 + rng.integers(-4, 5, (SIZE, SIZE, 3))).astype(np.uint8)
    flat = np.full((SIZE, SIZE, 3), (150, 90, 160), np.uint8)  # stained, but one colour: no stain plane
    stain.counts(reset=True)
    for image in (near_white, flat):
        out = target(image)
        assert out is image or np.array_equal(out, image)
    tissue, _ = patch(1)
    assert not np.array_equal(target(tissue), tissue)
    assert stain.counts(reset=True) == {"normalised": 1, "passed": 2}


def test_near_white_patch_is_never_nan_or_changed(default_targets):
    for method, target in default_targets.items():
        for value in (255, 250, 235):
            image = np.full((32, 32, 3), value, np.uint8)
            assert np.array_equal(target(image), image), (method, value)


def test_targets_round_trip_through_plain_data(default_targets):
    for target in default_targets.values():
        d = target.to_dict()
        assert all(isinstance(v, (str, int, float, list)) for v in d.values())
        assert StainNorm.from_dict(d) == target
    norm = InputNorm((0.5, 0.5, 0.5), (0.2, 0.2, 0.2), default_targets["macenko"])
    assert InputNorm.from_dict(norm.to_dict()) == norm
    assert InputNorm.from_dict({"mean": [0, 0, 0], "std": [1, 1, 1]}).stain is None


# --------------------------------------------------------------------------- checkpoints and commands


def tagged(method: str, tag: str) -> StainNorm:
    """A target whose ``source`` tells the spy below which model's normalisation ran."""
    if method == "macenko":
        return StainNorm("macenko", stain_matrix=((0.55, 0.22), (0.72, 0.80), (0.41, 0.56)),
                         max_concentration=(1.4, 1.0), patches=1, source=tag)
    return StainNorm("reinhard", lab_mean=(60.0, 20.0, -10.0), lab_std=(10.0, 6.0, 6.0), patches=1, source=tag)


@pytest.fixture(scope="module")
def stained_ckpts(tmp_path_factory) -> dict[str, Path]:
    """Untrained thin checkpoints whose input normalisations carry tagged stain targets: a stage-1
    classifier (Macenko, "stage 1") and a stage-2 segmenter (Reinhard, "stage 2"), at 32 px."""
    root = tmp_path_factory.mktemp("stained")
    torch.manual_seed(0)
    cfg1 = Stage1Config(dataset="luad", data=Path("."), width=0.125, image_size=32, stain_norm="macenko")
    s1 = root / "s1.pth"
    save_checkpoint(s1, stage1.checkpoint_state(ResNet38Classifier(4, width=0.125), cfg1, LUAD, 0,
                                                InputNorm(stain=tagged("macenko", "stage 1"))))
    model = DeepLabV3Plus(DeepLabArch("resnet18", 16, 4, 8))
    cfg2 = Stage2Config(dataset="luad", data=Path("."), backbone="resnet18", head_channels=8, image_size=32,
                        stain_norm="reinhard")
    s2 = root / "s2.pth"
    save_checkpoint(s2, stage2.checkpoint_state(model, cfg2, LUAD, 0, {}, InputNorm(stain=tagged("reinhard", "stage 2"))))
    return {"s1": s1, "s2": s2}


@pytest.fixture
def spy(monkeypatch) -> list[str]:
    """The ``source`` of every stain target applied, in order."""
    calls: list[str] = []
    original = StainNorm.__call__

    def recording(self, image):
        calls.append(self.source)
        return original(self, image)

    monkeypatch.setattr(StainNorm, "__call__", recording)
    return calls


def test_the_stored_target_round_trips_through_a_checkpoint(stained_ckpts):
    assert load_checkpoint(stained_ckpts["s1"])["input_norm"]["stain"]["method"] == "macenko"  # weights_only
    assert loading.load_classifier(stained_ckpts["s1"]).norm.stain == tagged("macenko", "stage 1")
    assert loading.load_segmenter(stained_ckpts["s2"]).norm.stain == tagged("reinhard", "stage 2")


def test_eval_cam_and_generate_pm_apply_the_classifiers_target(synth16, stained_ckpts, spy, tmp_path, capsys,
                                                               monkeypatch):
    code, _, err = run_cli(capsys, monkeypatch, "eval-cam", "--data", synth16, "--checkpoint", stained_ckpts["s1"],
                           "--device", "cpu")
    assert code == 0, err
    assert spy == ["stage 1"] * 4  # the 4 test patches
    spy.clear()
    code, _, err = run_cli(capsys, monkeypatch, "generate-pm", "--data", synth16, "--checkpoint", stained_ckpts["s1"],
                           "--out", tmp_path / "pm", "--workers", 0, "--device", "cpu")
    assert code == 0, err
    assert spy == ["stage 1"] * 16  # every training patch


def test_evaluate_applies_each_models_own_target(synth16, stained_ckpts, spy, capsys, monkeypatch):
    code, _, err = run_cli(capsys, monkeypatch, "evaluate", "--data", synth16, "--checkpoint", stained_ckpts["s2"],
                           "--gate", "--stage1-checkpoint", stained_ckpts["s1"], "--device", "cpu")
    assert code == 0, err
    assert sorted(spy) == ["stage 1"] * 4 + ["stage 2"] * 4


def test_predict_predict_wsi_and_cohorts_apply_each_models_own_target(stained_ckpts, spy, tmp_path, capsys,
                                                                      monkeypatch):
    image, _ = patch(3, size=64)
    Image.fromarray(image).save(tmp_path / "patch.png")
    gate = ("--gate", "--stage1-checkpoint", stained_ckpts["s1"], "--checkpoint", stained_ckpts["s2"],
            "--tile", 32, "--overlap", 0, "--device", "cpu")
    code, _, err = run_cli(capsys, monkeypatch, "predict", tmp_path / "patch.png", "--out", tmp_path / "p", *gate)
    assert code == 0, err
    assert sorted(spy) == ["stage 1"] * 4 + ["stage 2"] * 4  # 4 windows of 32 px, each model once
    slides = tmp_path / "slides"
    slides.mkdir()
    tifffile.imwrite(slides / "slide.tif", image, tile=(32, 32), photometric="rgb")
    for name, target in (("one", slides / "slide.tif"), ("cohort", slides)):  # a slide, then a cohort of one
        spy.clear()
        code, _, err = run_cli(capsys, monkeypatch, "predict-wsi", target, "--out", tmp_path / name,
                               "--min-tissue", 0, *gate)
        assert code == 0, err
        assert sorted(spy) == ["stage 1"] * 4 + ["stage 2"] * 4


def test_train_stage2_fits_its_own_target_and_gates_with_the_classifiers(synth16, stained_ckpts, spy, tmp_path,
                                                                         capsys, monkeypatch):
    pm = tmp_path / "pm"
    pm.mkdir()
    (pm / "PM_gt").symlink_to(synth16 / "train_gt", target_is_directory=True)
    out, report = tmp_path / "s2", tmp_path / "report"
    code, _, err = run_cli(capsys, monkeypatch, "train-stage2", "--dataset", "luad", "--data", synth16, "--preset",
                           "cpu", "--image-size", 32, "--epochs", 1, "--pm-dir", pm, "--pm-layers", "gt",
                           "--pm-weights", 1, "--stage1-checkpoint", stained_ckpts["s1"], "--gate", "--out", out,
                           "--report", report, "--stain-norm", "macenko", "--device", "cpu")
    assert code == 0, err
    seg = loading.load_segmenter(out / "stage2_checkpoint_trained_on_luad.pth")
    assert seg.norm.stain.method == "macenko" and seg.norm.stain.source == "the training set"
    # training (16 patches; a last batch of < 16 is dropped only when more than one batch), validation (4)
    # and the test (4) with its own target, the gate's classifier on the 4 test patches with its own
    assert spy.count("stage 1") == 4
    assert spy.count("the training set") == 16 + 4 + 4
    assert set(spy) == {"stage 1", "the training set"}


def test_train_stage1_stores_the_fitted_target_and_a_resumed_run_keeps_it(synth16, tmp_path, capsys, monkeypatch):
    out = tmp_path / "s1"
    args = ["train-stage1", "--dataset", "luad", "--data", synth16, "--preset", "cpu", "--image-size", 32,
            "--epochs", 1, "--out", out, "--stain-norm", "reinhard", "--device", "cpu"]
    code, _, err = run_cli(capsys, monkeypatch, *args)
    assert code == 0, err
    clf = loading.load_classifier(out / "stage1_checkpoint_trained_on_luad.pth")
    expected = stain.fit_training_set("reinhard", sorted((synth16 / "train").glob("*.png")), 32)
    assert clf.norm.stain == expected and clf.norm.stain.patches == 16
    last = load_checkpoint(out / "stage1_luad_last.pth")
    assert InputNorm.from_dict(last["input_norm"]).stain == expected


# --------------------------------------------------------------------------- bad targets: one line



def png_header(path: Path, width: int, height: int) -> None:
    """A PNG whose header says ``width`` × ``height`` RGB pixels, with a few bytes of image data: what a
    decompression bomb, or a huge export cut short, looks like to a reader."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(bytes(64)))
                     + chunk(b"IEND", b""))


@pytest.mark.parametrize("case, fragment", [
    ("grey", "grayscale"),
    ("text", "cannot read image"),
    ("huge", "exceeds limit"),  # 400 Mpx: above PIL's limit
    ("large", "cannot read image"),  # 100 Mpx: PIL only warns (on stderr) and the data is cut short
    ("small", "too small to fit a stain target on: it holds 1 tile(s) of the model's 32 px, 3 needed"),
    ("folder", "is a folder"),
    ("fifo", "not a regular file"),  # would block the read until something writes to it
    ("glass", "mostly glass"),
    ("glass-set", "mostly glass"),
    ("no-method", "--stain-target needs --stain-norm"),
    ("vahadane", "--stain-norm must be one of none, macenko, reinhard"),
])
@pytest.mark.parametrize("command", ["train-stage1", "train-stage2"])
def test_bad_stain_targets_end_in_one_line_and_write_nothing(synth16, tmp_path, capsys, monkeypatch, case, fragment,
                                                             command):
    data = tmp_path / "data"
    shutil.copytree(synth16, data)
    target = tmp_path / "target.png"
    if case == "grey":
        Image.fromarray(np.full((64, 64), 128, np.uint8)).save(target)
    elif case == "text":
        target.write_text("not an image")
    elif case in ("huge", "large"):
        png_header(target, *((20000, 20000) if case == "huge" else (10000, 10000)))
    elif case == "small":
        Image.fromarray(patch(0, size=32)[0]).save(target)
    elif case == "folder":
        target.mkdir()
    elif case == "fifo":
        os.mkfifo(target)
        # Unblocks a reader that opens the FIFO anyway (the bug), so the test fails instead of hanging.
        writer = threading.Timer(30, lambda: target.write_bytes(b"not an image"))
        writer.daemon = True
        writer.start()
    else:
        glass = np.full((256, 256, 3), 244, np.uint8)
        glass[:20, :20] = (120, 60, 140)
        Image.fromarray(glass).save(target)
    method = {"no-method": ["--stain-norm", "none"], "vahadane": ["--stain-norm", "vahadane"],
              "glass-set": ["--stain-norm", "reinhard-set"]}.get(case, ["--stain-norm", "macenko"])
    out = tmp_path / "out"
    args = [command, "--dataset", "luad", "--data", data, "--preset", "cpu", "--image-size", 32, "--epochs", 1,
            "--out", out, "--stain-target", target, *method, "--device", "cpu"]
    if command == "train-stage2":
        (tmp_path / "pm").mkdir()
        (tmp_path / "pm" / "PM_gt").symlink_to(data / "train_gt", target_is_directory=True)
        args += ["--no-gate", "--pm-dir", tmp_path / "pm", "--pm-layers", "gt", "--pm-weights", 1,
                 "--report", tmp_path / "report"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # printed on a user's terminal
        err = assert_one_line_error(capsys, monkeypatch, *args)
    if case == "fifo":
        writer.cancel()
    assert fragment in err
    assert not any(p.suffix in (".pth", ".json") for p in out.rglob("*")) if out.exists() else True


@pytest.mark.parametrize("field", ["stain", "mean"])
def test_a_malformed_recorded_normalisation_names_its_checkpoint(synth16, stained_ckpts, tmp_path, capsys,
                                                                 monkeypatch, field):
    """Two checkpoints are loaded together (stage 2 and the gate's): the line says which one is bad."""
    ckpt = load_checkpoint(stained_ckpts["s1"])
    if field == "stain":
        ckpt["input_norm"]["stain"]["max_concentration"] = [float("nan"), 1.0]
    else:
        ckpt["input_norm"]["mean"] = [float("nan"), 0.0, 0.0]  # accepted silently before: every input NaN
    bad = tmp_path / "bad.pth"
    save_checkpoint(bad, ckpt)
    err = assert_one_line_error(capsys, monkeypatch, "evaluate", "--data", synth16, "--checkpoint",
                                stained_ckpts["s2"], "--gate", "--stage1-checkpoint", bad, "--device", "cpu")
    assert f"{bad}: the recorded" in err and "malformed" in err
    err = assert_one_line_error(capsys, monkeypatch, "eval-cam", "--data", synth16, "--checkpoint", bad,
                                "--device", "cpu")
    assert f"{bad}: the recorded" in err


def test_a_stain_target_is_read_once_and_not_again_when_the_run_resumes(synth16, tmp_path, capsys, monkeypatch):
    target = tmp_path / "target.png"
    Image.fromarray(np.concatenate([patch(s, size=32)[0] for s in range(4)], axis=1)).save(target)
    reads = []
    original = stain.fit_image
    monkeypatch.setattr(stain, "fit_image", lambda *a: reads.append(a) or original(*a))
    out = tmp_path / "s1"
    args = ["train-stage1", "--dataset", "luad", "--data", synth16, "--preset", "cpu", "--image-size", 32,
            "--epochs", 2, "--out", out, "--stain-norm", "macenko", "--stain-target", target, "--device", "cpu"]
    real_epoch = interrupt_at_epoch(monkeypatch, stage1, 1)
    code, _, err = run_cli(capsys, monkeypatch, *args)
    assert code == 130 and len(reads) == 1, err  # fitted once (it was fitted twice: a check, then the run)
    fitted = InputNorm.from_dict(load_checkpoint(out / "stage1_luad_last.pth")["input_norm"]).stain
    assert fitted.source == str(target) and fitted.patches == 4

    # The target image is gone (or replaced): the resumed run goes on with the target it recorded.
    target.unlink()
    monkeypatch.setattr(stage1, "train_one_epoch", real_epoch)
    code, _, err = run_cli(capsys, monkeypatch, *args, "--resume")
    assert code == 0, err
    assert len(reads) == 1
    assert loading.load_classifier(out / "stage1_checkpoint_trained_on_luad.pth").norm.stain == fitted


def test_a_wrong_gate_checkpoint_fails_before_any_colour_is_measured(synth16, stained_ckpts, tmp_path, capsys,
                                                                     monkeypatch):
    measured = []
    monkeypatch.setattr(stain, "measure_paths", lambda *a: measured.append(a))
    monkeypatch.setattr(stain, "fit_training_set", lambda *a: measured.append(a))
    pm = tmp_path / "pm"
    pm.mkdir()
    (pm / "PM_gt").symlink_to(synth16 / "train_gt", target_is_directory=True)
    err = assert_one_line_error(capsys, monkeypatch, "train-stage2", "--dataset", "luad", "--data", synth16,
                                "--preset", "cpu", "--image-size", 32, "--epochs", 1, "--pm-dir", pm, "--pm-layers",
                                "gt", "--pm-weights", 1, "--stage1-checkpoint", stained_ckpts["s2"], "--gate",
                                "--out", tmp_path / "s2", "--report", tmp_path / "report", "--device", "cpu")
    assert "is a stage-2 checkpoint; a stage-1 checkpoint is needed" in err
    assert measured == []


def test_an_empty_stain_target_in_a_config_file_is_one_line(synth16, tmp_path, capsys, monkeypatch):
    """An empty path is the current folder (it read as "[Errno 21] Is a directory")."""
    config = tmp_path / "c.toml"
    config.write_text('[stage1]\nstain_norm = "macenko"\nstain_target = ""\n')
    err = assert_one_line_error(capsys, monkeypatch, "train-stage1", "--dataset", "luad", "--data", synth16,
                                "--config", config, "--out", tmp_path / "s1", "--device", "cpu")
    assert ". is a folder, not an image: --stain-target names one image file" in err


def test_json_naming_a_folder_is_refused_before_the_work(synth16, stained_ckpts, tmp_path, capsys, monkeypatch):
    ran = []
    monkeypatch.setattr(stage1, "evaluate_cams", lambda *a, **kw: ran.append(a))
    err = assert_one_line_error(capsys, monkeypatch, "eval-cam", "--data", synth16, "--checkpoint",
                                stained_ckpts["s1"], "--json", tmp_path, "--device", "cpu")
    assert f"--json {tmp_path} is a folder" in err and ran == []
