"""Label encodings of the prostate datasets and the Gleason-score rules that tie them together.

PANDA ships masks from two providers with different encodings (red channel of the mask TIFF):
Radboud grades every gland, Karolinska only outlines cancer regions. The manifest's
``label_name`` vocabulary covers both: ``cancer`` is Karolinska cancer whose grade is unknown.
"""

from __future__ import annotations

from collections.abc import Mapping

LABEL_NAMES: tuple[str, ...] = ("background", "benign", "G3", "G4", "G5", "cancer")

# Radboud mask codes: stroma and benign epithelium are both benign tissue.
RADBOUD_CODES: dict[int, str] = {0: "background", 1: "stroma", 2: "benign epithelium", 3: "G3", 4: "G4", 5: "G5"}
RADBOUD_STROMA, RADBOUD_BENIGN = 1, 2

# Karolinska mask codes: no grade in the mask.
KAROLINSKA_CODES: dict[int, str] = {0: "background", 1: "benign tissue", 2: "cancer"}
KAROLINSKA_BENIGN, KAROLINSKA_CANCER = 1, 2

GLEASON_PATTERNS: tuple[int, ...] = (3, 4, 5)

# ISUP grade group of each Gleason score (primary, secondary); 3+5 and 5+3 are group 4.
_ISUP: dict[tuple[int, int], int] = {
    (3, 3): 1, (3, 4): 2, (4, 3): 3, (4, 4): 4, (3, 5): 4, (5, 3): 4, (4, 5): 5, (5, 4): 5, (5, 5): 5,
}

MINOR_PATTERN_FRACTION = 0.05
"""A lower-grade secondary pattern counts only above 5 % of the tumour area (Epstein 2016)."""


def gleason_score(pattern_areas: Mapping[int, float]) -> tuple[int, int] | None:
    """Biopsy Gleason score from the area of each pattern; ``None`` for benign.

    Rules of the ISUP 2014 / PANDA grading: primary = most extensive pattern; the highest pattern
    is always reported, so if it is not the primary it is the secondary, however small; otherwise
    the secondary is the next most extensive pattern if it covers at least 5 % of the tumour, else
    the primary is repeated (4+4 rather than 4+3 with a trace of 3).
    """
    present = {g: float(a) for g, a in pattern_areas.items() if a > 0}
    unknown = set(present) - set(GLEASON_PATTERNS)
    if unknown:
        raise ValueError(f"Gleason patterns must be 3, 4 or 5, got {sorted(unknown)}")
    if not present:
        return None
    total = sum(present.values())
    ranked = sorted(present, key=lambda g: (-present[g], -g))
    primary = ranked[0]
    highest = max(present)
    if highest != primary:
        return primary, highest
    for grade in ranked[1:]:
        if present[grade] >= MINOR_PATTERN_FRACTION * total:
            return primary, grade
    return primary, primary


def isup_grade(score: tuple[int, int] | None) -> int:
    """ISUP grade group 0–5 of a Gleason score (0 = benign)."""
    if score is None:
        return 0
    try:
        return _ISUP[score]
    except KeyError:
        raise ValueError(f"not a Gleason score: {score}") from None


def gleason_score_text(score: tuple[int, int] | None, provider: str) -> str:
    """The score as PANDA's ``train.csv`` writes it: ``3+4``; benign is ``negative`` (Radboud) or ``0+0`` (Karolinska)."""
    if score is None:
        return "negative" if provider == "radboud" else "0+0"
    return f"{score[0]}+{score[1]}"
