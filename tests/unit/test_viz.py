import numpy as np

from wsss.data.specs import BCSS, LUAD
from wsss.viz import colorbar, colorize, grid, heatmap, heatmap_overlay, legend, overlay


def test_colorize_uses_the_dataset_palette():
    mask = np.array([[0, 1], [2, 4]])
    rgb = colorize(mask, BCSS)
    assert rgb[0, 0].tolist() == [255, 0, 0]
    assert rgb[0, 1].tolist() == [0, 255, 0]
    assert rgb[1, 0].tolist() == [0, 0, 255]
    assert rgb[1, 1].tolist() == [255, 255, 255]


def test_overlay_blends_tissue_and_leaves_background():
    image = np.full((1, 2, 3), 100, np.uint8)
    out = overlay(image, np.array([[0, 4]]), LUAD, alpha=0.45)
    # TE is (205, 51, 51): 100 * 0.55 + 205 * 0.45 = 147.25, 100 * 0.55 + 51 * 0.45 = 77.95
    assert out[0, 0].tolist() == [147, 78, 78]
    assert out[0, 1].tolist() == [100, 100, 100]


def test_grid_and_legend_sizes():
    tile = np.zeros((8, 8, 3), np.uint8)
    foot = legend(LUAD)
    img = grid([[tile, tile, tile], [tile]], ["a", "b", "c"], cell=20, gap=2, footer=foot)
    assert img.size == (max(3 * 20 + 4 * 2, foot.width + 4), 18 + 2 * 20 + 3 * 2 + foot.height + 2)


def test_heatmap_end_points():
    out = heatmap(np.array([[-1.0, 0.0, 1.0, 2.0]]))
    assert out[0, 0].tolist() == out[0, 1].tolist() == [0, 0, 130]
    assert out[0, 2].tolist() == out[0, 3].tolist() == [200, 0, 0]


def test_grid_row_titles_widen_the_left_margin_and_are_drawn():
    tile = np.zeros((8, 8, 3), np.uint8)
    plain = np.asarray(grid([[tile, tile], [tile, tile]], cell=20, gap=2))
    titled = np.asarray(grid([[tile, tile], [tile, tile]], cell=20, gap=2, row_titles=["first", "two\nlines"]))
    margin = titled.shape[1] - plain.shape[1]
    assert titled.shape[0] == plain.shape[0] and margin > 10
    assert titled[:, :margin].min() < 128  # text in the margin
    np.testing.assert_array_equal(titled[:, margin:], plain)  # the pictures just move right


def test_grid_outline_frames_each_picture_in_the_gap():
    tile = np.full((4, 4, 3), 255, np.uint8)
    img = np.asarray(grid([[tile]], cell=10, gap=3, outline=(1, 2, 3)))
    assert img.shape == (16, 16, 3)
    frame = np.zeros((16, 16), bool)
    frame[2, 2:14] = frame[13, 2:14] = frame[2:14, 2] = frame[2:14, 13] = True
    assert (img[frame] == [1, 2, 3]).all()
    assert (img[~frame] == 255).all()


def test_heatmap_overlay_blends_the_scale_colours():
    image = np.full((1, 2, 3), 100, np.uint8)
    out = heatmap_overlay(image, np.array([[0.0, 1.0]]), alpha=0.5)
    # 0 → (0, 0, 130), 1 → (200, 0, 0), each averaged with 100
    assert out[0, 0].tolist() == [50, 50, 115]
    assert out[0, 1].tolist() == [150, 50, 50]


def test_colorbar_runs_from_low_to_high_colour():
    bar = np.asarray(colorbar(length=50, thickness=8, caption="score"))
    row = bar[bar.shape[0] // 2]
    assert [0, 0, 130] in row.tolist() and [200, 0, 0] in row.tolist()
    assert bar.shape[0] == 8 + 2 * 6 and bar.shape[1] > 50 + len("score")
