"""`wsss predict`: tiling and blending, the gate per tile, outputs and palettes, memory, bad inputs."""

from __future__ import annotations

import logging
import csv
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import assert_one_line_error, run_cli, tiny_checkpoint, tiny_state
from tiling_oracle import content_predictor, full_blend
from wsss.models import loading
from wsss.data.background import white_mask
from wsss.data.datasets import InputNorm, to_tensor
from wsss.data.specs import BCSS, LUAD
from wsss.errors import WsssError
from wsss.runtime import save_checkpoint
from wsss import inference as I
from wsss import pixels as X
from wsss import tiling as TL
from wsss.stages import predict as P
from wsss.stages import stage2
from wsss.viz import legend, overlay

TILE = 64  # the tests' "training patch size": checkpoints record image_size 32, so windows are halved


def _stage2_state(num_classes: int = 4, image_size: int | None = 32) -> dict:
    return tiny_state(2, num_classes=num_classes, image_size=image_size)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    """Untrained tiny checkpoints: stage 2 (ours, 3-class, published state_dict) and a stage-1 classifier."""
    root = tmp_path_factory.mktemp("predict_ckpts")
    paths = {name: root / f"{name}.pth" for name in ("s2", "s2_c3", "published", "s1")}
    state = _stage2_state()
    save_checkpoint(paths["s2"], state)
    torch.save({"state_dict": state["model"]}, paths["published"])
    c3 = _stage2_state(num_classes=3)
    c3["class_names"] = ["A", "B", "C"]
    save_checkpoint(paths["s2_c3"], c3)
    tiny_checkpoint(paths["s1"], 1, seed=1, image_size=48)
    return paths


@pytest.fixture(scope="module")
def seg(ckpts) -> loading.LoadedSegmenter:
    return loading.load_segmenter(ckpts["s2"])


