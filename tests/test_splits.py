"""Train / validation / test parts by slide: whole slides, every row, the asked fractions, every class, the same everywhere."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from bonylib.evaluation.splits import PARTS, split_by_slide


def tiles_of(slides: int, seed: int) -> pd.DataFrame:
    """A manifest-like table: 1-30 tiles per slide, each slide with an ISUP grade 0-5."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(1, 31, slides)
    grade = rng.integers(0, 6, slides)
    return pd.DataFrame({"slide_id": np.repeat([f"slide-{i:04d}" for i in range(slides)], counts),
                         "isup": np.repeat(grade, counts)})


@pytest.mark.parametrize("slides", [3, 7, 10, 37, 200])
@pytest.mark.parametrize("stratified", [False, True])
def test_parts_are_whole_slides_cover_every_row_and_match_the_fractions(slides: int, stratified: bool) -> None:
    tiles = tiles_of(slides, seed=slides)
    part = pd.Series(split_by_slide(tiles.slide_id, seed=1, strata=tiles.isup if stratified else None))
    assert part.isin(PARTS).all() and len(part) == len(tiles), "every row has a part"
    assert (part.groupby(tiles.slide_id).nunique() == 1).all(), "no slide in two parts"
    per_part = part.groupby(tiles.slide_id).first().value_counts().reindex(PARTS, fill_value=0)
    assert (per_part >= 1).all(), "with at least 3 slides no part is empty"
    if slides >= 10:
        assert (abs(per_part - np.array([0.8, 0.1, 0.1]) * slides) <= 1).all(), per_part.to_dict()


def test_stratified_parts_see_every_grade_that_has_three_slides() -> None:
    grade = np.repeat(np.arange(6), [30, 12, 6, 4, 3, 1])  # grade 5 has one slide: training keeps it
    slides = [f"s{i}" for i in range(len(grade))]
    for seed in range(5):
        part = split_by_slide(slides, seed=seed, strata=grade)
        for name in PARTS:
            assert set(grade[part == name]) >= {0, 1, 2, 3, 4}, (seed, name)
        assert part[grade == 5][0] == "train"
    unstratified = [set(grade[split_by_slide(slides, seed=s) == "test"]) for s in range(5)]
    assert any(not seen >= {0, 1, 2, 3, 4} for seen in unstratified), "without strata a part misses grades"


def test_split_is_deterministic_seeded_and_ignores_row_order() -> None:
    tiles = tiles_of(50, seed=3)
    part = split_by_slide(tiles.slide_id, seed=4, strata=tiles.isup)
    assert (split_by_slide(tiles.slide_id, seed=4, strata=tiles.isup) == part).all()
    assert (split_by_slide(tiles.slide_id, seed=5, strata=tiles.isup) != part).any()
    shuffled = tiles.sample(frac=1, random_state=0)
    again = pd.Series(split_by_slide(shuffled.slide_id, seed=4, strata=shuffled.isup), index=shuffled.index)
    assert (again.sort_index().to_numpy() == part).all()


def test_split_does_not_depend_on_pythons_string_hash() -> None:
    code = ("from bonylib.evaluation.splits import split_by_slide;"
            "print(''.join(p[0] for p in split_by_slide([f's{i}' for i in range(40)], seed=0, strata=[i % 3 for i in range(40)])))")
    outputs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                              env={**os.environ, "PYTHONHASHSEED": str(h)}).stdout for h in (1, 2)}
    assert len(outputs) == 1
    assert outputs.pop().strip() == "".join(p[0] for p in split_by_slide([f"s{i}" for i in range(40)], seed=0,
                                                                          strata=[i % 3 for i in range(40)]))


def test_a_slide_with_two_strata_is_refused() -> None:
    with pytest.raises(ValueError, match="'a' has more than one stratum"):
        split_by_slide(["a", "a", "b"], strata=[0, 1, 0])
