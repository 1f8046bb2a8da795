"""The look options of the synthetic generator: the default is the generator as it was; each option
changes what it says and nothing else; a look is deterministic and recorded."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from wsss.data import synth
from wsss.data.background import to_grey
from wsss.errors import WsssError
from helpers import run_cli

# Decoded content (file names, modes, pixels, first palette entries) of
# generate(out, 20, 4, 4, size=32, seed=5), computed with the generator before it had look options
# (commit e1ab375). Decoded rather than file bytes, so that another zlib cannot break it.
BEFORE_LOOKS = "14e3af2eab220194ceb343ee74c746acc80372132614a7e334469213b8cc6ef5"


def content_hash(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*.png")):
        with Image.open(p) as img:
            h.update(str(p.relative_to(root)).encode())
            h.update(img.mode.encode())
            h.update(np.asarray(img).tobytes())
            if img.mode == "P":
                h.update(bytes(img.getpalette()[:15]))
    return h.hexdigest()


def file_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.png"))}


def tissue_od(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mean optical density (3,) of the tissue pixels, from the definition OD = -ln(I / 255)."""
    rgb = image[mask != 4].astype(np.float64)
    return -np.log(np.maximum(rgb, 1.0) / 255.0).mean(axis=0)


def hue_degrees(od: np.ndarray) -> float:
    """Angle of an OD vector's component orthogonal to the grey axis, in a fixed frame of that plane."""
    k = np.ones(3) / np.sqrt(3)
    chroma = od - k * (k @ od)
    u = np.array([1.0, -1.0, 0.0]) / np.sqrt(2)
    return float(np.degrees(np.arctan2(chroma @ np.cross(k, u), chroma @ u)))


def test_default_look_is_the_generator_before_looks(tmp_path):
    summary = synth.generate(tmp_path / "ds", 20, 4, 4, size=32, seed=5, workers=1, progress=False)
    assert content_hash(tmp_path / "ds") == BEFORE_LOOKS
    assert summary["look"] == {"stain_scale": 1.0, "hue_shift": 0.0, "texture_scale": 1.0, "pale": 0.0}
    explicit = synth.generate(tmp_path / "explicit", 20, 4, 4, size=32, seed=5, workers=1, progress=False,
                              look=synth.resolve_look("default"))
    assert file_bytes(tmp_path / "explicit") == file_bytes(tmp_path / "ds")
    assert explicit["look"] == summary["look"]


def test_hue_rotation_about_the_grey_axis_by_hand():
    # A third of a turn about (1, 1, 1) permutes the axes: x -> y -> z -> x.
    np.testing.assert_allclose(synth._hue_rotate(np.array([1.0, 2.0, 3.0]), 120), [3.0, 1.0, 2.0], atol=1e-12)
    np.testing.assert_allclose(synth._hue_rotate(np.array([1.0, 2.0, 3.0]), -120), [2.0, 3.0, 1.0], atol=1e-12)
    v = np.array([0.5626, 0.7201, 0.4062])
    r = synth._hue_rotate(v, 12)
    assert np.linalg.norm(r) == pytest.approx(np.linalg.norm(v)) and r.sum() == pytest.approx(v.sum())
    assert synth._hue_rotate(v, 0) is v


@pytest.mark.parametrize("seed", range(4))
def test_stain_scale_multiplies_the_optical_density(seed):
    image, mask = synth.make_patch(np.random.default_rng(seed), 64)
    pale_image, pale_mask = synth.make_patch(np.random.default_rng(seed), 64, synth.Look(stain_scale=0.8))
    assert np.array_equal(mask, pale_mask)
    if (mask != 4).sum() < 200:
        pytest.skip("too little tissue in this patch")
    ratio = tissue_od(pale_image, mask).sum() / tissue_od(image, mask).sum()
    assert ratio == pytest.approx(0.8, abs=0.02)


def test_hue_shift_turns_the_tissue_hue():
    turns = []
    for seed in range(8):
        image, mask = synth.make_patch(np.random.default_rng(seed), 64)
        shifted, _ = synth.make_patch(np.random.default_rng(seed), 64, synth.Look(hue_shift=12))
        turn = hue_degrees(tissue_od(shifted, mask)) - hue_degrees(tissue_od(image, mask))
        turns.append((turn + 180) % 360 - 180)
    # Per-patch stain noise is added after the rotation, so single patches scatter around 12°.
    assert 9 < np.mean(turns) < 15 and min(turns) > 6