def _random_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _save(path: Path, image: np.ndarray, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(image)
    (img.convert(mode) if mode else img).save(path)
    return path


# --------------------------------------------------------------------------- tiling (pure)


def test_tile_starts_cover_the_image_with_the_last_tile_flush():
    assert TL.tile_starts(500, 224, 32) == [0, 192, 276]  # stride 192; 276 + 224 = 500
    assert TL.tile_starts(416, 224, 32) == [0, 192]  # 192 + 224 = 416 exactly: no extra tile
    assert TL.tile_starts(224, 224, 32) == [0]
    assert TL.tile_starts(100, 224, 32) == [0]
    assert TL.tile_starts(130, 64, 0) == [0, 64, 66]
    assert TL.tiles_of(500, 100, 224, 32) == 3


def test_blend_window_tapers_and_sums_to_one_across_an_overlap():
    s1, s3 = np.sin(np.pi / 8) ** 2, np.sin(3 * np.pi / 8) ** 2  # sin²(π/2 · (i + ½) / 2), i = 0, 1
    assert np.allclose(TL.blend_window(6, 2), [s1, s3, 1, 1, s3, s1])
    assert np.array_equal(TL.blend_window(5, 0), np.ones(5, dtype=np.float32))
    assert TL.blend_window(4, 8).min() >= 1e-3 and TL.blend_window(4, 8)[0] == TL.blend_window(4, 8)[-1]
    # two windows of 64 overlapping by 16: the weights of the shared pixels add up to 1 (sin² + cos²)
    w = TL.blend_window(64, 16)
    assert np.allclose(w[48:] + w[:16], 1.0, atol=1e-6)


def test_model_size_keeps_the_training_scale():
    assert I.model_size((224, 224), 224, 112) == (112, 112)
    assert I.model_size((40, 64), 64, 32) == (20, 32)  # a window clipped to a small image keeps the scale
    assert I.model_size((40, 64), 64, None) == (40, 64)  # published checkpoints: native resolution


# --------------------------------------------------------------------------- sliding window


def test_one_tile_equals_whole_image_inference(seg):
    predictor = I.TilePredictor(seg, TILE, torch.device("cpu"))
    image = _random_image(TILE, TILE)
    x = to_tensor(np.asarray(Image.fromarray(image).resize((32, 32), Image.BILINEAR)), seg.norm)[None]
    expected = loading.segment(seg.model, x, (TILE, TILE)).argmax(dim=1)[0].numpy()
    assert np.array_equal(TL.predict_mask(image, predictor, TILE, 16, 4), expected)

    small = _random_image(40, 56, seed=1)  # smaller than a tile: one window of 40 × 56 at half scale
    x = to_tensor(np.asarray(Image.fromarray(small).resize((28, 20), Image.BILINEAR)), seg.norm)[None]
    expected = loading.segment(seg.model, x, (40, 56)).argmax(dim=1)[0].numpy()
    assert np.array_equal(TL.predict_mask(small, predictor, TILE, 16, 4), expected)


@pytest.mark.parametrize("size,tile,overlap,batch", [
    ((150, 130), 64, 16, 3),    # last windows flush, overlapping their neighbours by more than 16
    ((150, 130), 40, 30, 1),    # overlap above half a window: three window rows share some pixels
    ((30, 200), 64, 16, 2),     # image lower than a window
])
def test_row_by_row_blending_equals_whole_image_blending(size, tile, overlap, batch):
    image = _random_image(*size, seed=2)
    bands = list(TL.probability_bands(image, content_predictor, tile, overlap, batch))
    assert [top for top, _ in bands] == TL.tile_starts(size[0], min(tile, size[0]), overlap)
    probs = torch.cat([p for _, p in bands], dim=1)
    assert probs.shape == (3, *size)
    assert torch.allclose(probs, full_blend(image, content_predictor, tile, overlap), atol=1e-6)
    assert torch.allclose(probs.sum(dim=0), torch.ones(size), atol=1e-5)


def _border_artefact_predictor(border: int):
    """Class 1 (p = 0.9) within ``border`` px of a window's edge, class 0 (p = 0.9) inside: a network
    whose zero padding makes it see a different tissue at its input's borders."""

    def predict(tiles):
        h, w = tiles[0].shape[:2]
        ys, xs = np.arange(h)[:, None], np.arange(w)[None, :]
        edge = np.minimum(np.minimum(ys, h - 1 - ys), np.minimum(xs, w - 1 - xs)) < border
        p1 = torch.from_numpy(np.where(edge, 0.9, 0.1).astype(np.float32))
        return torch.stack([1 - p1, p1])[None].repeat(len(tiles), 1, 1, 1)

    return predict


def test_constant_texture_gets_the_same_class_at_tile_borders_as_in_tile_centres():
    image = np.full((192, 256, 3), (190, 120, 170), dtype=np.uint8)
    predict = _border_artefact_predictor(8)
    ys, xs = np.arange(192)[:, None], np.arange(256)[None, :]

    # without overlap every window's 8-px frame shows: a seam grid of class 1 at the window borders
    plain = TL.predict_mask(image, predict, TILE, 0, 4)
    near_tile_edge = (np.minimum(ys % TILE, TILE - 1 - ys % TILE) < 8) | (np.minimum(xs % TILE, TILE - 1 - xs % TILE) < 8)
    assert np.array_equal(plain, near_tile_edge.astype(np.uint8))

    # blended: class 1 only in the 8-px frame of the image itself, where no neighbour window exists
    blended = TL.predict_mask(image, predict, TILE, 32, 4)
    near_image_edge = (np.minimum(ys, 191 - ys) < 8) | (np.minimum(xs, 255 - xs) < 8)
    assert np.array_equal(blended, near_image_edge.astype(np.uint8))
    inner = blended[8:-8, 8:-8]
    starts = [s for s in TL.tile_starts(256, TILE, 32) if s > 8]
    assert set(inner[:, [s - 8 for s in starts]].ravel()) == {0} == set(inner[TILE // 2 - 8 :: TILE].ravel())


def _seam_jumps(probs: torch.Tensor, starts: list[int], tile: int) -> tuple[float, float]:
    """Largest change between horizontal neighbours (C, H, W) across window borders, and elsewhere."""
    jump = (probs[:, :, 1:] - probs[:, :, :-1]).abs().amax(dim=(0, 1))  # jump[i]: between x = i, i + 1
    borders = {s - 1 for s in starts if s > 0} | {s + tile - 1 for s in starts if s + tile < probs.shape[-1]}
    at = jump[sorted(borders)].max().item()
    elsewhere = jump[[i for i in range(len(jump)) if i not in borders]].max().item()
    return at, elsewhere


def test_blended_probabilities_of_a_real_network_vary_smoothly_across_tile_borders(seg):
    predictor = I.TilePredictor(seg, TILE, torch.device("cpu"))
    image = np.full((200, 200, 3), (180, 90, 160), dtype=np.uint8)
    for overlap, seams in ((0, True), (32, False)):
        probs = torch.cat([p for _, p in TL.probability_bands(image, predictor, TILE, overlap, 8)], dim=1)
        for view in (probs, probs.transpose(1, 2)):  # columns, then rows
            at, elsewhere = _seam_jumps(view, TL.tile_starts(200, TILE, overlap), TILE)
            if seams:  # the untrained network's padding effects: a jump at every window border
                assert at > 2 * elsewhere
            else:
                assert at <= elsewhere


def test_gate_zeroes_the_probability_of_classes_the_classifier_rules_out_per_tile(seg, ckpts):
    clf = loading.load_classifier(ckpts["s1"], 4)
    tiles = [np.full((TILE, TILE, 3), 40, dtype=np.uint8), _random_image(TILE, TILE, seed=3)]
    xg = torch.stack([to_tensor(np.asarray(Image.fromarray(t).resize((48, 48), Image.BILINEAR)), clf.norm)
                      for t in tiles])
    cls = loading.class_probs(clf, xg)  # (2, 4), the classifier at its own 48 px
    c = int((cls[0] - cls[1]).abs().argmax())
    threshold = float(cls[:, c].mean())  # class c is gated in exactly one of the two tiles
    gated = I.TilePredictor(seg, TILE, torch.device("cpu"), clf, threshold)(tiles)
    plain = I.TilePredictor(seg, TILE, torch.device("cpu"))(tiles)
    x = torch.stack([to_tensor(np.asarray(Image.fromarray(t).resize((32, 32), Image.BILINEAR)), seg.norm)
                     for t in tiles])
    logits = loading.segment(seg.model, x, (TILE, TILE))
    assert torch.allclose(plain, logits.softmax(dim=1))
    assert torch.allclose(gated, stage2.gate_logits(logits, cls, threshold).softmax(dim=1))
    kept = stage2.gate_logits(torch.zeros(2, 4, 1, 1), cls, threshold)[:, :, 0, 0] == 0
    assert kept[:, c].tolist() in ([True, False], [False, True])
    assert torch.all(gated[~kept] == 0) and torch.all(gated[kept] > 0)


# --------------------------------------------------------------------------- pixel work, inputs


def test_white_background_by_row_blocks_equals_white_mask():
    image = np.full((120, 90, 3), 120, dtype=np.uint8)
    image[5:12, 5:12] = 255  # 49 px: a speck inside tissue
    image[5:15, 30:35] = 255  # 50 px: background
    image[20:27, 60:67] = 255  # 49 px straddling the 7-row blocks' border at row 21
    image[25:32, 70:78] = 255  # 56 px straddling one too
    image[40:110, 45] = 255  # a 70-px line through ten blocks
    image[100:, :20] = 230  # background touching the image border
    expected = white_mask(image)
    assert expected[25, 70] and not expected[20, 60] and not expected[5, 5] and expected[5, 30]
    assert np.array_equal(X.white_background(image, block_pixels=90 * 7), expected)
    assert np.array_equal(X.white_background(image), expected)


def test_class_fractions_and_overlay_with_legend():
    mask = np.array([[0, 0, 1, 4], [4, 4, 2, 0]], dtype=np.uint8)
    assert np.allclose(X.class_fractions(mask, 5), [3 / 8, 1 / 8, 1 / 8, 0, 3 / 8])
    image = _random_image(2, 4)
    canvas = X.overlay_with_legend(image, mask, LUAD)
    key = np.asarray(legend(LUAD))
    assert canvas.shape == (2 + key.shape[0], max(4, key.shape[1]), 3)
    assert np.array_equal(canvas[:2, :4], overlay(image, mask, LUAD))
    assert np.array_equal(canvas[2:, : key.shape[1]], key)


def test_read_image_accepts_rgb_palette_and_large_images_and_refuses_the_rest(tmp_path, monkeypatch):
    image = _random_image(64, 64)
    assert np.array_equal(P.read_image(_save(tmp_path / "a.png", image)), image)
    palette = Image.fromarray(image).convert("P")
    palette.save(tmp_path / "p.png")
    assert np.array_equal(P.read_image(tmp_path / "p.png"), np.asarray(palette.convert("RGB")))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL's bomb limit is lifted while reading
    assert P.read_image(tmp_path / "a.png").shape == (64, 64, 3)
    assert Image.MAX_IMAGE_PIXELS == 1000
    with pytest.raises(WsssError, match=r"is 64×64 px; at most 4,000 pixels"):
        P.read_image(tmp_path / "a.png", max_pixels=4000)
    for mode, message in (("L", "grayscale"), ("LA", "grayscale"), ("I;16", "grayscale"), ("RGBA", "alpha channel")):
        with pytest.raises(WsssError, match=rf"g\.png .*{message}.*an RGB image is needed"):
            P.read_image(_save(tmp_path / mode.replace(";", "") / "g.png", image, mode))
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(WsssError, match=r"cannot read image .*bad\.png"):
        P.read_image(tmp_path / "bad.png")


def test_collect_images(tmp_path):
    folder = tmp_path / "in"
    for name in ("b.PNG", "a.jpg", "c.tiff", ".hidden.png", "notes.txt"):
        _save(folder / name, _random_image(8, 8)) if name != "notes.txt" else (folder / name).write_text("x")
    _save(folder / "a_mask.png", _random_image(8, 8))  # an input, unless the folder is the output folder
    assert [p.name for p in P.collect_images([folder, folder / "b.PNG"])] == ["a.jpg", "a_mask.png", "b.PNG", "c.tiff"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(WsssError, match="holds no PNG, JPEG or TIFF images"):
        P.collect_images([folder, tmp_path / "empty"])
    with pytest.raises(WsssError, match="input not found"):
        P.collect_images([tmp_path / "missing.png"])
    _save(tmp_path / "other" / "a.png", _random_image(8, 8))
    with pytest.raises(WsssError, match=r"both be written as a_mask\.png"):
        P.collect_images([folder, tmp_path / "other"])


# --------------------------------------------------------------------------- the command


def _read_mask(path: Path) -> tuple[np.ndarray, list[int]]:
    with Image.open(path) as img:
        assert img.mode == "P"
        return np.asarray(img), img.getpalette()


def test_predict_writes_masks_overlays_and_summary(ckpts, seg, tmp_path, capsys, monkeypatch):
    wide = _random_image(100, 150, seed=4)
    wide[60:, :40] = 250  # white glass: background
    _save(tmp_path / "in" / "wide.png", wide)
    _save(tmp_path / "in" / "small.jpg", _random_image(48, 48, seed=5))
    out = tmp_path / "out"
    code, stdout, err = run_cli(capsys, monkeypatch, "predict", tmp_path / "in", "--checkpoint", ckpts["s2"],
                                "--out", out, "--tile", TILE, "--overlap", 16, "--batch-size", 3, "--device", "cpu",
                                "--gate", "--stage1-checkpoint", ckpts["s1"], "--gate-threshold", 0.5)
    assert code == 0, err
    assert "2 of 2 images segmented" in stdout
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "small_mask.png", "small_overlay.png", "summary.csv", "wide_mask.png", "wide_overlay.png"]

    mask, palette = _read_mask(out / "wide_mask.png")
    assert palette[: 3 * 5] == LUAD.flat_palette()[: 3 * 5]
    gate = loading.load_classifier(ckpts["s1"], 4)
    expected = TL.predict_mask(wide, I.TilePredictor(seg, TILE, torch.device("cpu"), gate, 0.5), TILE, 16, 3)
    expected[white_mask(wide)] = 4
    assert np.array_equal(mask, expected)
    assert np.all(mask[60:, :40] == 4) and set(np.unique(mask)) <= {0, 1, 2, 3, 4}

    with Image.open(out / "wide_overlay.png") as img:
        canvas = np.asarray(img.convert("RGB"))
    key = np.asarray(legend(LUAD))
    assert canvas.shape == (100 + key.shape[0], max(150, key.shape[1]), 3)
    assert np.array_equal(canvas[:100, :150], overlay(wide, mask, LUAD))
    assert np.array_equal(canvas[100:, : key.shape[1]], key)

    with open(out / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [Path(r["image"]).name for r in rows] == ["small.jpg", "wide.png"]
    assert list(rows[1]) == ["image", "width", "height", "TE", "NEC", "LYM", "TAS", "background"]
    assert (rows[1]["width"], rows[1]["height"]) == ("150", "100")
    counts = np.bincount(mask.ravel(), minlength=5) / mask.size
    assert [float(rows[1][k]) for k in (*LUAD.classes, "background")] == pytest.approx(counts, abs=1e-6)


def test_dataset_comes_from_the_checkpoint_or_the_option(ckpts, tmp_path, capsys, monkeypatch):
    image = _random_image(48, 48)
    image[:20] = 255
    _save(tmp_path / "x.png", image)
    args = ("predict", tmp_path / "x.png", "--tile", TILE, "--device", "cpu")
    # the checkpoint records its spec: --dataset bcss with a luad checkpoint is refused in one line
    code, _, err = run_cli(capsys, monkeypatch, *args, "--checkpoint", ckpts["s2"], "--dataset", "bcss",
                           "--out", tmp_path / "bcss")
    assert code == 1 and len(err.strip().splitlines()) == 1 and not (tmp_path / "bcss").exists()
    assert "trained on dataset spec 'luad', not the 'bcss' given" in err and "white_is_background True vs False" in err
    code, _, err = run_cli(capsys, monkeypatch, *args, "--checkpoint", ckpts["s2"], "--out", tmp_path / "own")
    assert code == 0, err
    assert "TE,NEC,LYM,TAS,background" in (tmp_path / "own" / "summary.csv").read_text()
    # a published state_dict records no dataset: it needs --dataset
    code, _, err = run_cli(capsys, monkeypatch, *args, "--checkpoint", ckpts["published"], "--out", tmp_path / "p")
    assert code == 1 and "does not record its dataset; pass --dataset" in err
    code, _, err = run_cli(capsys, monkeypatch, *args, "--checkpoint", ckpts["published"], "--dataset", "luad",
                           "--out", tmp_path / "p")
    assert code == 0, err
    assert _read_mask(tmp_path / "p" / "x_mask.png")[0][:20].tolist() == [[4] * 48] * 20
    # --dataset bcss names a published checkpoint's classes: BCSS palette, white is tissue (fat)
    code, _, err = run_cli(capsys, monkeypatch, *args, "--checkpoint", ckpts["published"], "--dataset", "bcss",
                           "--out", tmp_path / "pb")
    assert code == 0, err
    mask, palette = _read_mask(tmp_path / "pb" / "x_mask.png")
    assert palette[:15] == BCSS.flat_palette()[:15] and mask.max() < 4
    assert "TUM,STR,LYM,NEC,background" in (tmp_path / "pb" / "summary.csv").read_text()



def test_a_stage1_checkpoint_without_gate_is_warned_about(ckpts, tmp_path, capsys, monkeypatch, caplog):
    _save(tmp_path / "x.png", _random_image(48, 48))
    code, _, err = run_cli(capsys, monkeypatch, "predict", tmp_path / "x.png", "--tile", TILE, "--device", "cpu",
                           "--checkpoint", ckpts["s2"], "--stage1-checkpoint", ckpts["s1"], "--out", tmp_path / "o")
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert code == 0 and "warning: --stage1-checkpoint is used only with --gate; segmenting without the gate" in warnings


def test_bad_inputs_end_in_one_clear_line(ckpts, tmp_path, capsys, monkeypatch):
    good = _save(tmp_path / "good.png", _random_image(40, 40))
    grey = _save(tmp_path / "grey" / "grey.png", _random_image(40, 40), "L")
    (tmp_path / "empty").mkdir()
    out = tmp_path / "out"
    base = ("--out", out, "--tile", TILE, "--device", "cpu")
    s2 = ("--checkpoint", ckpts["s2"])
    assert "grey.png is grayscale (mode L); an RGB image is needed" in assert_one_line_error(
        capsys, monkeypatch, "predict", grey, *s2, *base)
    assert "holds no PNG, JPEG or TIFF images" in assert_one_line_error(
        capsys, monkeypatch, "predict", good, tmp_path / "empty", *s2, *base)
    assert "stage-2 checkpoint is needed" in assert_one_line_error(
        capsys, monkeypatch, "predict", good, "--checkpoint", ckpts["s1"], *base)
    assert "trained for 3 classes" in assert_one_line_error(
        capsys, monkeypatch, "predict", good, "--checkpoint", ckpts["s2_c3"], *base)
    assert "--gate needs --stage1-checkpoint" in assert_one_line_error(capsys, monkeypatch, "predict", good, *s2, *base, "--gate")
    assert "stage-1" in assert_one_line_error(
        capsys, monkeypatch, "predict", good, *s2, *base, "--gate", "--stage1-checkpoint", ckpts["s2"])
    assert "--overlap must be" in assert_one_line_error(capsys, monkeypatch, "predict", good, *s2, *base, "--overlap", TILE)
    assert "--tta must be one of none, flip, d4, not 'd8'" in assert_one_line_error(
        capsys, monkeypatch, "predict", good, *s2, *base, "--tta", "d8")
    assert "unknown dataset 'lung'" in assert_one_line_error(
        capsys, monkeypatch, "predict", good, *s2, *base, "--dataset", "lung")
    assert not out.exists()


def test_failed_images_are_listed_and_the_others_still_written(ckpts, tmp_path, capsys, monkeypatch):
    folder = tmp_path / "in"
    _save(folder / "a.png", _random_image(40, 40))
    _save(folder / "b.png", _random_image(40, 40), "RGBA")
    _save(folder / "c.tif", _random_image(40, 40), "L")
    (folder / "d.png").write_bytes(b"not an image")
    _save(folder / "e.jpg", _random_image(40, 40, seed=1))
    out = tmp_path / "out"
    code, stdout, err = run_cli(capsys, monkeypatch, "predict", folder, "--checkpoint", ckpts["s2"], "--out", out,
                                "--tile", TILE, "--device", "cpu")
    assert code == 1 and "Traceback" not in err
    assert "2 of 5 images segmented" in stdout
    failed = err[err.index("3 images failed:"):].splitlines()
    assert len(failed) == 4 and "error:" not in err
    assert re.search(r"b\.png has an alpha channel", failed[1]) and "c.tif is grayscale" in failed[2]
    assert "cannot read image" in failed[3] and "d.png" in failed[3]
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "a_mask.png", "a_overlay.png", "e_mask.png", "e_overlay.png", "summary.csv"]
    assert (out / "summary.csv").read_text().count("\n") == 3  # header + the two processed images

    # nothing processed: the list, then one error line
    code, _, err = run_cli(capsys, monkeypatch, "predict", folder / "b.png", folder / "c.tif", "--checkpoint",
                           ckpts["s2"], "--out", tmp_path / "none", "--device", "cpu")
    assert code == 1 and "2 images failed:" in err and err.count("error:") == 1
    assert "error: none of the 2 images could be processed" in err and not (tmp_path / "none").exists()


# --------------------------------------------------------------------------- memory


def _rss(key: str) -> int:
    return int(re.search(rf"{key}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


def _peak_extra_rss(fn) -> int:
    """Peak resident memory above the current one while ``fn()`` runs (Linux: VmHWM reset to VmRSS)."""
    Path("/proc/self/clear_refs").write_text("5")
    before = _rss("VmRSS")
    fn()
    return _rss("VmHWM") - before


def _can_measure_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return "VmHWM" in Path("/proc/self/status").read_text()
    except OSError:
        return False


@pytest.mark.skipif(not _can_measure_rss(), reason="needs Linux /proc peak-RSS reset")
def test_memory_grows_with_the_tile_row_not_with_classes_times_pixels(ckpts, tmp_path):
    """A 3000 × 3000 image: whole-image float32 sums (4 classes + weight) would take 172 MiB."""
    seg = loading.load_segmenter(ckpts["s2"])
    predictor = I.TilePredictor(seg, 224, torch.device("cpu"))  # windows of 224 px, the model at 32
    predictor([np.zeros((224, 224, 3), dtype=np.uint8)] * 8)  # first-call allocations out of the way
    n = 3000
    image = np.full((n, n, 3), (200, 120, 180), dtype=np.uint8)
    image[::7] = (90, 40, 120)
    image[:, : n // 4] = 250  # glass

    extra = _peak_extra_rss(lambda: TL.predict_mask(image, predictor, 224, 32, 8))
    full = 5 * n * n * 4
    assert extra < full / 3, f"{extra / 2**20:.0f} MiB"

    # The whole image's run (read, mask, background, overlay, PNGs), measured as the growth from a 1500²
    # to a 3000² image, which cancels the fixed costs (model, legend): the image (3 bytes a pixel),
    # PIL's decoded copy while reading (4), the mask (1), the overlay (3, and PIL's 4 while encoding)
    # and row buffers that grow with the width. Whole-image float32 sums would add 20 on their own.
    cfg = P.PredictConfig(inputs=(), checkpoint=ckpts["s2"], out=tmp_path / "out", tile=224, overlap=32)
    peaks = {}
    for side in (n, n // 2):  # the larger first: reused freed memory can only shrink the second peak
        path = _save(tmp_path / f"{side}.png", image[:side, :side])
        peaks[side] = _peak_extra_rss(lambda path=path: P.predict_image(path, predictor, LUAD, cfg))
    per_pixel = (peaks[n] - peaks[n // 2]) / (n * n - (n // 2) ** 2)
    assert per_pixel < 16, f"{per_pixel:.1f} bytes per pixel"


# --------------------------------------------------------------------------- test-time augmentation


class _SymmetricConv(torch.nn.Module):
    """A segmenter equivariant under every flip and 90° rotation: one 3 × 3 convolution whose kernels
    are D4-symmetric (one weight for the centre, one for the 4 edge neighbours, one for the 4
    corners), zero padding, then bilinear resizing to the window."""

    num_classes = 3

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        centre, edge, corner = torch.randn(3, 3, 3, generator=g)  # each (out, in)
        kernel = torch.empty(3, 3, 3, 3)
        kernel[:, :, 1, 1] = centre
        for i, j in ((0, 1), (1, 0), (1, 2), (2, 1)):
            kernel[:, :, i, j] = edge
        for i, j in ((0, 0), (0, 2), (2, 0), (2, 2)):
            kernel[:, :, i, j] = corner
        self.kernel = torch.nn.Parameter(kernel)

    def forward(self, x, size=None):
        logits = torch.nn.functional.conv2d(x, self.kernel, padding=1)
        return {"out": torch.nn.functional.interpolate(logits, size=size, mode="bilinear", align_corners=True)}


@pytest.mark.parametrize("shape", [(40, 40), (40, 56)])
def test_tta_leaves_an_equivariant_model_unchanged(shape):
    seg = loading.LoadedSegmenter(_SymmetricConv(), InputNorm(), None, None)
    tiles = [_random_image(*shape, seed=s) for s in range(3)]
    plain = I.TilePredictor(seg, 64, torch.device("cpu"))(tiles)
    for mode in ("flip", "d4"):
        augmented = I.TilePredictor(seg, 64, torch.device("cpu"), tta=mode)(tiles)
        assert torch.allclose(augmented, plain, atol=1e-6)
        assert torch.equal(augmented.argmax(dim=1), plain.argmax(dim=1))


def test_tta_averages_the_softmax_of_every_flip_and_rotation_mapped_back(seg):
    tiles = [_random_image(TILE, 48, seed=s) for s in range(2)]  # not square: rotations swap h and w
    x = torch.stack([to_tensor(np.asarray(Image.fromarray(t).resize((24, 32), Image.BILINEAR)), seg.norm)
                     for t in tiles])  # the model input: windows at half scale

    def probs(xt, size, undo):
        return undo(loading.segment(seg.model, xt, size).softmax(dim=1))

    h, w = TILE, 48
    flips = [probs(x, (h, w), lambda p: p), probs(x.flip(3), (h, w), lambda p: p.flip(3)),
             probs(x.flip(2), (h, w), lambda p: p.flip(2)), probs(x.flip(2).flip(3), (h, w), lambda p: p.flip(3).flip(2))]
    xt = x.permute(0, 1, 3, 2)  # transposed windows (w, h); each result is mapped back by the inverse
    turned = [probs(xt, (w, h), lambda p: p.permute(0, 1, 3, 2)),
              probs(torch.rot90(x, 1, (2, 3)), (w, h), lambda p: torch.rot90(p, -1, (2, 3))),
              probs(torch.rot90(x, 3, (2, 3)), (w, h), lambda p: torch.rot90(p, -3, (2, 3))),
              probs(xt.flip(2).flip(3), (w, h), lambda p: p.flip(2).flip(3).permute(0, 1, 3, 2))]
    flip = I.TilePredictor(seg, TILE, torch.device("cpu"), tta="flip")(tiles)
    d4 = I.TilePredictor(seg, TILE, torch.device("cpu"), tta="d4")(tiles)
    assert torch.allclose(flip, torch.stack(flips).mean(dim=0), atol=1e-6)
    assert torch.allclose(d4, torch.stack(flips + turned).mean(dim=0), atol=1e-6)
    assert not torch.allclose(d4, flips[0], atol=1e-3)  # an untrained network is far from equivariant


def test_the_window_batch_defaults_to_the_device(monkeypatch):
    """--batch-size not given: 8 windows on the CPU, 64 on a CUDA GPU (``auto`` asks torch); given: as given."""
    import torch

    from wsss.inference import window_batch

    assert (window_batch(None, "cpu"), window_batch(None, "cuda"), window_batch(None, "cuda:1")) == (8, 64, 64)
    assert window_batch(3, "cuda") == 3
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert window_batch(None, "auto") == 64
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert window_batch(None, "auto") == 8
