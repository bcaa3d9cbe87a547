"""The benchmark metrics against scikit-learn, scikit-image and hand computations (the slide bootstrap: test_intervals)."""

from __future__ import annotations

import statistics

import numpy as np
import pytest
import torch
from sklearn import metrics as sk
from skimage.metrics import mean_squared_error, peak_signal_noise_ratio, structural_similarity

from bonylib.evaluation.metrics import (accuracy, balanced_accuracy, confusion_matrix, dice_per_class, iou_per_class,
                                        macro_f1, mean_iou, mean_std, mse, psnr, quadratic_weighted_kappa, ssim)


def labels(seed: int, n: int = 300, classes: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Imbalanced truth and a prediction that is right 60 % of the time; class 4 is never true."""
    rng = np.random.default_rng(seed)
    truth = rng.choice(classes - 1, n, p=[0.55, 0.25, 0.15, 0.05])
    predicted = np.where(rng.random(n) < 0.6, truth, rng.integers(0, classes, n))
    return truth, predicted


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_classification_metrics_match_sklearn(seed: int) -> None:
    truth, predicted = labels(seed)
    np.testing.assert_array_equal(confusion_matrix(truth, predicted, 6), sk.confusion_matrix(truth, predicted, labels=range(6)))
    assert accuracy(truth, predicted) == pytest.approx(sk.accuracy_score(truth, predicted))
    assert balanced_accuracy(truth, predicted) == pytest.approx(sk.balanced_accuracy_score(truth, predicted))
    assert macro_f1(truth, predicted) == pytest.approx(sk.f1_score(truth, predicted, average="macro"))
    assert quadratic_weighted_kappa(truth, predicted, 6) == pytest.approx(
        sk.cohen_kappa_score(truth, predicted, weights="quadratic", labels=range(6)))
    as_tensors = torch.from_numpy(truth), torch.from_numpy(predicted)
    assert balanced_accuracy(*as_tensors) == balanced_accuracy(truth, predicted), "torch and numpy give one answer"


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_unpredicted_items_are_left_out_not_counted_wrong() -> None:
    truth, predicted = labels(3)
    dropped = predicted.copy()
    dropped[::4] = -1
    kept = dropped >= 0
    assert accuracy(truth, dropped) == pytest.approx(sk.accuracy_score(truth[kept], predicted[kept]))
    assert balanced_accuracy(truth, dropped) == pytest.approx(sk.balanced_accuracy_score(truth[kept], predicted[kept]))
    assert np.isnan(accuracy([1, 2], [-1, -1]))


def test_kappa_by_hand_and_on_a_fixed_grade_scale() -> None:
    # Two raters, grades 0-2: observed O, expected E = outer(row sums, column sums) / n, weights (i - j)².
    truth, predicted = [0, 0, 1, 1, 2, 2], [0, 1, 1, 1, 2, 0]
    observed = np.array([[1, 1, 0], [0, 2, 0], [1, 0, 1]])
    expected = np.outer([2, 2, 2], [2, 3, 1]) / 6
    weights = np.array([[0, 1, 4], [1, 0, 1], [4, 1, 0]])
    assert quadratic_weighted_kappa(truth, predicted) == pytest.approx(1 - (weights * observed).sum() / (weights * expected).sum())
    assert quadratic_weighted_kappa([0, 3, 5, 2], [0, 3, 5, 2], 6) == 1.0
    assert np.isnan(quadratic_weighted_kappa([2, 2, 2], [2, 2, 2], 6)), "one grade everywhere: chance already agrees"
    # Grades {0, 5} only: on PANDA's 0-5 scale a miss costs 25, not the 1 of two adjacent labels.
    assert quadratic_weighted_kappa([0, 5, 0, 5], [0, 5, 5, 5], 6) == pytest.approx(
        sk.cohen_kappa_score([0, 5, 0, 5], [0, 5, 5, 5], weights="quadratic", labels=range(6)))


def test_dice_and_iou_match_sklearn_over_pooled_pixels() -> None:
    rng = np.random.default_rng(4)
    truth = rng.integers(0, 3, (6, 16, 16))  # class 3 in neither map: NaN
    predicted = np.where(rng.random(truth.shape) < 0.7, truth, rng.integers(0, 3, truth.shape))
    flat_t, flat_p = truth.ravel(), predicted.ravel()
    np.testing.assert_allclose(dice_per_class(truth, predicted, 4)[:3], sk.f1_score(flat_t, flat_p, average=None))
    iou = sk.jaccard_score(flat_t, flat_p, average=None)
    np.testing.assert_allclose(iou_per_class(truth, predicted, 4)[:3], iou)
    assert np.isnan(dice_per_class(truth, predicted, 4)[3]) and np.isnan(iou_per_class(truth, predicted, 4)[3])
    assert mean_iou(truth, predicted, 4) == pytest.approx(iou.mean()), "a class in neither map is not averaged in"
    # By hand: truth has 2 pixels of class 1, the prediction 3, overlapping in 2.
    hand_t, hand_p = np.array([[[0, 1], [1, 0]]]), np.array([[[1, 1], [1, 0]]])
    np.testing.assert_allclose(dice_per_class(hand_t, hand_p, 2), [2 * 1 / (2 + 1), 2 * 2 / (2 + 3)])
    np.testing.assert_allclose(iou_per_class(hand_t, hand_p, 2), [1 / 2, 2 / 3])


@pytest.mark.parametrize("shape", [(3, 3, 32, 40), (2, 24, 24)])
def test_image_metrics_match_skimage_per_image(shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(5)
    target = rng.random(shape)
    predicted = np.clip(target + rng.normal(0, 0.1, shape) + 0.05, 0, 1)
    channel_axis = 0 if len(shape) == 4 else None
    for i in range(shape[0]):
        assert mse(target, predicted)[i] == pytest.approx(mean_squared_error(target[i], predicted[i]))
        assert psnr(target, predicted)[i] == pytest.approx(peak_signal_noise_ratio(target[i], predicted[i], data_range=1.0))
        reference = structural_similarity(target[i], predicted[i], channel_axis=channel_axis, gaussian_weights=True,
                                          sigma=1.5, use_sample_covariance=False, data_range=1.0)
        assert ssim(torch.from_numpy(target), torch.from_numpy(predicted))[i] == pytest.approx(reference, abs=1e-10)
    assert ssim(target * 255, predicted * 255, data_range=255)[0] == pytest.approx(ssim(target, predicted)[0])
    assert ssim(target, target) == pytest.approx(1.0) and np.isinf(psnr(target, target)).all()


def test_ssim_of_flat_images_by_hand() -> None:
    """Flat images have no variance, so SSIM is its luminance term (2ab + C1) / (a² + b² + C1), C1 = (0.01 R)²."""
    a, b, c1 = 0.3, 0.6, 0.01**2
    assert ssim(np.full((1, 3, 16, 16), a), np.full((1, 3, 16, 16), b))[0] == pytest.approx((2 * a * b + c1) / (a**2 + b**2 + c1))


def test_ssim_refuses_images_smaller_than_its_window() -> None:
    with pytest.raises(ValueError, match="at least 11 px"):
        ssim(np.zeros((1, 8, 8)), np.zeros((1, 8, 8)))


def test_mean_std_over_runs() -> None:
    runs = [0.81, 0.83, 0.79, 0.84, 0.80]
    assert mean_std(runs) == pytest.approx((statistics.mean(runs), statistics.stdev(runs)))
    mean, std = mean_std([0.8])
    assert mean == 0.8 and np.isnan(std), "one run has no measured spread"