@pytest.mark.parametrize("texture", [synth._lymphocytes, synth._tumour])
def test_texture_scale_enlarges_nuclei_so_fewer_fit(texture):
    """Lengths x 1.3 → the lattice holds 1 / 1.3² = 0.59 times as many nuclei."""
    def nuclei(zoom: float) -> int:
        total = 0
        for seed in range(3):
            h, _ = texture(np.random.default_rng(seed), 224, zoom)
            total += ndimage.label(h > 0.5)[1]
        return total

    assert nuclei(1.3) / nuclei(1.0) == pytest.approx(1 / 1.3**2, abs=0.08)


def test_pale_regions_cross_the_white_rule_but_stay_tissue():
    def white_tissue(look: synth.Look) -> tuple[float, list[np.ndarray]]:
        white = tissue = 0
        masks = []
        for seed in range(30):
            image, mask = synth.make_patch(np.random.default_rng(seed), 64, look)
            on = mask != 4
            white += int((to_grey(image)[on] > 200).sum())
            tissue += int(on.sum())
            masks.append(mask)
        return white / tissue, masks

    plain, masks = white_tissue(synth.Look())
    pale, pale_masks = white_tissue(synth.Look(pale=0.5))
    assert all(np.array_equal(a, b) for a, b in zip(masks, pale_masks))  # the true masks are unchanged
    assert plain < 0.05 and pale > plain + 0.08


def test_looks_are_deterministic_recorded_and_differ(tmp_path):
    shifted = synth.LOOKS["shifted"]
    a = synth.generate(tmp_path / "a", 6, 2, 2, size=32, seed=1, workers=1, progress=False, look=shifted)
    synth.generate(tmp_path / "b", 6, 2, 2, size=32, seed=1, workers=2, progress=False, look=shifted)
    synth.generate(tmp_path / "c", 6, 2, 2, size=32, seed=1, workers=1, progress=False)
    assert file_bytes(tmp_path / "a") == file_bytes(tmp_path / "b")
    assert file_bytes(tmp_path / "a") != file_bytes(tmp_path / "c")
    recorded = json.loads((tmp_path / "a" / synth.SUMMARY_NAME).read_text())
    assert recorded["look"] == a["look"] == {"stain_scale": 0.8, "hue_shift": 12.0, "texture_scale": 1.3, "pale": 0.3}


def test_cli_look_with_overrides(tmp_path, capsys, monkeypatch):
    out = tmp_path / "ds"
    code, stdout, err = run_cli(capsys, monkeypatch, "synth", out, "--train", 2, "--val", 1, "--test", 1,
                                "--size", 32, "--workers", 1, "--look", "shifted", "--pale", 0)
    assert code == 0, err
    look = {"stain_scale": 0.8, "hue_shift": 12.0, "texture_scale": 1.3, "pale": 0.0}
    assert json.loads(stdout)["look"] == look
    assert json.loads((out / "synth.json").read_text())["look"] == look


@pytest.mark.parametrize("args, fragment", [
    (["--look", "weird"], "--look must be one of default, shifted"),
    (["--pale", "1.5"], "--pale is a probability"),
    (["--stain-scale", "0"], "--stain-scale must be in"),
    (["--hue-shift", "200"], "--hue-shift must be in"),
    (["--texture-scale", "9"], "--texture-scale must be in"),
])
def test_cli_bad_look_is_one_error_line_and_writes_nothing(tmp_path, capsys, monkeypatch, args, fragment):
    out = tmp_path / "ds"
    code, _, err = run_cli(capsys, monkeypatch, "synth", out, "--train", 2, "--size", 32, *args)
    assert code == 1 and fragment in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_bad_look_values_raise():
    with pytest.raises(WsssError, match="--pale"):
        synth.Look(pale=-0.1)


# --------------------------------------------------------------------------- stain and scanner looks


@pytest.mark.parametrize("name", synth.STAIN_LOOKS)
def test_stain_looks_keep_the_tissue_and_masks_of_the_default_look(name):
    for seed in range(3):
        image, mask = synth.make_patch(np.random.default_rng(seed), 64)
        other, other_mask = synth.make_patch(np.random.default_rng(seed), 64, synth.LOOKS[name])
        assert np.array_equal(mask, other_mask)
        assert not np.array_equal(image, other)
        assert synth.LOOKS[name].texture_scale == 1.0 and synth.LOOKS[name].pale == 0.0


