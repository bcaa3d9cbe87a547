"""Label encodings of the prostate datasets and the Gleason-score rules that tie them together.

PANDA ships masks from two providers with different encodings (red channel of the mask TIFF):
Radboud grades every gland, Karolinska only outlines cancer regions. The manifest's
``label_name`` vocabulary covers both: ``cancer`` is Karolinska cancer whose grade is unknown.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd
from scipy import ndimage

LABEL_NAMES: tuple[str, ...] = ("background", "benign", "G3", "G4", "G5", "cancer")
FRACTION_COLUMNS: tuple[str, ...] = tuple(f"frac_{name}" for name in LABEL_NAMES)
"""Manifest columns holding each class's share of a tile (``LABEL_NAMES`` order): what :func:`relabel` reads."""

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


# ---- tile labels from masks ------------------------------------------------------------------

# Rank of each manifest label for the "highest class present" policy: Gleason patterns above
# ungraded cancer (a graded pattern says more), cancer above benign, benign above background.
LABEL_RANK: dict[str, int] = {"background": 0, "benign": 1, "cancer": 2, "G3": 3, "G4": 4, "G5": 5}

MASK_ENCODINGS: dict[str, dict[int, str]] = {
    # PANDA Radboud: stroma and benign epithelium are both benign tissue
    "radboud": {0: "background", 1: "benign", 2: "benign", 3: "G3", 4: "G4", 5: "G5"},
    "karolinska": {0: "background", 1: "benign", 2: "cancer"},
    # SICAPv2 masks: 0 is non-cancerous (the patch is tissue), 3/4/5 Gleason patterns
    "sicapv2": {0: "benign", 3: "G3", 4: "G4", 5: "G5"},
    # DeepGleason-style: artefacts are not a tissue class, they count as background
    "deepgleason": {0: "background", 1: "background", 2: "benign", 3: "G3", 4: "G4", 5: "G5"},
}

POLICIES: tuple[str, ...] = ("max", "majority", "min_fraction")


LOSSY_ENCODINGS = frozenset({"sicapv2"})
"""Encodings stored as JPEG, whose values blur and ring near edges: snapped and median-filtered."""


def snap_codes(codes: np.ndarray, encoding: str) -> np.ndarray:
    """Mask values (one (H, W) region or an (N, H, W) stack) cleaned for reading as codes of ``encoding``.

    Lossless encodings are returned as they are. JPEG masks are snapped to the nearest code, then
    given a 5x5 median: JPEG ringing along a 0|3 edge reads as 4 on a band of pixels, which would
    make every Gleason-3 patch Gleason 4 under the "max" policy.
    """
    if encoding not in LOSSY_ENCODINGS:
        return codes
    valid = np.array(sorted(MASK_ENCODINGS[encoding]), dtype=np.uint8)
    snapped = valid[np.abs(np.arange(256)[:, None] - valid.astype(int)).argmin(axis=1)][codes]
    return ndimage.median_filter(snapped, size=5 if codes.ndim == 2 else (1, 5, 5), mode="nearest")


def tile_labels(fractions: np.ndarray, policy: str, min_fraction: float = 0.05) -> np.ndarray:
    """``label_name`` of each tile from its class fractions ((N, 6), ``LABEL_NAMES`` order).

    - ``max`` (the seed's): the highest class present at all;
    - ``majority``: the most extensive class, glass included (ties go to the higher class);
    - ``min_fraction``: the highest cancer class covering at least ``min_fraction`` of the tile's
      tissue, so that a speck of G5 at the edge of a benign tile does not make it G5; otherwise
      benign, or background for a tile without tissue.
    """
    fractions = np.atleast_2d(np.asarray(fractions, np.float32))
    rank = np.array([LABEL_RANK[n] for n in LABEL_NAMES])
    names = np.array(LABEL_NAMES, dtype=object)
    present = fractions > 0
    if policy == "max":
        return names[np.where(present, rank, -1).argmax(axis=1)]
    if policy == "majority":
        best = fractions.max(axis=1, keepdims=True)
        return names[np.where(present & (fractions == best), rank, -1).argmax(axis=1)]
    if policy == "min_fraction":
        tissue = 1.0 - fractions[:, LABEL_NAMES.index("background")]
        graded = present & (rank >= LABEL_RANK["cancer"]) & (fractions >= min_fraction * tissue[:, None])
        best = np.where(graded, rank, -1).argmax(axis=1)
        fallback = np.where(tissue > 0, "benign", "background").astype(object)
        return np.where(graded.any(axis=1), names[best], fallback)
    raise ValueError(f"unknown label policy '{policy}' (choose from {', '.join(POLICIES)})")


def relabel(manifest: pd.DataFrame, policy: str, min_fraction: float = 0.05) -> pd.Series:
    """``label_name`` of every tile under another label policy, from the manifest's class fractions: a manifest
    keeps the fractions so that labels can be re-derived without reading the slides again (empty where the slide
    had no mask)."""
    fractions = manifest[list(FRACTION_COLUMNS)].to_numpy()
    labels = tile_labels(np.nan_to_num(fractions), policy, min_fraction)
    return pd.Series(np.where(np.isnan(fractions).any(axis=1), "", labels), index=manifest.index, name="label_name")
