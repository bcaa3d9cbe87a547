"""Heads on cached embeddings: each learns what the features carry by construction and nothing from noise.

Linear probe and the seed's MLP on tile features, gated attention-MIL on bags of tiles, and the seed's
decoders (vector and patch-token inputs, regression and class outputs); the training loop's learning
curve, best checkpoint, early stop and seeding. Weighted k-NN is covered in test_knn.py. Small widths,
few steps and 28 px decoder outputs keep it fast; one check builds the seed's full 224 px decoder.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch
from torch import nn

from bonylib.evaluation.decoders import Decoder, decode, fit_decoder
from bonylib.evaluation.metrics import balanced_accuracy, dice_per_class, mean_iou, mse
from bonylib.evaluation.probes import (
    SEED_MLP_HIDDEN,
    GatedAttentionMIL,
    fit_abmil,
    fit_classifier,
    pad_bags,
    predict_logits,
    seed_mlp,
)


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """These tensors are tiny: on 2 shared cores a second thread only waits on the first (10x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


FAST = {"lr": 1e-2, "batch_size": 64, "max_steps": 300, "eval_every": 25, "patience": 4}


def clusters(n: int, seed: int, classes: int = 4, dim: int = 16, separable: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Features around one centre per class (or pure noise) and their labels."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    centres = np.random.default_rng(99).normal(size=(classes, dim)) * 3
    features = rng.normal(size=(n, dim)) + (centres[labels] if separable else 0)
    return torch.tensor(features, dtype=torch.float32), torch.tensor(labels)


@pytest.mark.parametrize("make_head", [lambda: nn.Linear(16, 4), lambda: seed_mlp(16, 4, hidden=(32, 16))],
                         ids=["linear", "seed_mlp"])
def test_probe_separates_classes_and_finds_nothing_in_noise(make_head) -> None:  # noqa: ANN001
    train, val, test = clusters(512, 0), clusters(128, 1), clusters(256, 2)
    fit = fit_classifier(make_head(), train, val, **FAST)
    assert balanced_accuracy(test[1], predict_logits(fit.head, test[0]).argmax(1)) > 0.97
    noise = [clusters(n, s, separable=False) for n, s in ((512, 3), (128, 4), (512, 5))]
    fit = fit_classifier(make_head(), noise[0], noise[1], **FAST)
    assert abs(balanced_accuracy(noise[2][1], predict_logits(fit.head, noise[2][0]).argmax(1)) - 0.25) < 0.1


def test_seed_mlp_is_the_seeds_shape() -> None:
    widths = [(layer.in_features, layer.out_features) for layer in seed_mlp(384, 5) if isinstance(layer, nn.Linear)]
    assert widths == list(zip((384, *SEED_MLP_HIDDEN), (*SEED_MLP_HIDDEN, 5)))
    assert sum(isinstance(layer, nn.ReLU) for layer in seed_mlp(384, 5)) == 4, "ReLU between, none on the logits"


def test_fit_keeps_the_best_checkpoint_and_its_curve() -> None:
    train, val = clusters(256, 6, separable=False), clusters(64, 7, separable=False)
    fit = fit_classifier(nn.Linear(16, 4), train, val, lr=3e-2, batch_size=32, max_steps=400, eval_every=10, patience=5)
    scores = [point["balanced_accuracy"] for point in fit.curve]
    assert [point["step"] for point in fit.curve] == list(range(10, 10 * len(scores) + 1, 10))
    assert fit.best_score == max(scores) and fit.curve[scores.index(max(scores))]["step"] == fit.best_step
    assert len(scores) - 1 - scores.index(max(scores)) == 5 and fit.curve[-1]["step"] < 400, "stopped by patience"
    assert balanced_accuracy(val[1], predict_logits(fit.head, val[0]).argmax(1)) == fit.best_score, "best, not last"
    assert all(point["train_loss"] > 0 for point in fit.curve)


def test_fit_is_seeded() -> None:
    train, val = clusters(256, 8), clusters(64, 9)
    options = {**FAST, "max_steps": 40}
    first, again = fit_classifier(nn.Linear(16, 4), train, val, **options), fit_classifier(nn.Linear(16, 4), train, val, **options)
    other = fit_classifier(nn.Linear(16, 4), train, val, **options, seed=1)
    assert first.curve == again.curve and torch.equal(first.head.weight, again.head.weight)
    assert not torch.equal(first.head.weight, other.head.weight)


def bags_with_a_planted_tile(count: int, seed: int, dim: int = 8) -> tuple[list[torch.Tensor], torch.Tensor, list[int]]:
    """Bags of 4-24 noise tiles; a positive bag hides one tile shifted along a fixed direction (the
    tumour focus deciding the slide's grade). Returns the bags, their labels and each planted index."""
    rng = np.random.default_rng(seed)
    direction = np.zeros(dim)
    direction[0] = 6.0
    bags, labels, planted = [], rng.integers(0, 2, count), []
    for label in labels:
        tiles = rng.normal(size=(rng.integers(4, 25), dim))
        where = int(rng.integers(len(tiles)))
        tiles[where] += direction * label
        bags.append(torch.tensor(tiles, dtype=torch.float32))
        planted.append(where)
    return bags, torch.tensor(labels), planted


def test_abmil_finds_the_planted_tile_and_attends_to_it() -> None:
    (train_bags, train_y, _), (val_bags, val_y, _) = bags_with_a_planted_tile(160, 10), bags_with_a_planted_tile(48, 11)
    test_bags, test_y, planted = bags_with_a_planted_tile(64, 12)
    fit = fit_abmil(GatedAttentionMIL(8, 2, projected_dim=16, attention_dim=16, classifier_hidden=(16,)),
                    (train_bags, train_y), (val_bags, val_y), metric="balanced_accuracy", lr=3e-3, max_epochs=30, patience=8)
    assert balanced_accuracy(test_y, predict_logits(fit.head, test_bags).argmax(1)) > 0.9
    padded, mask = pad_bags(test_bags)
    with torch.no_grad():
        weights = fit.head.eval().attend(padded, mask)[1]
    attention = [weights[i, : len(bag)] for i, bag in enumerate(test_bags)]
    assert all(len(a) == len(bag) and float(a.sum()) == pytest.approx(1, abs=1e-5) for a, bag in zip(attention, test_bags))
    positives = [i for i in range(len(test_bags)) if test_y[i] == 1]
    assert np.mean([int(attention[i].argmax()) == planted[i] for i in positives]) > 0.9


def test_abmil_learns_nothing_from_bags_without_a_signal() -> None:
    (train_bags, _, _), (val_bags, _, _) = bags_with_a_planted_tile(160, 13), bags_with_a_planted_tile(48, 14)
    test_bags, _, _ = bags_with_a_planted_tile(200, 15)
    shuffle = np.random.default_rng(0)  # labels drawn afresh: unrelated to any tile
    labels = [torch.tensor(shuffle.integers(0, 2, n)) for n in (160, 48, 200)]
    fit = fit_abmil(GatedAttentionMIL(8, 2, projected_dim=16, attention_dim=16, classifier_hidden=(16,)),
                    (train_bags, labels[0]), (val_bags, labels[1]), metric="balanced_accuracy", lr=3e-3, max_epochs=10, patience=3)
    assert abs(balanced_accuracy(labels[2], predict_logits(fit.head, test_bags).argmax(1)) - 0.5) < 0.12


def test_padding_does_not_change_a_bags_answer() -> None:
    bags, _, _ = bags_with_a_planted_tile(6, 16)
    model = GatedAttentionMIL(8, 3).eval()
    together = predict_logits(model, bags)
    alone = torch.cat([predict_logits(model, [bag]) for bag in bags])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-6)
    padded, mask = pad_bags(bags)
    assert mask.sum(1).tolist() == [len(bag) for bag in bags] and padded.shape[1] == max(len(bag) for bag in bags)


def test_the_seeds_decoder_shapes_at_224_px() -> None:
    decoder = Decoder(32)
    assert decoder(torch.zeros(2, 32)).shape == (2, 1, 224, 224)
    assert sum(isinstance(m, nn.ConvTranspose2d) for m in decoder.modules()) == 5
    assert sum(isinstance(m, nn.BatchNorm2d) for m in decoder.modules()) == 4, "no BatchNorm on the output stage"
    assert decoder.stem[0].out_features == 256 * 7 * 7
    tokens = Decoder(32, out_channels=3, grid=14, task="classes")
    assert tokens(torch.zeros(2, 196, 32)).shape == (2, 3, 224, 224)
    assert sum(isinstance(m, nn.ConvTranspose2d) for m in tokens.modules()) == 4, "14 → 224 is four doublings"
    assert Decoder(8, out_size=56).upsample[-1].out_channels == 1
    with pytest.raises(ValueError, match="not 7 px doubled"):
        Decoder(8, out_size=100)


def quadrant_data(n: int, seed: int, size: int = 28, informative: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(embeddings (n, 8), images (n, 1, size, size) with one bright quadrant, class maps (n, size, size)
    with the quadrant's number + 1 inside it and 0 elsewhere). The embedding one-hot encodes the
    quadrant (plus noise), or is pure noise when not ``informative``."""
    rng = np.random.default_rng(seed)
    quadrant = rng.integers(0, 4, n)
    half = size // 2
    maps = np.zeros((n, size, size), dtype=np.int64)
    for i, q in enumerate(quadrant):
        maps[i, (q // 2) * half : (q // 2 + 1) * half, (q % 2) * half : (q % 2 + 1) * half] = q + 1
    embeddings = rng.normal(scale=0.1, size=(n, 8))
    if informative:
        embeddings[np.arange(n), quadrant] += 1.0
    return (torch.tensor(embeddings, dtype=torch.float32), torch.tensor(maps > 0, dtype=torch.float32)[:, None],
            torch.tensor(maps))


DECODER = {"out_size": 28, "width": 32}
DECODER_FIT = {"lr": 3e-3, "batch_size": 16, "max_epochs": 40, "patience": 5}


def test_decoder_regresses_the_bright_quadrant_and_not_from_noise() -> None:
    (x, images, _), (vx, vimages, _), (tx, timages, _) = (quadrant_data(n, s) for n, s in ((128, 20), (32, 21), (64, 22)))
    fit = fit_decoder(Decoder(8, **DECODER), (x, images), (vx, vimages), **DECODER_FIT)
    assert mse(timages, decode(fit.head, tx)).mean() < 0.02
    assert fit.metric == "val_loss" and fit.best_score == min(p["val_loss"] for p in fit.curve)
    (nx, nimages, _), (nvx, nvimages, _) = quadrant_data(128, 23, informative=False), quadrant_data(32, 24, informative=False)
    noise_fit = fit_decoder(Decoder(8, **DECODER), (nx, nimages), (nvx, nvimages), **{**DECODER_FIT, "max_epochs": 8})
    assert mse(timages, decode(noise_fit.head, tx)).mean() > 0.15, "a quarter bright: predicting the mean scores 0.1875"


def test_class_decoder_segments_the_quadrant() -> None:
    (x, _, maps), (vx, _, vmaps), (tx, _, tmaps) = (quadrant_data(n, s) for n, s in ((128, 25), (32, 26), (64, 27)))
    fit = fit_decoder(Decoder(8, out_channels=5, task="classes", **DECODER), (x, maps), (vx, vmaps), **DECODER_FIT)
    predicted = decode(fit.head, tx)
    assert predicted.shape == tmaps.shape and mean_iou(tmaps, predicted, 5) > 0.9
    assert np.nanmin(dice_per_class(tmaps, predicted, 5)) > 0.9


def test_token_decoder_reads_where_the_patch_tokens_say() -> None:
    """Tokens on a 7 x 7 grid; a token inside the bright quadrant carries a bright feature."""
    def tokens(images: torch.Tensor, seed: int) -> torch.Tensor:
        bright = nn.functional.avg_pool2d(images, 4).flatten(1)  # (n, 49), 1 inside the quadrant
        noise = torch.randn(len(images), 49, 4, generator=torch.Generator().manual_seed(seed)) * 0.1
        return torch.cat([bright[..., None], noise], dim=2)

    (_, images, _), (_, vimages, _), (_, timages, _) = (quadrant_data(n, s) for n, s in ((128, 28), (32, 29), (64, 30)))
    fit = fit_decoder(Decoder(5, grid=7, **DECODER), (tokens(images, 0), images), (tokens(vimages, 1), vimages), **DECODER_FIT)
    assert mse(timages, decode(fit.head, tokens(timages, 2))).mean() < 0.02
