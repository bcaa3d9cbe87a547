"""The benchmarks' metrics: classification, slide grading, segmentation and reconstruction scores, and
their spread over runs (intervals over slides: :mod:`bonylib.evaluation.intervals`).

scikit-learn computes the classification scores too (the tests compare against it), but here every
classification and segmentation score is read off one ``np.bincount`` confusion matrix: 30-60x faster a
call than scikit-learn's validated functions (40 against 1,400 µs for balanced accuracy of 2,000 tiles),
which is what a 1,000-resample bootstrap per benchmark, encoder and run spends its time on; numpy
arrays and torch tensors alike; and one rule for a prediction of -1, "not predicted" (the k-NN
convention for a tile whose class no training slide has), left out rather than counted wrong. Image
scores (MSE, PSNR, SSIM) are returned per image, so a benchmark can average them, plot them, and
bootstrap them over slides without recomputing."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from skimage.metrics import structural_similarity

ArrayLike = np.ndarray | torch.Tensor | Sequence[Any]

SSIM_SIGMA = 1.5
"""Standard deviation in pixels of SSIM's Gaussian window (Wang et al., 2004)."""
SSIM_WINDOW = 11
"""Side of that window as scikit-image cuts it (3.5 σ either side): the smallest image SSIM can score."""


def as_numpy(values: ArrayLike) -> np.ndarray:
    """``values`` as a numpy array (a torch tensor is detached and moved to the CPU first)."""
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().numpy()
    return np.asarray(values)


# ---- classification (tiles) and grading (slides) ----------------------------------------------


def confusion_matrix(y_true: ArrayLike, y_pred: ArrayLike, num_classes: int | None = None) -> np.ndarray:
    """(C, C) counts: row = true class, column = predicted class; predictions below 0 are not counted.

    ``num_classes`` defaults to one more than the largest class seen; pass it so that runs missing a
    rare class still give matrices of one shape.
    """
    truth, predicted = as_numpy(y_true).ravel().astype(np.int64), as_numpy(y_pred).ravel().astype(np.int64)
    if truth.shape != predicted.shape:
        raise ValueError(f"y_true has {truth.size} values but y_pred has {predicted.size}")
    if (truth < 0).any():
        raise ValueError("y_true holds a negative class; only predictions may be -1 (not predicted)")
    counted = predicted >= 0
    truth, predicted = truth[counted], predicted[counted]
    if num_classes is None:
        num_classes = int(max(truth.max(initial=-1), predicted.max(initial=-1))) + 1
    elif truth.size and max(truth.max(), predicted.max()) >= num_classes:
        raise ValueError(f"a class is >= num_classes = {num_classes}")
    return np.bincount(truth * num_classes + predicted, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def _f1_per_class(counts: np.ndarray) -> np.ndarray:
    """2 TP / (2 TP + FP + FN) per class of a confusion matrix; NaN for a class neither true nor predicted."""
    tp = np.diag(counts).astype(np.float64)
    denominator = counts.sum(0) + counts.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, 2 * tp / denominator, np.nan)


def accuracy(y_true: ArrayLike, y_pred: ArrayLike) -> float:
    """Share of predicted items that are right (the seed's PANDA metric); NaN when none is predicted."""
    counts = confusion_matrix(y_true, y_pred)
    total = counts.sum()
    return float(np.trace(counts) / total) if total else float("nan")


def balanced_accuracy(y_true: ArrayLike, y_pred: ArrayLike) -> float:
    """Mean recall over the classes present in ``y_true`` (kaiko eva's headline patch metric).

    With 70 % benign tiles, answering "benign" everywhere scores 0.7 accuracy but only 1 / classes
    balanced accuracy, so this is the score that shows whether the minority grades are seen at all.
    """
    counts = confusion_matrix(y_true, y_pred)
    support = counts.sum(1)
    present = support > 0
    return float(np.mean(np.diag(counts)[present] / support[present])) if present.any() else float("nan")


def macro_f1(y_true: ArrayLike, y_pred: ArrayLike) -> float:
    """Unweighted mean F1 over the classes that are true or predicted somewhere (scikit-learn's macro)."""
    f1 = _f1_per_class(confusion_matrix(y_true, y_pred))
    return float(np.nanmean(f1)) if np.isfinite(f1).any() else float("nan")


