"""Gleason score and ISUP grade rules, checked on the cases the PANDA and ISUP texts spell out."""

from __future__ import annotations

import pytest

from bonylib.data.labels import gleason_score, gleason_score_text, isup_grade


@pytest.mark.parametrize(
    ("areas", "score"),
    [
        ({}, None),
        ({3: 0, 4: 0}, None),
        ({3: 100}, (3, 3)),
        ({4: 60, 3: 40}, (4, 3)),
        ({3: 60, 4: 40}, (3, 4)),
        ({4: 97, 3: 3}, (4, 4)),  # a lower-grade minority under 5 % is ignored
        ({4: 95, 3: 5}, (4, 3)),  # ... and counts from 5 %
        ({4: 60, 3: 37, 5: 3}, (4, 5)),  # the highest grade is always reported (PANDA's example)
        ({3: 98, 5: 2}, (3, 5)),
        ({5: 80, 4: 20}, (5, 4)),
        ({5: 50, 3: 50}, (5, 3)),  # a tie goes to the higher pattern as primary
    ],
)
def test_gleason_score(areas: dict[int, float], score: tuple[int, int] | None) -> None:
    assert gleason_score(areas) == score


def test_gleason_score_rejects_other_patterns() -> None:
    with pytest.raises(ValueError, match="3, 4 or 5"):
        gleason_score({2: 10})


@pytest.mark.parametrize(
    ("score", "isup"),
    [(None, 0), ((3, 3), 1), ((3, 4), 2), ((4, 3), 3), ((4, 4), 4), ((3, 5), 4), ((5, 3), 4),
     ((4, 5), 5), ((5, 4), 5), ((5, 5), 5)],
)
def test_isup_grade(score: tuple[int, int] | None, isup: int) -> None:
    assert isup_grade(score) == isup


def test_score_text_matches_panda_csv() -> None:
    assert gleason_score_text(None, "radboud") == "negative"
    assert gleason_score_text(None, "karolinska") == "0+0"
    assert gleason_score_text((4, 3), "radboud") == "4+3"


# ---- tile labels from masks ------------------------------------------------------------------

import numpy as np  # noqa: E402

from bonylib.data.labels import LABEL_NAMES, MASK_ENCODINGS, tile_labels  # noqa: E402
from bonylib.data.mask_fractions import class_fractions, grid_class_fractions  # noqa: E402


def fractions_of(**parts: float) -> np.ndarray:
    return np.array([[parts.get(name, 0.0) for name in LABEL_NAMES]], np.float32)


def test_class_fractions_follow_each_encoding() -> None:
    mask = np.zeros((10, 10), np.uint8)
    mask[:, :4] = 1  # 40 % stroma
    mask[:2, 4:] = 2  # 12 % benign epithelium
    mask[2:3, 4:] = 4  # 6 % G4
    expected = {"background": 0.42, "benign": 0.52, "G4": 0.06}
    assert class_fractions(mask, "radboud") == pytest.approx([expected.get(n, 0) for n in LABEL_NAMES])
    karolinska = np.minimum(mask, 2)
    assert class_fractions(karolinska, "karolinska") == pytest.approx([0.42, 0.4, 0, 0, 0, 0.18])
    with pytest.raises(ValueError, match="not karolinska codes"):
        class_fractions(mask, "karolinska")


@pytest.mark.parametrize("side", [12, 301])
def test_class_fractions_of_a_stack_equal_a_count_per_tile(side: int) -> None:
    rng = np.random.default_rng(0)
    stack = rng.choice(np.array([0, 1, 2, 4], np.uint8), size=(7, side, side))
    stack[2] = 1  # a tile inside one region
    stack[5] = 0
    stack[6, :6] = 5  # two codes only
    table = {0: "background", 1: "benign", 2: "benign", 3: "G3", 4: "G4", 5: "G5"}
    expected = np.zeros((7, len(LABEL_NAMES)))
    for i, tile in enumerate(stack):
        for code, name in table.items():
            expected[i, LABEL_NAMES.index(name)] += (tile == code).sum() / tile.size
    assert class_fractions(stack, "radboud") == pytest.approx(expected)
    stack[3, 0, 0] = 255
    with pytest.raises(ValueError, match=r"mask values \[255\] are not radboud codes"):
        class_fractions(stack, "radboud")


