import numpy as np

from wsss.data.specs import BCSS, LUAD
from wsss.viz import colorize, grid, heatmap, legend, overlay


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
