import numpy as np
import pytest
from PIL import Image

from wsss.data.background import to_grey, white_mask
from wsss.data.png import read_mask, read_rgb, write_mask
from wsss.data.specs import BCSS, LUAD
from wsss.errors import WsssError


@pytest.mark.parametrize("spec", [LUAD, BCSS])
def test_palette_round_trip_keeps_indices_and_palette(tmp_path, spec):
    mask = np.array([[0, 1, 2], [3, 4, 0]], dtype=np.uint8)
    path = tmp_path / "m [1 0 0 1].png"
    write_mask(path, mask, spec.flat_palette())
    assert np.array_equal(read_mask(path), mask)
    with Image.open(path) as img:
        assert img.mode == "P"
        pal = img.getpalette()[: 3 * 5]
    assert [tuple(pal[i : i + 3]) for i in range(0, 15, 3)] == list(spec.palette)
    # no temporary file left behind
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_read_mask_refuses_rgb_and_corrupt(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "rgb.png")
    with pytest.raises(WsssError, match="expected a palette"):
        read_mask(tmp_path / "rgb.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(WsssError, match="cannot read"):
        read_mask(tmp_path / "bad.png")
    with pytest.raises(WsssError, match="cannot read"):
        read_rgb(tmp_path / "bad.png")


def test_grey_is_cv2_rgb2gray():
    # cv2.cvtColor(RGB2GRAY), as the reference: (4899 R + 9617 G + 1868 B + 8192) >> 14, by hand.
    # (229, 182, 221): 3293185 >> 14 = 201, where (299 R + 587 G + 114 B + 500) // 1000 gives 200;
    # (79, 252, 254): 3293169 >> 14 = 200, where that rounding and PIL's convert("L") give 201.
    img = np.array([[[229, 182, 221], [79, 252, 254], [255, 255, 255], [0, 0, 0], [10, 20, 30]]], dtype=np.uint8)
    assert to_grey(img).tolist() == [[201, 200, 255, 0, 18]]


def test_white_mask_keeps_large_blobs_drops_small_ones():
    img = np.zeros((20, 20, 3), dtype=np.uint8)
    img[0:10, 0:10] = 255  # 100 px blob: background
    img[15:19, 15:19] = 255  # 16 px blob: a bright speck in tissue
    mask = white_mask(img)
    assert mask.sum() == 100 and mask[0:10, 0:10].all()


def test_white_threshold_is_strict():
    assert not white_mask(np.full((10, 10, 3), 200, np.uint8)).any()
    assert white_mask(np.full((10, 10, 3), 201, np.uint8)).all()


def test_white_mask_corner_touching_blobs_are_separate():
    img = np.zeros((16, 16, 3), dtype=np.uint8)
    img[0:5, 0:6] = 255  # 30 px
    img[5:10, 6:12] = 255  # 30 px, touches the first only diagonally at (4,5)-(5,6)
    assert not white_mask(img).any()
    img[4, 6] = 255  # now 4-connected: one 61 px blob
    assert white_mask(img).sum() == 61
