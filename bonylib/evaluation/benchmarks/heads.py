"""The heads the benchmarks share, with their settings: tile/patch classifiers (the seed's MLP, eva's linear
probe, weighted k-NN) and the seed's decoders, each fitted on train, early-stopped on val, scored on test.

PANDA tiles and SICAPv2 patches fit the same classifiers; DeepGleason masks and SICAPv2 reconstructions
the same decoders. Their settings are config sections of each benchmark, so a benchmark's protocol is
read in one place of its YAML.

Trained heads read embeddings z-scored per channel with the training rows' statistics
(:meth:`~bonylib.evaluation.features.Features.standardized`); k-NN reads them as they are (DINO's protocol: cosine
similarity of the raw features). eva feeds probes raw embeddings, and for a learned encoder z-scoring changes little
(an affine map the head could learn); but the handcrafted baseline mixes GLCM contrasts in the hundreds with LBP
frequencies below 0.1, and on the demo its MLP then predicted one class for every tile (accuracy 0 in 3 of 3 runs)
while the same features z-scored trained normally. Statistics come from the training rows only, so no test
information leaks in.

Embeddings arrive as :class:`~bonylib.evaluation.features.Features`, a view of the store read on demand: heads train
on mini-batches gathered from it, predict in batches and k-NN compares blocks, so memory is bounded by the batch and
the block, not by the row count (the seed's 2.85 M x 4096 head output is 46.7 GB in float32).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from bonylib.config import option
from bonylib.errors import ConfigError
from bonylib.evaluation.benchmarks.common import curve_of
from bonylib.evaluation.decoders import Decoder, decode, fit_decoder
from bonylib.evaluation.features import Features
from bonylib.evaluation.knn import check_vote, weighted_knn
from bonylib.evaluation.probes import OPTIMIZERS, SEED_MLP_HIDDEN, fit_classifier, predict_logits, seed_mlp

HEADS_VERSION = 2
"""Bumped when the code of a head changes the numbers it gives with the same settings (2: the seed's decoder with
kernel 3 and output_padding 1, was kernel 4): a finished run of another version is fitted again."""
CLASSIFIERS = ("mlp", "linear", "knn")
_TRAINING = ("lr", "batch_size", "max_steps", "epochs", "eval_every", "patience", "optimizer")
UNUSED_PROBE_KEYS = {"mlp": ("knn_k", "knn_temperature"), "linear": ("mlp_hidden", "knn_k", "knn_temperature"),
                     "knn": (*_TRAINING, "mlp_hidden")}
"""The :class:`ProbeConfig` keys each classifier does not read: changing them keeps its finished runs."""


@dataclass
class ProbeConfig:
    """How classification heads are fitted (defaults: kaiko eva's linear-probe protocol, DINO's k-NN)."""

    lr: float = option(3e-4, "learning rate (eva: 3e-4 with AdamW)")
    optimizer: str = option("adamw", "adamw (eva's) or sgd (momentum 0.9, no weight decay: DINO's eval_linear.py)")
    batch_size: int = option(256, "embeddings per step (eva: 256)")
    max_steps: int = option(12_500, "most steps, cosine decay to zero over them (eva: 12,500)")
    epochs: int = option(0, "when above 0, train for this many passes over the training rows instead of max_steps "
                         "(the seed's fixed number of epochs)")
    eval_every: int = option(250, "steps between validations (balanced accuracy on val)")
    patience: int = option(10, "validations without a better score before stopping, the best checkpoint kept; 0: "
                           "no early stopping, the last step kept (the seed's)")
    mlp_hidden: list[int] = option(list(SEED_MLP_HIDDEN), "hidden widths of the seed's MLP (input -> 8192 -> 2048 -> "
                                   "512 -> 128 -> classes); narrower only for CPU demos")
    knn_k: int = option(20, "weighted k-NN neighbours (DINO: 20)")
    knn_temperature: float = option(0.07, "weighted k-NN vote temperature (DINO: 0.07)")

    def __post_init__(self) -> None:
        if min(self.batch_size, self.max_steps, self.eval_every) < 1 or min(self.epochs, self.patience) < 0 \
                or not self.lr > 0:
            raise ConfigError("probe lr, batch_size, max_steps and eval_every must be positive, epochs and patience "
                              "at least 0")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"probe.optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if any(width < 1 for width in self.mlp_hidden):
            raise ConfigError(f"probe mlp_hidden widths must be at least 1, got {self.mlp_hidden}")
        check_vote("probe.knn_k", self.knn_k, "probe.knn_temperature", self.knn_temperature)


@dataclass
class DecoderConfig:
    """How the seed's decoders are fitted (the seed records only the architecture: the schedule is ours)."""

    out_size: int = option(224, "side of the decoded image: 7 px doubled (56, 112, 224: the seed's); the patch-token "
                           "decoder ends at the token grid doubled to the nearest side")
    width: int = option(256, "channels of the first feature map, halved by each stage (the seed's: 256)")
    lr: float = option(1e-3, "AdamW learning rate")
    batch_size: int = option(64, "embeddings per step")
    max_epochs: int = option(50, "most epochs, cosine decay over them")
    patience: int = option(5, "epochs without a lower validation loss before stopping, the best epoch kept; 0: no "
                           "early stopping, the last epoch kept (a fixed length, as the seed)")
    examples: int = option(8, "test tiles whose decoded images are saved for the notebooks")

    def __post_init__(self) -> None:
        if min(self.out_size, self.width, self.batch_size, self.max_epochs) < 1 or self.patience < 0 or self.lr <= 0:
            raise ConfigError("decoder out_size, width, lr, batch_size and max_epochs must be positive, patience at "
                              "least 0")
        if self.examples < 0:
            raise ConfigError("decoder examples must be at least 0")


