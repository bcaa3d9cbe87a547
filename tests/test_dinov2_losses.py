"""The DINOv2-style terms against direct computations: iBOT's masked-patch cross-entropy, KoLeo, the KDE regulariser
and Sinkhorn-Knopp centering (one process and two, gloo), written out in numpy from the papers' definitions."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from bonylib.models.head import CropOutputs
from bonylib.ssl.data import Batch
from bonylib.ssl.losses.centering import EMACentering, SinkhornKnoppCentering
from bonylib.ssl.losses.ibot import IBOTLoss
from bonylib.ssl.losses.kde import kde_log_density
from bonylib.ssl.losses.koleo import koleo


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    return x - x.max(axis=1, keepdims=True) - np.log(np.exp(x - x.max(axis=1, keepdims=True)).sum(axis=1, keepdims=True))


def test_ibot_loss_is_the_mean_over_crops_of_each_crops_masked_patch_cross_entropy() -> None:
    """3 crops of 2 x 3 patches: crop 0 with 2 masked patches, crop 1 none, crop 2 with 1. The loss is
    (mean of crop 0's two cross-entropies + 0 + crop 2's one) / 3, the teacher centred by its EMA center (zero at
    first) and sharpened at 0.04, the student at 0.1; the center then moves to 0.1 x the masked patches' mean."""
    masks = torch.zeros(3, 2, 3, dtype=torch.bool)
    masks[0, 0, 1] = masks[0, 1, 2] = masks[2, 1, 0] = True
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(3, 8, generator=g), torch.randn(3, 8, generator=g)
    loss_fn = IBOTLoss(8, epochs=1, warmup_teacher_temp=0.04, teacher_temp=0.04, warmup_teacher_temp_epochs=0,
                       student_temp=0.1, center_momentum=0.9, centering="ema", sinkhorn_iterations=3, weight=1.0)
    outputs = lambda masked: CropOutputs(torch.zeros(3, 4), [torch.zeros(3, 6, 4)], torch.zeros(3, 8), masked)  # noqa: E731
    loss = loss_fn(outputs(student), outputs(teacher), Batch([torch.zeros(3, 3, 32, 32)], masks), epoch=0)
    ce = -(_softmax(teacher.numpy() / 0.04) * _log_softmax(student.numpy() / 0.1)).sum(axis=1)
    assert float(loss) == pytest.approx(((ce[0] + ce[1]) / 2 + ce[2]) / 3, rel=1e-5)
    assert isinstance(loss_fn.centering, EMACentering)
    np.testing.assert_allclose(loss_fn.centering.center.numpy()[0], 0.1 * teacher.numpy().mean(axis=0), rtol=1e-5)
    nothing = torch.zeros(3, 2, 3, dtype=torch.bool)
    empty = loss_fn(outputs(torch.zeros(0, 8, requires_grad=True)), outputs(torch.zeros(0, 8)),
                    Batch([torch.zeros(3, 3, 32, 32)], nothing), epoch=0)
    assert float(empty.detach()) == 0.0 and empty.requires_grad, "no patch masked anywhere: 0, still in the graph (DDP)"


def _koleo_direct(x: np.ndarray, eps: float = 1e-8) -> float:
    u = _unit(x.astype(np.float64))
    distances = np.linalg.norm(u[:, None] - u[None], axis=-1) + np.diag(np.full(len(u), np.inf))
    return float(-np.mean(np.log(distances.min(axis=1) + eps)))


def _kde_direct(x: np.ndarray, kappa: float) -> float:
    u = _unit(x.astype(np.float64))
    n = len(u)
    densities = [sum(np.exp(kappa * (u[i] @ u[j] - 1)) for j in range(n) if j != i) / (n - 1) for i in range(n)]
    return float(np.mean(np.log(densities)))