def test_jpeg_look_is_the_default_patch_through_a_pil_jpeg_round_trip():
    import io

    image, _ = synth.make_patch(np.random.default_rng(4), 64)
    compressed, _ = synth.make_patch(np.random.default_rng(4), 64, synth.LOOKS["jpeg"])
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=40)
    expected = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))
    assert np.array_equal(compressed, expected)


def test_brightness_multiplies_the_light():
    # image = clip(L + n) and dimmed = clip(0.9 L + n) with the same noise n (std 3): dimmed - 0.9 image
    # = 0.1 n, plus rounding, wherever nothing clipped.
    image, _ = synth.make_patch(np.random.default_rng(2), 64)
    dimmed, _ = synth.make_patch(np.random.default_rng(2), 64, synth.Look(brightness=0.9))
    unclipped = (image < 250) & (image > 5)
    diff = dimmed.astype(float)[unclipped] - 0.9 * image.astype(float)[unclipped]
    assert np.abs(diff).mean() < 0.8 and np.abs(diff).max() < 3.5
    assert dimmed.mean() == pytest.approx(0.9 * image.mean(), rel=0.01)


def test_blur_removes_fine_detail():
    def detail(image: np.ndarray) -> float:  # mean squared 4-neighbour Laplacian of the grey image
        g = image.astype(float).mean(axis=2)
        lap = 4 * g[1:-1, 1:-1] - g[:-2, 1:-1] - g[2:, 1:-1] - g[1:-1, :-2] - g[1:-1, 2:]
        return float((lap**2).mean())

    image, _ = synth.make_patch(np.random.default_rng(1), 128)
    blurred, _ = synth.make_patch(np.random.default_rng(1), 128, synth.LOOKS["blur"])
    assert detail(blurred) < 0.3 * detail(image)


def test_negative_stain_hue_turns_haematoxylin_bluer_and_weaker_eosin_paler():
    # lymphocyte-only patches are mostly haematoxylin: blue minus red grows when H turns bluer
    turned, weaker = [], []
    for seed in range(6):
        h, e = synth._lymphocytes(np.random.default_rng(seed), 64)
        plain = synth._stain(np.random.default_rng(seed), h, e).astype(float)
        bluer = synth._stain(np.random.default_rng(seed), h, e, synth.Look(h_hue=-15)).astype(float)
        turned.append((bluer[..., 2] - bluer[..., 0]).mean() - (plain[..., 2] - plain[..., 0]).mean())
        pale_e = synth._stain(np.random.default_rng(seed), 0 * h, e, synth.Look(e_scale=0.5)).astype(float)
        full_e = synth._stain(np.random.default_rng(seed), 0 * h, e).astype(float)
        od = lambda rgb: -np.log(np.maximum(rgb, 1) / 255).sum(axis=2).mean()  # noqa: E731
        weaker.append(od(pale_e) / od(full_e))
    assert min(turned) > 2
    assert np.mean(weaker) == pytest.approx(0.5, abs=0.03)


def test_stain_looks_are_recorded_with_what_they_change(tmp_path, capsys, monkeypatch):
    out = tmp_path / "ds"
    code, stdout, err = run_cli(capsys, monkeypatch, "synth", out, "--train", 2, "--val", 1, "--test", 1,
                                "--size", 32, "--workers", 1, "--look", "lab-b")
    assert code == 0, err
    look = {"stain_scale": 1.0, "hue_shift": 0.0, "texture_scale": 1.0, "pale": 0.0, "h_hue": -12.0, "e_hue": -18.0,
            "e_scale": 0.75, "brightness": 0.9, "blur": 0.8}
    assert json.loads(stdout)["look"] == look
    assert json.loads((out / "synth.json").read_text())["look"] == look
    assert synth.resolve_look("default", **{}) == synth.Look()


@pytest.mark.parametrize("field, value, fragment", [
    ("jpeg", 3, "jpeg must be 0"), ("jpeg", 50.5, "jpeg must be 0"), ("blur", -1, "blur must be"),
    ("brightness", 2, "brightness must be"), ("e_scale", 0, "e_scale must be"), ("h_hue", 100, "h_hue must be"),
])
def test_bad_scanner_fields_are_refused(field, value, fragment):
    with pytest.raises(WsssError, match=fragment):
        synth.Look(**{field: value})
