"""Train / validation / test parts made of whole slides.

The seed split PANDA's tiles at random, which puts tiles of one slide (one stain, one scanner, one
patient) on both sides, so a probe is rewarded for recognising the slide. Here the unit is the slide.

scikit-learn's ``StratifiedGroupKFold`` (the design's default for grouped splits) stratifies *tile*
labels and deals folds of uneven slide counts; these benchmarks need something else: parts sized in
slides (0.8 / 0.1 / 0.1 of them), stratified by a *slide* label (its ISUP grade, or its provider), and
every class in every part where the slides allow it. The split depends only on the slide names, the
labels and the seed (numpy's PCG64 stream, not Python's per-process ``hash()``), so it is the same on
every machine and for any order of the rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

PARTS = ("train", "val", "test")


def _part_sizes(slides: int, fractions: Sequence[float]) -> np.ndarray:
    """Slides per part: each within one slide of its fraction (largest remainders), and at least one per
    part with a positive fraction whenever there are as many slides as such parts (taken from the
    largest part), because an empty validation or test part ends the benchmark."""
    share = np.asarray(fractions, dtype=np.float64) / np.sum(fractions) * slides
    sizes = np.floor(share).astype(np.int64)
    for part in np.argsort(-(share - sizes), kind="stable")[: slides - sizes.sum()]:
        sizes[part] += 1
    wanted = np.asarray(fractions) > 0
    if slides >= wanted.sum():
        for part in np.flatnonzero(wanted & (sizes == 0)):
            sizes[np.argmax(sizes)] -= 1
            sizes[part] = 1
    return sizes


def split_by_slide(slides: Sequence[Any] | np.ndarray, fractions: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0,
                   strata: Sequence[Any] | np.ndarray | None = None) -> np.ndarray:
    """The part (``"train"``, ``"val"`` or ``"test"``) of each row, whole slides per part.

    ``slides`` names each row's slide (a manifest's ``slide_id`` column); ``strata``, if given, is a
    slide-level label per row (constant within a slide) to stratify by. The validation and test slides
    are drawn one at a time, the part furthest below its size first, each from the stratum that part
    lacks (keeping at least one slide of it for training), else from the stratum furthest below its
    share in that part, ties broken by the seeded stream; training keeps the rest.
    """
    if len(fractions) != len(PARTS):
        raise ValueError(f"fractions must give one share for each of {PARTS}, got {tuple(fractions)}")
    names, row_slide = np.unique(np.asarray(slides).astype(str), return_inverse=True)
    row_slide = row_slide.ravel()
    if strata is None:
        labels = np.zeros(len(row_slide), dtype=np.int64)
    else:
        labels = np.unique(np.asarray(strata).astype(str), return_inverse=True)[1].ravel()
    if len(labels) != len(row_slide):
        raise ValueError(f"strata has {len(labels)} rows but slides has {len(row_slide)}")
    slide_label = np.full(len(names), -1)
    slide_label[row_slide] = labels
    mixed = row_slide[slide_label[row_slide] != labels]
    if mixed.size:
        raise ValueError(f"slide {str(names[mixed[0]])!r} has more than one stratum label")

    rng = np.random.default_rng(seed)
    strata_count = slide_label.max(initial=-1) + 1
    unassigned = [list(rng.permutation(np.flatnonzero(slide_label == s))) for s in range(strata_count)]
    stratum_size = np.array([len(u) for u in unassigned], dtype=np.float64)
    sizes = _part_sizes(len(names), fractions)
    part_of_slide = np.zeros(len(names), dtype=np.int64)  # training unless drawn below
    taken = np.zeros((len(PARTS), strata_count), dtype=np.int64)
    share = np.asarray(fractions, dtype=np.float64) / np.sum(fractions)
    for _ in range(sizes[1:].sum()):
        need = sizes[1:] - taken[1:].sum(1)
        part = 1 + int(np.argmax(need / sizes[1:].clip(min=1)))
        left = np.array([len(u) for u in unassigned])
        key = np.lexsort((rng.random(strata_count),                       # 4. the seeded tie-break
                          taken[part] - share[part] * stratum_size,       # 3. furthest below its share
                          left < 2,                                       # 2. leaves training one slide
                          ~((taken[part] == 0) & (left >= 2)),            # 1. a class this part lacks
                          left == 0))                                     # 0. has a slide left at all
        stratum = key[0]
        part_of_slide[unassigned[stratum].pop()] = part
        taken[part, stratum] += 1
    return np.asarray(PARTS)[part_of_slide[row_slide]]