@pytest.mark.parametrize("encoding", ["radboud", "sicapv2"])
def test_class_fractions_in_a_block_equal_those_of_the_regions_cut_out(encoding: str) -> None:
    """Tiling counts a mask block's tiles in place (and snaps a JPEG mask's tiles after cutting them out)."""
    size, rows, cols = 37, np.array([1, 0, 1, 0]), np.array([2, 0, 0, 1])
    codes = np.array(sorted(MASK_ENCODINGS[encoding]), np.uint8)
    block = np.random.default_rng(3).choice(codes, size=(2 * size, 3 * size))
    block[:size, size:2 * size] = codes[-1]
    cut = np.stack([block[r * size:(r + 1) * size, c * size:(c + 1) * size] for r, c in zip(rows, cols)])
    got = grid_class_fractions(block.reshape(2, size, 3, size), rows, cols, encoding)
    np.testing.assert_array_equal(got, class_fractions(cut, encoding))
    assert got[3, LABEL_NAMES.index(MASK_ENCODINGS[encoding][int(codes[-1])])] == 1


def test_jpeg_masks_snap_to_the_nearest_code() -> None:
    sicap = np.zeros((10, 10), np.uint8)
    sicap[:, :5] = 2  # reads as 3
    sicap[:, 5:] = 6  # reads as 5
    assert class_fractions(sicap, "sicapv2") == pytest.approx([0, 0, 0.5, 0, 0.5, 0])


def test_jpeg_ringing_is_not_a_class() -> None:
    import io

    from PIL import Image

    yy, xx = np.mgrid[:256, :256]
    drawn = np.where((yy - 128) ** 2 + (xx - 128) ** 2 < 70**2, 3, 0).astype(np.uint8)  # a Gleason-3 disc
    buffer = io.BytesIO()
    Image.fromarray(drawn).save(buffer, format="JPEG", quality=95)
    read = np.asarray(Image.open(buffer))
    assert (read == 4).any(), "JPEG rings past 3 along the disc's edge"
    fractions = class_fractions(read, "sicapv2")
    assert fractions[LABEL_NAMES.index("G4")] == 0 and fractions[LABEL_NAMES.index("G5")] == 0
    assert fractions[LABEL_NAMES.index("G3")] == pytest.approx((drawn == 3).mean(), abs=0.01)


@pytest.mark.parametrize(
    ("parts", "max_", "majority", "min_fraction"),
    [
        ({"background": 1.0}, "background", "background", "background"),
        ({"background": 0.7, "benign": 0.3}, "benign", "background", "benign"),
        ({"benign": 0.97, "G5": 0.03}, "G5", "benign", "benign"),  # a speck of G5 (3 % < 5 %)
        ({"benign": 0.5, "G3": 0.3, "G4": 0.2}, "G4", "benign", "G4"),
        ({"background": 0.5, "benign": 0.45, "G4": 0.04, "G3": 0.01}, "G4", "background", "G4"),  # 4 % of 50 % tissue
        ({"benign": 0.4, "cancer": 0.6}, "cancer", "cancer", "cancer"),
        ({"G3": 0.5, "G4": 0.5}, "G4", "G4", "G4"),  # ties go to the higher class
    ],
)
def test_label_policies(parts: dict[str, float], max_: str, majority: str, min_fraction: str) -> None:
    f = fractions_of(**parts)
    assert tile_labels(f, "max")[0] == max_
    assert tile_labels(f, "majority")[0] == majority
    assert tile_labels(f, "min_fraction", 0.05)[0] == min_fraction