def quadratic_weighted_kappa(y_true: ArrayLike, y_pred: ArrayLike, num_classes: int | None = None) -> float:
    """Cohen's kappa with quadratic weights (PANDA's official metric for ISUP grades 0-5).

    Disagreements cost the squared distance between the *grades*, so ``num_classes`` fixes the scale:
    PANDA uses 6 even when a sample lacks a grade. 1 is perfect agreement, 0 what chance gives, and
    NaN when chance alone would already agree perfectly (a single grade everywhere).
    """
    observed = confusion_matrix(y_true, y_pred, num_classes).astype(np.float64)
    total = observed.sum()
    if not total:
        return float("nan")
    grades = np.arange(len(observed))
    weights = (grades[:, None] - grades[None, :]) ** 2
    expected = np.outer(observed.sum(1), observed.sum(0)) / total
    chance = (weights * expected).sum()
    return float(1 - (weights * observed).sum() / chance) if chance else float("nan")


# ---- segmentation (label maps) -----------------------------------------------------------------


def dice_per_class(y_true: ArrayLike, y_pred: ArrayLike, num_classes: int) -> np.ndarray:
    """Dice 2|P∩T| / (|P| + |T|) of each class over all pixels of all maps; NaN where a class is in neither.

    Pixels are pooled over the set (not averaged per map), so a map where a class covers three pixels
    weighs what its three pixels weigh, instead of swinging the mean from 0 to 1.
    """
    return _f1_per_class(confusion_matrix(y_true, y_pred, num_classes))


def iou_per_class(y_true: ArrayLike, y_pred: ArrayLike, num_classes: int) -> np.ndarray:
    """Intersection over union TP / (TP + FP + FN) of each class over all pixels; NaN where a class is in neither."""
    counts = confusion_matrix(y_true, y_pred, num_classes)
    tp = np.diag(counts).astype(np.float64)
    union = counts.sum(0) + counts.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / union, np.nan)


def mean_iou(y_true: ArrayLike, y_pred: ArrayLike, num_classes: int) -> float:
    """Mean over the classes present (in truth or prediction) of :func:`iou_per_class`."""
    iou = iou_per_class(y_true, y_pred, num_classes)
    return float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan")


# ---- reconstruction (images) -------------------------------------------------------------------


def _image_pair(target: ArrayLike, predicted: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Both batches as float64 arrays of one shape (N, ..., H, W)."""
    target, predicted = as_numpy(target).astype(np.float64), as_numpy(predicted).astype(np.float64)
    if target.shape != predicted.shape or target.ndim < 3:
        raise ValueError(f"expected two image batches (N, [C,] H, W) of one shape, got {target.shape} and {predicted.shape}")
    return target, predicted


def mse(target: ArrayLike, predicted: ArrayLike) -> np.ndarray:
    """Mean squared error of each image (N,) of a batch (N, [C,] H, W); the seed's decoder metric is their mean."""
    target, predicted = _image_pair(target, predicted)
    return ((target - predicted) ** 2).reshape(len(target), -1).mean(1)


def psnr(target: ArrayLike, predicted: ArrayLike, data_range: float = 1.0) -> np.ndarray:
    """Peak signal-to-noise ratio in dB of each image, 10 log10(range² / MSE); inf for an exact copy."""
    with np.errstate(divide="ignore"):
        return 10 * np.log10(data_range**2 / mse(target, predicted))


def ssim(target: ArrayLike, predicted: ArrayLike, data_range: float = 1.0) -> np.ndarray:
    """Structural similarity of each image (N,) of a batch (N, [C,] H, W), channels averaged.

    Wang et al. (2004) with a Gaussian window (σ = 1.5) and population covariances: scikit-image's
    ``structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False)``, one image
    at a time. A batched torch version was measured 9x slower on the CPU (64 RGB tiles at 224 px:
    11.3 s against 1.25 s), since one-channel 11-tap convolutions are torch's slow path and scipy's
    separable filter is not.
    """
    target_np, predicted_np = _image_pair(target, predicted)
    height, width = target_np.shape[-2:]
    if min(height, width) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW} px a side, got {height} x {width}")
    shape = (len(target_np), -1, height, width)
    return np.array([structural_similarity(t, p, channel_axis=0, gaussian_weights=True, sigma=SSIM_SIGMA,
                                           use_sample_covariance=False, data_range=data_range)
                     for t, p in zip(target_np.reshape(shape), predicted_np.reshape(shape))], dtype=np.float64)


# ---- spread over runs -------------------------------------------------------------------------


def mean_std(values: Sequence[float] | np.ndarray) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof = 1) of one score over runs (seeds).

    The runs are a sample of the seeds one could have drawn, hence ddof = 1; a single run has no
    measured spread, so its std is NaN rather than a reassuring 0.
    """
    values = np.asarray(values, dtype=np.float64)
    if not values.size:
        return float("nan"), float("nan")
    return float(values.mean()), (float(values.std(ddof=1)) if values.size > 1 else float("nan"))
