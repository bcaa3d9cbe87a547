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