def test_koleo_and_kde_equal_their_definitions_and_stay_finite_on_tiny_and_duplicate_batches() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(9, 16, generator=g) * 3
    assert float(koleo(x)) == pytest.approx(_koleo_direct(x.numpy()), rel=1e-5)
    for kappa in (1.0, 5.0, 20.0):
        assert float(kde_log_density(x, kappa)) == pytest.approx(_kde_direct(x.numpy(), kappa), rel=1e-5, abs=1e-6)
    pair = torch.randn(2, 16, generator=g)
    assert float(kde_log_density(pair, 5.0)) == pytest.approx(_kde_direct(pair.numpy(), 5.0), rel=1e-5)
    one = torch.randn(1, 16, requires_grad=True)
    for term in (koleo(one), kde_log_density(one, 5.0)):
        assert float(term.detach()) == 0.0
        term.backward()
        assert torch.equal(one.grad, torch.zeros_like(one)), "one feature: no neighbour, no term, a zero gradient"
    twins = torch.randn(4, 16, generator=g)
    twins[1] = twins[0]
    twins.requires_grad_(True)
    koleo_value = koleo(twins)
    koleo_value.backward()
    assert torch.isfinite(koleo_value) and torch.isfinite(twins.grad).all()
    assert float(koleo_value.detach()) == pytest.approx(_koleo_direct(twins.detach().numpy()), rel=0.05), \
        "the twins' distance is floored at eps: -log(2 eps) instead of -log(eps)"
    twins.grad = None
    kde_value = kde_log_density(twins, 5.0)
    kde_value.backward()
    assert -10.0 <= float(kde_value.detach()) <= 0.0 and twins.grad.abs().max() <= 5.0, "bounded by 2 kappa, gradient by kappa"


def _sinkhorn_direct(logits: np.ndarray, temperature: float, iterations: int) -> np.ndarray:
    """DINOv2's algorithm as its paper writes it (Q is K x B; rows to 1/K, columns to 1/B, then columns scaled to 1),
    in float64."""
    q = np.exp(logits.astype(np.float64) / temperature).T
    q /= q.sum()
    k, b = q.shape
    for _ in range(iterations):
        q /= q.sum(axis=1, keepdims=True) * k
        q /= q.sum(axis=0, keepdims=True) * b
    return (q * b).T


def test_sinkhorn_knopp_targets_equal_the_algorithm_and_balance_the_prototypes() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(24, 6, generator=g) * 0.5
    logits[:, 0] += 1.0  # one prototype favoured by every sample: what centering must undo
    targets = SinkhornKnoppCentering(3).targets(logits, 0.1)
    np.testing.assert_allclose(targets.numpy(), _sinkhorn_direct(logits.numpy(), 0.1, 3), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(targets.sum(dim=1).numpy(), 1.0, rtol=1e-6)
    converged = SinkhornKnoppCentering(200).targets(logits, 0.1)
    np.testing.assert_allclose(converged.sum(dim=0).numpy(), 24 / 6, rtol=1e-4), "every prototype: B / K"
    softmax_share = torch.softmax(logits / 0.1, dim=1).sum(dim=0)[0] / 24
    assert softmax_share > 0.5 and targets.sum(dim=0)[0] / 24 < 0.3, "3 rounds already undo most of the favour"
    huge = SinkhornKnoppCentering(3).targets(logits * 1000, 0.04)
    assert torch.isfinite(huge).all(), "exp(t / T) would overflow float32 without the shift"


def _sinkhorn_worker(rank: int, port: int, logits: torch.Tensor, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    mine = logits[:10] if rank == 0 else logits[10:]  # unequal shares: 10 and 14 rows
    targets = SinkhornKnoppCentering(3).targets(mine, 0.1)
    columns = targets.sum(dim=0)
    torch.distributed.all_reduce(columns)
    torch.save({"targets": targets, "columns": columns}, Path(out) / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_sinkhorn_knopp_over_two_processes_equals_one_process_on_all_rows(tmp_path: Path) -> None:
    """Two gloo processes holding 10 and 14 of 24 samples: their targets, put together, are those of one process
    with all 24 (column sums and the row count all-reduced), and so are the prototypes' totals."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(24, 6, generator=g)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_sinkhorn_worker, args=(port, logits, str(tmp_path)), nprocs=2)
    parts = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    single = SinkhornKnoppCentering(3).targets(logits, 0.1)
    torch.testing.assert_close(torch.cat([p["targets"] for p in parts]), single, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(torch.cat([p["targets"] for p in parts]).sum(dim=1).numpy(), 1.0, rtol=1e-6)
    for part in parts:
        torch.testing.assert_close(part["columns"], single.sum(dim=0), rtol=1e-5, atol=1e-6)
