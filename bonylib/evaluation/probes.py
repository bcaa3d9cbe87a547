"""Classification heads on cached embeddings, and the one training loop every head uses.

Heads: a linear probe (``nn.Linear``, kaiko eva's protocol), the seed's MLP, and gated attention-MIL
for slide labels from a bag of tile embeddings (weighted k-NN needs no training: it is
:func:`bonylib.evaluation.knn.weighted_knn`). They all train through :func:`fit_head` (AdamW with a
cosine schedule, validation every few steps, early stopping, the best checkpoint kept), so the
probes and the decoders (:mod:`bonylib.evaluation.decoders`) differ only in their loss and their
validation score, never in how a run is stopped or which weights are returned.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from bonylib.evaluation.features import Features
from bonylib.evaluation.metrics import accuracy, balanced_accuracy, quadratic_weighted_kappa

Inputs = torch.Tensor | Features | Sequence[torch.Tensor]
"""What a classification head reads: tile embeddings (N, D) (a tensor, or :class:`Features` read batch by batch), or
N bags of tile embeddings (n_i, D) (a list, or :class:`~bonylib.evaluation.features.Bags` read bag by bag)."""

SEED_MLP_HIDDEN = (8192, 2048, 512, 128)
"""Hidden widths of the seed's PANDA tile classifier as Bony reads them: the report prints
``hidden dims=[7192, 2048, 512, 128]``, most likely a slip for 8192 (every other width is a power of two);
``configs/evaluate/seed.yaml`` sets the printed 7192."""
OPTIMIZERS = ("adamw", "sgd")
"""How heads step: AdamW (kaiko eva's probes) or SGD with momentum 0.9 (facebookresearch/dino's linear evaluation)."""

VALIDATION_METRICS: dict[str, Callable[[torch.Tensor, torch.Tensor, int], float]] = {
    "balanced_accuracy": lambda truth, predicted, classes: balanced_accuracy(truth, predicted),
    "accuracy": lambda truth, predicted, classes: accuracy(truth, predicted),
    "quadratic_weighted_kappa": quadratic_weighted_kappa,
}
"""Scores a classifier can be early-stopped on, as f(y_true, y_pred, number of classes): eva stops tile
probes on balanced accuracy; slide grading is judged, as in PANDA, by quadratic weighted kappa."""


# ---- heads -------------------------------------------------------------------------------------


def mlp(in_dim: int, hidden: Sequence[int], out_dim: int) -> nn.Sequential:
    """Linear layers of widths ``in_dim → *hidden → out_dim`` with a ReLU between consecutive ones."""
    widths = [in_dim, *hidden, out_dim]
    layers: list[nn.Module] = []
    for i, (width_in, width_out) in enumerate(zip(widths, widths[1:])):
        layers += [nn.Linear(width_in, width_out)] + ([nn.ReLU()] if i < len(widths) - 2 else [])
    return nn.Sequential(*layers)


def seed_mlp(in_dim: int, num_classes: int, hidden: Sequence[int] = SEED_MLP_HIDDEN) -> nn.Sequential:
    """The seed's tile classifier, mirrored: input → 8192 → 2048 → 512 → 128 → classes, ReLU between.

    Kept as the seed built it so its §8 PANDA accuracies can be compared with ours; ``hidden`` is
    there for tests and CPU demos only, since 8192 units on a 4096-d input are 50 M weights.
    """
    return mlp(in_dim, hidden, num_classes)


class GatedAttentionMIL(nn.Module):
    """Gated attention-based multiple-instance learning (Ilse et al., 2018), laid out as kaiko eva's ABMIL.

    A slide is a bag of tile embeddings with one label (its ISUP grade) and no tile labels. Each tile
    is projected (to 128 by default: attention scores of very wide embeddings are nearly all alike),
    scored by ``w · (tanh(V h) ⊙ sigmoid(U h))``, the scores are softmaxed over the bag's real tiles
    (padding masked out), and the attention-weighted mean of the projections is classified by a small
    MLP. The attention says which tiles decided the grade, which is why it is returned too.
    """

    def __init__(self, in_dim: int, num_classes: int, projected_dim: int = 128, attention_dim: int = 128,
                 classifier_hidden: Sequence[int] = (128, 64)) -> None:
        super().__init__()
        self.project = nn.Linear(in_dim, projected_dim)
        self.attention_tanh = nn.Linear(projected_dim, attention_dim)
        self.attention_gate = nn.Linear(projected_dim, attention_dim)
        self.attention_score = nn.Linear(attention_dim, 1)
        self.classify = mlp(projected_dim, classifier_hidden, num_classes)

    def attend(self, bags: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(pooled bag embeddings (B, projected_dim), attention (B, n), zero on padding) of padded bags
        (B, n, D) whose real tiles are ``mask`` (B, n)."""
        tiles = self.project(bags)
        scores = self.attention_score(torch.tanh(self.attention_tanh(tiles)) * torch.sigmoid(self.attention_gate(tiles)))
        attention = scores.squeeze(-1).masked_fill(~mask, float("-inf")).softmax(dim=1)
        return torch.einsum("bn,bnd->bd", attention, tiles), attention

    def forward(self, bags: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Class logits (B, classes) of padded bags (B, n, D) with real tiles ``mask`` (B, n)."""
        return self.classify(self.attend(bags, mask)[0])


def pad_bags(bags: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(padded (B, n_max, D), mask (B, n_max), True on real tiles) of bags of different sizes (n_i, D)."""
    if any(len(bag) == 0 for bag in bags):
        raise ValueError("a bag has no tiles: a slide without embeddings cannot be graded")
    padded = nn.utils.rnn.pad_sequence(list(bags), batch_first=True)
    sizes = torch.tensor([len(bag) for bag in bags])
    return padded, torch.arange(padded.shape[1])[None, :] < sizes[:, None]


def _rows(inputs: Inputs, index: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The head's arguments for rows ``index``: tile embeddings as they are, bags padded with their mask; only these
    rows are read (the whole input is never gathered)."""
    if isinstance(inputs, (torch.Tensor, Features)):
        return (inputs[index],)
    return pad_bags([inputs[i] for i in index.tolist()])


@torch.no_grad()
def predict_logits(head: nn.Module, inputs: Inputs, batch_size: int = 1024) -> torch.Tensor:
    """Class logits (N, classes), on the CPU, of tile embeddings (N, D) or of N bags, in eval mode."""
    device = next(head.parameters()).device
    was_training = head.training
    head.eval()
    logits = [head(*(x.to(device) for x in _rows(inputs, torch.arange(start, min(start + batch_size, len(inputs))))))
              .float().cpu() for start in range(0, len(inputs), batch_size)]
    head.train(was_training)
    return torch.cat(logits)


# ---- the training loop -------------------------------------------------------------------------


@dataclass
class FitResult:
    """A trained head and how it got there."""

    head: nn.Module
    """The head with the weights of its best validation score, in eval mode."""
    metric: str
    """Name of the validation score in ``curve`` (a loss for decoders: lower is better)."""
    best_step: int
    best_score: float
    curve: list[dict[str, float]] = field(default_factory=list)
    """One entry per validation: ``step``, ``train_loss`` (mean over the steps since the last one), ``metric``."""


def fit_head(head: nn.Module, loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
             batch: Callable[[torch.Tensor], tuple[tuple[torch.Tensor, ...], torch.Tensor]], train_size: int,
             validate: Callable[[nn.Module], float], metric: str, maximize: bool, *, lr: float, batch_size: int,
             max_steps: int, eval_every: int, patience: int, seed: int, optimizer: str = "adamw") -> FitResult:
    """Train ``head`` from a fresh initialisation and return it at its best validation score, or at its last step.

    ``batch(row indices)`` gives the head's arguments and the target of those training rows;
    ``validate(head)`` scores the head (called in eval mode, without gradients). ``optimizer`` at ``lr``
    with a cosine decay to zero over ``max_steps`` (eva's schedule): ``adamw`` (eva's) or ``sgd``
    (facebookresearch/dino's ``eval_linear.py``: momentum 0.9, no weight decay). Shuffled batches are
    drawn epoch after epoch, validation every ``eval_every`` steps and after the last; training stops
    after ``patience`` validations without a strictly better score and returns the best. ``patience=0``
    is the seed's protocol: a fixed length, no early stopping, and the *last* weights are returned (the
    validation score is then an honest estimate, not the maximum of many looks). The head's weights are
    re-initialised from ``seed`` (as is the batch order), so a run is reproducible on one machine and
    runs differ only by their seed, which is what "mean ± std over 5 runs" needs.
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {optimizer!r}")
    if train_size == 0:
        raise ValueError("no training rows")
    device = next(head.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for module in head.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
    order_rng = torch.Generator().manual_seed(seed)
    step_rule = (torch.optim.AdamW(head.parameters(), lr=lr) if optimizer == "adamw"
                 else torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=0.0))
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(step_rule, T_max=max_steps)
    better = (lambda new, old: new > old) if maximize else (lambda new, old: new < old)
    best_score, best_step, best_state = (-math.inf if maximize else math.inf), 0, None
    curve: list[dict[str, float]] = []
    order, position, since_best = torch.zeros(0, dtype=torch.long), 0, 0
    running, steps_run = torch.zeros((), device=device), 0
    head.train()
    for step in range(1, max_steps + 1):
        if position >= len(order):
            order, position = torch.randperm(train_size, generator=order_rng), 0
        inputs, target = batch(order[position : position + batch_size])
        position += batch_size
        step_loss = loss(head(*(x.to(device) for x in inputs)), target.to(device))
        step_rule.zero_grad(set_to_none=True)
        step_loss.backward()
        step_rule.step()
        schedule.step()
        running, steps_run = running + step_loss.detach(), steps_run + 1
        if step % eval_every and step != max_steps:
            continue
        head.eval()
        with torch.no_grad():
            score = float(validate(head))
        head.train()
        curve.append({"step": step, "train_loss": float(running) / steps_run, metric: score})
        running, steps_run = torch.zeros((), device=device), 0
        if not patience:
            best_score, best_step = score, step
        elif better(score, best_score):
            best_score, best_step, since_best = score, step, 0
            best_state = {name: value.detach().clone() for name, value in head.state_dict().items()}
        else:
            since_best += 1
            if since_best >= patience:
                break
    if not math.isfinite(best_score):
        raise ValueError(f"validation {metric} was never a number: is the validation set empty?")
    if best_state is not None:
        head.load_state_dict(best_state)
    head.eval()
    return FitResult(head, metric, best_step, best_score, curve)


# ---- classifiers -------------------------------------------------------------------------------


def fit_classifier(head: nn.Module, train: tuple[Inputs, torch.Tensor], val: tuple[Inputs, torch.Tensor], *,
                   metric: str = "balanced_accuracy", lr: float = 3e-4, batch_size: int = 256, max_steps: int = 12_500,
                   eval_every: int = 250, patience: int = 10, seed: int = 0, optimizer: str = "adamw") -> FitResult:
    """Train a classification head with cross-entropy on ``(inputs, labels)``; early-stop on ``metric`` of ``val``.

    The defaults are kaiko eva's linear-probe protocol (AdamW, lr 3e-4, batch 256, at most 12,500
    steps, best checkpoint by validation balanced accuracy); ``eval_every`` and ``patience`` (in
    validations) are ours. The same loop trains the seed's MLP (:func:`seed_mlp`) and, with bags as
    inputs, :class:`GatedAttentionMIL` (see :func:`fit_abmil`).
    """
    if metric not in VALIDATION_METRICS:
        raise ValueError(f"metric must be one of {sorted(VALIDATION_METRICS)}, got {metric!r}")
    (train_inputs, train_labels), (val_inputs, val_labels) = train, val
    if len(train_inputs) != len(train_labels) or len(val_inputs) != len(val_labels):
        raise ValueError("inputs and labels differ in length")
    if not len(val_labels):
        raise ValueError("the validation set is empty")
    score = VALIDATION_METRICS[metric]

    # tiles are validated 256 at a time at least (fewer passes), bags as many as a training batch: 256 padded bags of
    # PANDA slides (up to 269 tiles x 4096 on average) would be 1.1 GB, twice over (the bags and their padding)
    rows_at_once = max(batch_size, 256) if isinstance(val_inputs, (torch.Tensor, Features)) else batch_size

    def validate(model: nn.Module) -> float:
        logits = predict_logits(model, val_inputs, batch_size=rows_at_once)
        return score(val_labels, logits.argmax(1), logits.shape[1])

    return fit_head(head, F.cross_entropy, lambda index: (_rows(train_inputs, index), train_labels[index]),
                    len(train_labels), validate, metric, maximize=True, lr=lr, batch_size=batch_size,
                    max_steps=max_steps, eval_every=eval_every, patience=patience, seed=seed, optimizer=optimizer)


def fit_abmil(model: GatedAttentionMIL, train: tuple[Sequence[torch.Tensor], torch.Tensor],
              val: tuple[Sequence[torch.Tensor], torch.Tensor], *, metric: str = "quadratic_weighted_kappa",
              lr: float = 1e-3, batch_size: int = 32, max_epochs: int = 100, patience: int = 10, seed: int = 0) -> FitResult:
    """Train gated attention-MIL on bags of tile embeddings with kaiko eva's ABMIL protocol.

    AdamW lr 1e-3, 32 bags a batch, at most ``max_epochs`` epochs, validated once an epoch and stopped
    after ``patience`` epochs without a better ``metric`` (PANDA's quadratic weighted kappa by
    default). Predict with :func:`predict_logits` and read the attention with :func:`bag_attention`.
    """
    steps_per_epoch = math.ceil(len(train[1]) / batch_size)
    return fit_classifier(model, train, val, metric=metric, lr=lr, batch_size=batch_size,
                          max_steps=max_epochs * steps_per_epoch, eval_every=steps_per_epoch, patience=patience, seed=seed)
