"""What every benchmark shares: heads and table columns, the run record, scoring from saved predictions,
the tile selection a benchmark embeds, and slide-level validation parts.

A benchmark fits *heads* (a linear probe, a decoder, ...) on cached embeddings; each fit is one *run*
(a seed, on a named split) and returns a :class:`RunOutput`: its scores and the per-row predictions
they came from. The runner (:mod:`bonylib.evaluation.evaluate`) saves the predictions beside the
scores, so every number of the results table, and its bootstrap interval over slides, is recomputed
from saved predictions (:func:`score`) instead of refitting a head.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd
import torch

from bonylib.config import to_dict
from bonylib.data.manifest import read_manifest
from bonylib.errors import BonyError, ConfigError
from bonylib.evaluation import metrics
from bonylib.evaluation.features import Features
from bonylib.evaluation.intervals import Interval, group_bootstrap
from bonylib.evaluation.probes import FitResult
from bonylib.evaluation.splits import split_by_slide
from bonylib.files import atomic_path, sha256_file

LABEL_METRICS = {
    "accuracy": lambda truth, predicted, classes: metrics.accuracy(truth, predicted),
    "balanced_accuracy": lambda truth, predicted, classes: metrics.balanced_accuracy(truth, predicted),
    "macro_f1": lambda truth, predicted, classes: metrics.macro_f1(truth, predicted),
    "quadratic_weighted_kappa": lambda truth, predicted, classes: metrics.quadratic_weighted_kappa(truth, predicted,
                                                                                                   classes),
}
"""Scores of predicted classes, as f(y_true, y_pred, number of classes), read from ``y_true`` and ``y_pred``."""
IMAGE_METRICS = ("mse", "psnr", "ssim")
"""Per-image scores of decoded images, saved one per row; the reported score is their mean."""
OVERLAP_METRICS = ("mean_dice", "mean_iou")
"""Scores of class maps pooled over every pixel of the set, read from per-image confusion matrices
(``dice_<class>`` per class as well)."""

METRIC_NAMES = {"accuracy": "accuracy", "balanced_accuracy": "bal. acc.", "macro_f1": "macro-F1",
                "quadratic_weighted_kappa": "QWK", "mse": "MSE", "psnr": "PSNR (dB)", "ssim": "SSIM",
                "mean_dice": "mean Dice", "mean_iou": "mIoU"}
"""How the results table names each metric."""
LOWER_IS_BETTER = frozenset({"mse"})
"""The metrics that are errors; every other metric is a score, higher is better."""
CLASS_AVERAGED = frozenset({"balanced_accuracy", "macro_f1", "mean_dice", "mean_iou"})
"""Metrics that average over the classes present (``dice_<class>`` needs its class): a resample of the test
groups that misses a class scores another task (:mod:`bonylib.evaluation.intervals`)."""


@dataclass(frozen=True)
class Column:
    """One column of the results table: ``metric`` of ``head``'s runs on ``splits``, pooled.

    A column over several splits (SICAPv2's Val1-Val4 folds) reports the mean ± std of the runs and a
    bootstrap interval of the predictions of all its splits pooled (every training patient is tested once).
    """

    head: str
    metric: str
    splits: tuple[str, ...]
    label: str
    headline: bool = True
    """Shown in the markdown table (all columns go to the CSV)."""

    @property
    def name(self) -> str:
        """The header: the label and where its numbers come from (``SICAPv2 patches bal. acc. (Val1-Val4 pooled)``)."""
        where = self.splits[0] if len(self.splits) == 1 else f"{self.splits[0]}-{self.splits[-1]} pooled"
        return f"{self.label} ({where})"


@dataclass(frozen=True)
class Head:
    """A head of a benchmark: the embedding ``output`` it reads and the (split, seed) of each of its runs."""

    name: str
    output: str
    runs: tuple[tuple[str, int], ...]


@dataclass
class RunOutput:
    """What one fit produced.

    ``arrays`` are saved as npz and must hold ``rows`` (manifest row ids, or slide ids for slide-level
    heads) and ``groups`` (the slide or patient of each row, the unit the bootstrap resamples), plus what
    :func:`score` reads for the head's metrics: ``y_true``/``y_pred``, per-image ``mse``/``psnr``/``ssim``,
    or per-image ``confusion`` (N, C, C); anything else (examples for plots) rides along. ``info`` goes
    into the JSON record (classes, learning curve, confusion matrix, best step, sizes).
    """

    metrics: dict[str, float]
    arrays: dict[str, np.ndarray]
    info: dict[str, Any] = field(default_factory=dict)


class Benchmark(Protocol):
    """The interface the runner drives; one implementation per module of this package."""

    name: str
    title: str
    """How the results table names it."""
    group_unit: str
    """What its test groups are, for the results table's words ("slides", "patients")."""
    manifest: Path
    """The tile manifest whose embeddings the heads read (a selection of the configured one)."""
    heads: dict[str, Head]
    columns: list[Column]

    def settings(self, head: str) -> dict[str, Any]:
        """Everything that decides ``head``'s numbers (a finished run with other settings is redone)."""

    def classes(self, head: str) -> list[str]:
        """Class names of ``head`` (what ``y_true``/``y_pred`` and confusion indices mean)."""

    def fit(self, head: str, split: str, seed: int, features: Features, device: torch.device) -> RunOutput:
        """Fit ``head`` on ``features`` (the manifest's embeddings of the head's output, in row order, read from the
        store on demand: a benchmark passes them to :mod:`~bonylib.evaluation.benchmarks.heads`) and score it."""


# ---- scoring ----------------------------------------------------------------------------------


def overlap_scores(confusion: np.ndarray, classes: Sequence[str]) -> dict[str, float]:
    """Per-class Dice, their mean, and mIoU of a pixel confusion matrix (C, C) pooled over a set of images.

    The same quantities as :func:`metrics.dice_per_class` and :func:`metrics.mean_iou` on the label maps
    (the tests check it), from the summed matrix: resampling slides for the bootstrap then costs a sum of
    small matrices instead of a pass over every pixel of every resample. NaN for a class in neither.
    """
    tp = np.diag(confusion).astype(np.float64)
    both = confusion.sum(0) + confusion.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        dice = np.where(both > 0, 2 * tp / both, np.nan)
        iou = np.where(both > 0, tp / (both - tp), np.nan)
    present = np.isfinite(dice)
    scores = {f"dice_{name}": float(value) for name, value in zip(classes, dice)}
    scores["mean_dice"] = float(dice[present].mean()) if present.any() else float("nan")
    scores["mean_iou"] = float(iou[present].mean()) if present.any() else float("nan")
    return scores


def score(metric: str, arrays: Mapping[str, np.ndarray], classes: Sequence[str]) -> float:
    """``metric`` of a set of saved predictions (all rows of a run, or a bootstrap resample of them)."""
    if metric in LABEL_METRICS:
        return float(LABEL_METRICS[metric](arrays["y_true"], arrays["y_pred"], len(classes)))
    if metric in IMAGE_METRICS:
        return float(np.mean(arrays[metric]))
    if metric in OVERLAP_METRICS or metric.startswith("dice_"):
        return overlap_scores(arrays["confusion"].sum(0), classes)[metric]
    raise ValueError(f"unknown metric {metric!r}")


def replica_score(metric: str, replicas: Sequence[Mapping[str, np.ndarray]], classes: Sequence[str],
                  rows: np.ndarray | None = None) -> float:
    """Mean over replicas (runs with their own seeds, on the same rows) of ``metric``, on ``rows`` of each
    (all rows when None): the statistic whose bootstrap interval the results table reports."""
    values = [score(metric, r if rows is None else {k: v[rows] for k, v in r.items()}, classes) for r in replicas]
    return float(np.mean(values))


def class_presence(metric: str, arrays: Mapping[str, np.ndarray], classes: Sequence[str]) -> np.ndarray | None:
    """(rows, classes): the true classes each row carries (its label, or the classes of its mask), for a metric of
    :data:`CLASS_AVERAGED` (only its class for ``dice_<class>``); None for a metric that does not depend on them."""
    if metric not in CLASS_AVERAGED and not metric.startswith("dice_"):
        return None
    if "y_true" in arrays:
        presence = np.eye(len(classes), dtype=bool)[np.asarray(arrays["y_true"], np.int64)]
    else:
        presence = np.asarray(arrays["confusion"]).sum(2) > 0
    if metric.startswith("dice_"):
        presence = presence & (np.arange(len(classes)) == list(classes).index(metric.removeprefix("dice_")))
    return presence


def bootstrap_interval(metric: str, replicas: Sequence[Mapping[str, np.ndarray]], groups: np.ndarray,
                       classes: Sequence[str], resamples: int, unit: str = "slides", seed: int = 0) -> Interval:
    """95 % interval of :func:`replica_score` over ``resamples`` resamples of whole groups (slides), or why there is
    none (too few groups; a class missed by too many resamples): :func:`bonylib.evaluation.intervals.group_bootstrap`.

    Every replica must hold the same rows in the same order (runs of one split differ only by seed), so
    one resample of slides picks the same tiles from each.
    """
    return group_bootstrap(lambda rows: replica_score(metric, replicas, classes, rows), groups, resamples,
                           class_presence(metric, replicas[0], classes), classes, unit, seed=seed)


def label_scores(y_true: np.ndarray, y_pred: np.ndarray, classes: Sequence[str],
                 names: Sequence[str]) -> dict[str, float]:
    """``names`` (keys of :data:`LABEL_METRICS`) of class predictions."""
    return {name: float(LABEL_METRICS[name](y_true, y_pred, len(classes))) for name in names}


def curve_of(fit: FitResult) -> list[dict[str, float]]:
    """A fit's learning curve as JSON-able numbers."""
    return [{key: float(value) for key, value in entry.items()} for entry in fit.curve]


# ---- the tiles a benchmark embeds ---------------------------------------------------------------


def select_tiles(manifest: Path, keep: np.ndarray | None, max_tiles: int, seed: int, out: Path,
                 frame: pd.DataFrame | None = None) -> Path:
    """The manifest the benchmark embeds: ``manifest`` itself, or its rows ``keep`` (a boolean mask; None: all)
    cut to a seeded sample of ``max_tiles`` (0: no cap), written once under ``out`` and named by its content.
    ``frame``: the manifest as the caller already read it (:func:`read_manifest`), so it is not read again.

    Two benchmarks that select the same rows of one manifest (PANDA tiles and slide-level ISUP with the
    same sample) get the same file, hence one embedding store. Shard columns are dropped from a
    selection: their paths are relative to the tiling folder, so its tiles are read from the slides.
    """
    if frame is None:
        frame, _ = read_manifest(manifest)
    chosen = np.ones(len(frame), bool) if keep is None else np.asarray(keep, bool)
    index = np.flatnonzero(chosen)
    if max_tiles and len(index) > max_tiles:
        index = np.sort(np.random.default_rng(seed).choice(index, max_tiles, replace=False))
    if len(index) == len(frame):
        return manifest
    if not len(index):
        raise BonyError(f"{manifest}: no tiles left for this benchmark (check its classes and labels)")
    selection = frame.iloc[index].drop(columns=["shard", "shard_offset", "shard_length"], errors="ignore")
    digest = hashlib.sha256(f"{sha256_file(manifest)}:{index.tobytes().hex()}".encode()).hexdigest()[:16]
    dest = out / f"selection-{len(index)}-{digest}.parquet"
    if not dest.is_file():
        with atomic_path(dest) as tmp:
            selection.reset_index(drop=True).to_parquet(tmp, index=False)
    return dest


def benchmark_tiles(manifest: Path, max_tiles: int, seed: int, out: Path,
                    keep: Callable[[pd.DataFrame], np.ndarray] | None = None) -> tuple[Path, pd.DataFrame, np.ndarray]:
    """:func:`select_tiles` of a benchmark's manifest, read once: the manifest it embeds, with that manifest's
    rows and checked row ids. ``keep`` picks rows from the whole manifest (PANDA: the tiles of its classes)."""
    frame, ids = read_manifest(manifest)
    chosen = select_tiles(manifest, None if keep is None else keep(frame), max_tiles, seed, out, frame)
    return (chosen, frame, ids) if chosen == manifest else (chosen, *read_manifest(chosen))


def check_heads(section: str, heads: Sequence[str], known: Sequence[str]) -> None:
    """A :class:`ConfigError` naming the first of a benchmark's ``heads`` that it does not have."""
    unknown = [h for h in heads if h not in known]
    if unknown:
        raise ConfigError(f"{section}.heads: unknown head {unknown[0]!r} (choose from {', '.join(known)})")


RUN_KEYS = ("runs", "heads", "partitions", "scored_parts")
"""Config keys that say which runs exist, not how one is fitted: adding runs or heads keeps the finished ones."""


def settings_of(cfg: Any, manifest: Path, unused: Sequence[str] = ()) -> dict[str, Any]:
    """What decides a run's numbers: the benchmark's config less :data:`RUN_KEYS` and less ``unused`` (dotted keys
    the head does not read, such as k-NN's ``probe.lr``), and the embedded manifest's content."""
    settings = {k: v for k, v in to_dict(cfg).items() if k not in RUN_KEYS}
    for key in unused:
        section, _, leaf = key.rpartition(".")
        (settings[section] if section else settings).pop(leaf)
    return {**settings, "manifest_sha256": sha256_file(manifest)}


SCORED_PARTS = ("val", "test")
"""The parts a benchmark's heads can be scored on: test (ours), and val, where the seed reported its numbers."""


def check_scored(where: str, scored: Sequence[str]) -> None:
    """Refuse ``<where>.scored_parts`` that is empty, repeats a part, or names one that is not val or test."""
    bad = [part for part in scored if part not in SCORED_PARTS]
    if bad or not scored or len(set(scored)) != len(scored):
        raise ConfigError(f"{where}.scored_parts: need one or more distinct parts of {', '.join(SCORED_PARTS)}, "
                          f"got {list(scored)}")


class LastFit:
    """The last fitted head's outputs on every scored part, so that a head scored on val and on test is trained once
    per seed: the runner asks for (val, seed) and (test, seed) one after the other, with the same features."""

    def __init__(self) -> None:
        self._key: tuple[Any, ...] | None = None
        self._features: object = None
        self._value: Any = None

    def __call__(self, key: tuple[Any, ...], features: object, fit: Callable[[], Any]) -> Any:
        """``fit()``'s result, computed again unless ``key`` and ``features`` (by identity) are the last call's."""
        if key != self._key or features is not self._features:
            self._key, self._features, self._value = key, features, fit()
        return self._value


def with_validation(parts: np.ndarray, groups: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """``parts`` with a ``fraction`` of the training groups (slides, patients) moved to ``"val"``: for datasets
    whose official split has no validation part, which early stopping needs. Whole groups move."""
    train = parts == "train"
    if not train.any():
        raise BonyError("no training rows to hold validation slides out of")
    parts = parts.copy()
    parts[train] = split_by_slide(groups[train], (1 - fraction, fraction, 0.0), seed=seed)
    return parts


def check_parts(parts: np.ndarray, groups: np.ndarray, where: str) -> None:
    """Refuse parts that would make a benchmark meaningless: an empty train/val/test part, or a slide in two."""
    for part in ("train", "val", "test"):
        if not (parts == part).any():
            raise BonyError(f"{where}: the {part} part is empty (too few slides for these fractions)")
    shared = pd.DataFrame({"group": groups, "part": parts}).groupby("group")["part"].nunique()
    if (shared > 1).any():
        raise BonyError(f"{where}: slide {shared.index[shared > 1][0]!r} is in two parts")


def check_classes(targets: np.ndarray, parts: np.ndarray, classes: Sequence[str], where: str) -> None:
    """Refuse a classification task that a head cannot get wrong: fewer than two classes among the training rows, and
    no other class among the test rows. A head trained on one class predicts it everywhere, and a test part of that
    class then scores 1.000 on every metric (a PANDA manifest of one class did, with exit status 0). A test part with
    a class the training rows lack is scored: the head is wrong on it, which the scores show."""
    targets, parts = np.asarray(targets), np.asarray(parts)
    trained = sorted({int(t) for t in targets[(parts == "train") & (targets >= 0)]})
    tested = {int(t) for t in targets[(parts == "test") & (targets >= 0)]}
    if len(trained) < 2 and tested <= set(trained):
        names = ", ".join(str(classes[i]) for i in trained) or "none"
        raise BonyError(f"{where}: the training and test parts hold {len(trained)} class ({names}); a head trained on "
                        f"fewer than two classes cannot be wrong on them, so every score would be 1.000 (give it rows "
                        f"of two or more classes)")


def class_targets(labels: Sequence[str], classes: Sequence[str]) -> np.ndarray:
    """Index of each label in ``classes`` (-1 where it is not one of them)."""
    lookup = {name: i for i, name in enumerate(classes)}
    return np.array([lookup.get(str(label), -1) for label in labels], dtype=np.int64)


def ladder_size(grid: int, target: int) -> int:
    """The decoder output side nearest ``target`` (in log scale) that a grid of side ``grid`` reaches by
    doubling at least once: the patch-token decoder starts from the encoder's token grid (6 for XCiT at
    96 px, 16 for Hibou at 224), so it cannot always end at the vector decoder's size."""
    return grid * 2 ** max(1, round(math.log2(target / grid)))