def classify(kind: str, features: Features, targets: torch.Tensor, parts: np.ndarray, classes: int,
             cfg: ProbeConfig, seed: int, device: torch.device,
             scored: Sequence[str] = ("test",)) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Predicted class of every row of each ``scored`` part (``parts == part``) by head ``kind``, and what the JSON
    keeps of the fit.

    ``mlp`` and ``linear`` train on the train rows for ``cfg.epochs`` passes (or ``cfg.max_steps`` steps), keeping
    the step of best validation balanced accuracy, or the last with ``patience`` 0; ``knn`` votes with the train
    rows' embeddings (no training). Trained heads read standardized embeddings.
    """
    train, val = (torch.from_numpy(parts == part) for part in ("train", "val"))
    rows = {part: torch.from_numpy(parts == part) for part in scored}
    if kind == "knn":
        bank, bank_labels = features.subset(train), targets[train].to(device)
        return {part: weighted_knn(bank, bank_labels, features.subset(index), classes, cfg.knn_k,
                                   cfg.knn_temperature).cpu().numpy() for part, index in rows.items()}, {}
    head: nn.Module = (seed_mlp(features.shape[1], classes, cfg.mlp_hidden) if kind == "mlp"
                       else nn.Linear(features.shape[1], classes)).to(device)
    features = features.standardized(train)
    steps = cfg.epochs * math.ceil(int(train.sum()) / cfg.batch_size) if cfg.epochs else cfg.max_steps
    fit = fit_classifier(head, (features.subset(train), targets[train]), (features.subset(val), targets[val]),
                         metric="balanced_accuracy", lr=cfg.lr, batch_size=cfg.batch_size, max_steps=steps,
                         eval_every=min(cfg.eval_every, steps), patience=cfg.patience, seed=seed,
                         optimizer=cfg.optimizer)
    predicted = {part: predict_logits(fit.head, features.subset(index)).argmax(1).numpy()
                 for part, index in rows.items()}
    return predicted, {"best_step": fit.best_step, "best_val": fit.best_score, "curve": curve_of(fit)}


def fit_and_decode(features: Features, targets: torch.Tensor, parts: np.ndarray, out_channels: int, task: str,
                   cfg: DecoderConfig, seed: int, device: torch.device, out_size: int, grid: int | None = None,
                   scored: Sequence[str] = ("test",)) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The seed's decoder trained from the train rows' embeddings to their ``targets`` (images (N, C, H, W) in
    [0, 1] for ``regression``, label maps (N, H, W) for ``classes``), best epoch by validation loss (or the last,
    with ``patience`` 0); returns its output for the rows of each ``scored`` part and what the JSON keeps of the
    fit. ``grid`` set: it reads patch tokens. The embeddings are standardized first."""
    train, val = (torch.from_numpy(parts == part) for part in ("train", "val"))
    features = features.standardized(train)
    decoder = Decoder(features.shape[-1], out_channels, out_size, task=task, grid=grid, width=cfg.width).to(device)
    fit = fit_decoder(decoder, (features.subset(train), targets[train]), (features.subset(val), targets[val]), lr=cfg.lr,
                      batch_size=cfg.batch_size, max_epochs=cfg.max_epochs, patience=cfg.patience, seed=seed)
    decoded = {part: decode(fit.head, features.subset(parts == part), cfg.batch_size) for part in scored}
    return decoded, {"best_step": fit.best_step, "best_val": fit.best_score, "curve": curve_of(fit),
                     "out_size": out_size}
