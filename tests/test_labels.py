import pytest

from wsss.data.labels import format_label, parse_label
from wsss.errors import WsssError


@pytest.mark.parametrize(
    "name, expected",
    [
        ("1031280-2300-27920-[1 0 0 1].png", (1, 0, 0, 1)),
        ("TCGA-A1-A0SK-DX1_xmin45749_ymin25055_MPP-0.2500+0[1101].png", (1, 1, 0, 1)),
        ("a/b/c/x-[0 1 1 0].png", (0, 1, 1, 0)),
        # spaced style in a BCSS-like name and packed style in a LUAD-like name both parse
        ("TCGA-XX_MPP-0.2500+1[0 0 1 0].png", (0, 0, 1, 0)),
        ("1031280-2300-27920-[0001].png", (0, 0, 0, 1)),
        # only the last bracket group counts
        ("slide[2]-[1 1 1 1].png", (1, 1, 1, 1)),
    ],
)
def test_parse_both_styles(name, expected):
    assert parse_label(name, 4) == expected


@pytest.mark.parametrize(
    "name, fragment",
    [
        ("1031280-2300-27920.png", "carries no label"),
        ("x-[1 2 0 1].png", "carries no label"),
        ("x-[1 0 1].png", "has 3 digits, expected 4"),
        ("x-[0 0 0 0].png", "names no class"),
    ],
)
def test_bad_names_raise_with_file_name(name, fragment):
    with pytest.raises(WsssError) as err:
        parse_label(f"/data/train/{name}", 4)
    assert fragment in str(err.value)
    assert name in str(err.value)


def test_format_round_trip():
    assert format_label((1, 0, 0, 1)) == "[1 0 0 1]"
    assert format_label([1, 1, 0, 1], spaced=False) == "[1101]"
    assert parse_label(f"p-{format_label((0, 1, 0, 1))}.png", 4) == (0, 1, 0, 1)
