"""Evaluation that streams: the store read on demand, statistics by blocks, blocked k-NN, bounded memory.

Each result is checked against the same quantity computed on the whole array in memory by numpy (an independent
restatement, not the code under test); memory is checked as the peak resident set of a child process that reads a
store several times larger than what it may hold.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from bonylib.errors import BonyError
from bonylib.evaluation.benchmarks.heads import ProbeConfig, classify
from bonylib.evaluation import embeddings
from bonylib.evaluation.embeddings import VERIFIED, load_embeddings, open_embeddings, write_store
from bonylib.evaluation.features import Bags, Features, moments
from bonylib.evaluation.knn import weighted_knn
from bonylib.evaluation.probes import fit_classifier, predict_logits, seed_mlp

CPU = torch.device("cpu")


def synthetic_manifest(path: Path, rows: int, slides: int = 10) -> Path:
    """A tile manifest of ``rows`` tiles over ``slides`` slides (the columns row ids are made of)."""
    slide = np.arange(rows) % slides
    pd.DataFrame({"slide_id": [f"s{i:03d}" for i in slide], "level": 0, "x": (np.arange(rows) // slides) * 224,
                  "y": 0, "size": 224, "label_name": "benign"}).to_parquet(path)
    return path


def stored(tmp_path: Path, values: np.ndarray, chunk_rows: int = 100) -> Path:
    """``values`` written as a store of a manifest of as many rows, in blocks that straddle chunks."""
    manifest = synthetic_manifest(tmp_path / "manifest.parquet", len(values))
    blocks = (values[start : start + 37] for start in range(0, len(values), 37))
    return write_store(tmp_path / "out", manifest, "synthetic", "f" * 64, blocks,
                       output="patch" if values.ndim == 3 else "cls", chunk_rows=chunk_rows)


@pytest.fixture
def values() -> np.ndarray:
    """Rows with channels of very different scales: one with a large mean and a small spread, one constant."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1050, 12)).astype(np.float32)
    x[:, 1] = 1000.0 + 1e-3 * x[:, 1]
    x[:, 2] = 3.5
    x[:, 3] *= 200.0
    return x


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_rows_read_in_any_order_equal_the_array(tmp_path: Path, values: np.ndarray, dtype: str) -> None:
    values = values.astype(dtype) if dtype == "float32" else np.random.default_rng(1).normal(size=(1050, 12)).astype(dtype)
    store = stored(tmp_path, values)
    assert json.loads((store / "meta.json").read_text())["dtype"] == dtype
    rows = open_embeddings(store)
    picks = np.random.default_rng(2).integers(0, 1050, 300)  # repeats, every chunk, any order
    np.testing.assert_array_equal(rows.read(picks), values[picks])
    np.testing.assert_array_equal(rows.read(np.arange(95, 1050)), values[95:])
    np.testing.assert_array_equal(load_embeddings(store)[1], values)
    assert rows.read([]).shape == (0, 12)
    with pytest.raises(IndexError):
        rows.read([1050])
    features = Features(rows)
    assert features[picks].dtype == torch.float32
    np.testing.assert_array_equal(features.subset(picks[::-1])[5:20].numpy(), values[picks[::-1][5:20]].astype(np.float32))


def test_streamed_moments_and_standardization_equal_the_whole_array(tmp_path: Path, values: np.ndarray) -> None:
    features = Features(open_embeddings(stored(tmp_path, values)))
    train = np.random.default_rng(3).random(len(values)) < 0.7
    mean, std = moments(features.subset(train), block_rows=64)
    whole = values[train].astype(np.float64)
    np.testing.assert_allclose(mean, whole.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(std, whole.std(0, ddof=1), rtol=1e-9, atol=1e-12)
    assert std[2] == 0.0, "a constant channel has no spread, exactly"
    # the in-memory computation evaluate used before: torch, float32, on the whole tensor
    reference = torch.from_numpy(values[train])
    spread = reference.std(0)
    expected = (torch.from_numpy(values) - reference.mean(0)) / torch.where(spread > 0, spread, torch.ones_like(spread))
    np.testing.assert_allclose(features.standardized(train)[:].numpy(), expected.numpy(), rtol=1e-4, atol=2e-4)


def test_patch_token_moments_are_over_every_token(tmp_path: Path) -> None:
    tokens = np.random.default_rng(4).normal(2.0, 3.0, size=(230, 4, 5)).astype(np.float16)
    features = Features(open_embeddings(stored(tmp_path, tokens, chunk_rows=50)))
    mean, std = moments(features, block_rows=17)
    flat = tokens.astype(np.float64).reshape(-1, 5)
    np.testing.assert_allclose(mean, flat.mean(0), rtol=1e-12)
    np.testing.assert_allclose(std, flat.std(0, ddof=1), rtol=1e-10)


def brute_force_knn(train: np.ndarray, labels: np.ndarray, test: np.ndarray, classes: int, k: int, t: float) -> np.ndarray:
    """Weighted k-NN on the whole arrays at once: every similarity, the k largest, votes exp(s / T)."""
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    test = test / np.linalg.norm(test, axis=1, keepdims=True)
    similarity = test.astype(np.float64) @ train.astype(np.float64).T
    nearest = np.argsort(-similarity, axis=1)[:, :k]
    votes = np.zeros((len(test), classes))
    for row, columns in enumerate(nearest):
        np.add.at(votes[row], labels[columns], np.exp(similarity[row, columns] / t))
    return votes.argmax(1)


def test_blocked_knn_equals_brute_force(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 4, 900)
    values = (rng.normal(size=(4, 24))[labels] + 1.5 * rng.normal(size=(900, 24))).astype(np.float32)
    features = Features(open_embeddings(stored(tmp_path, values)))
    train, test = np.arange(900) < 700, np.arange(900) >= 700
    expected = brute_force_knn(values[train], labels[train], values[test], 4, 20, 0.07)
    # blocks smaller than k, not dividing the rows, and one block holding everything
    for chunk, train_chunk in [(13, 7), (64, 150), (1000, 1000)]:
        got = weighted_knn(features.subset(train), torch.from_numpy(labels[train]), features.subset(test), 4, k=20,
                           temperature=0.07, chunk=chunk, train_chunk=train_chunk)
        np.testing.assert_array_equal(got.numpy(), expected)
    assert 0.5 < (expected == labels[test]).mean() < 1.0, "a task where the neighbours matter"


def test_bags_are_read_when_asked_and_equal_the_array(tmp_path: Path, values: np.ndarray) -> None:
    features = Features(open_embeddings(stored(tmp_path, values)))
    bag_rows = [np.array([5, 1, 900]), np.arange(200, 260), np.array([1049])]
    bags = Bags(features, bag_rows).subset([2, 0])
    assert len(bags) == 2
    np.testing.assert_array_equal(bags[1].numpy(), values[[5, 1, 900]])
    np.testing.assert_array_equal(bags[0].numpy(), values[[1049]])


def test_verified_once_then_trusted_until_a_file_changes(tmp_path: Path, values: np.ndarray,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    store = stored(tmp_path, values)
    open_embeddings(store)  # the first open checks every chunk and records it
    record = json.loads((store / VERIFIED).read_text())
    assert sorted(record) == [f"{c:06d}.npy" for c in range(11)]
    hashed: list[str] = []
    real = embeddings.sha256_file
    monkeypatch.setattr(embeddings, "sha256_file", lambda path: hashed.append(Path(path).name) or real(path))
    open_embeddings(store)
    assert hashed == ["manifest.parquet"], "a recorded store is not hashed again"
    chunk = store / "chunks" / "000004.npy"
    edited = np.load(chunk)
    edited[3, 0] = 7.0
    np.save(chunk, edited)
    hashed.clear()
    with pytest.raises(BonyError, match="000004.npy: its bytes do not match"):
        open_embeddings(store)
    assert hashed == ["manifest.parquet", "000004.npy"], "only the changed chunk is checked again"


def test_float16_and_float32_stores_of_one_encoder_never_share_a_folder(tmp_path: Path, values: np.ndarray) -> None:
    manifest = synthetic_manifest(tmp_path / "manifest.parquet", len(values))
    half = write_store(tmp_path, manifest, "synthetic", "a" * 64, [values.astype(np.float16)])
    full = write_store(tmp_path, manifest, "synthetic", "a" * 64, [values])
    assert half.name == "a" * 16 + "-float16" and full.name == "a" * 16
    np.testing.assert_array_equal(load_embeddings(half)[1], values.astype(np.float16))


CHILD = """
import resource, sys, numpy as np, torch
from bonylib.evaluation.embeddings import open_embeddings
from bonylib.evaluation.features import Features, moments
from bonylib.evaluation.knn import weighted_knn
from bonylib.evaluation.probes import predict_logits
torch.set_num_threads(1)
features = Features(open_embeddings(sys.argv[1]))
head = torch.nn.Linear(features.shape[1], 3)
predict_logits(head, features[:64])  # warm-up: torch's first-call allocations are not the pass's
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
mean, std = moments(features, block_rows=512)
logits = predict_logits(head, features.standardized(np.arange(len(features)) % 2 == 0), batch_size=512)
test = features.subset(np.arange(0, len(features), 32))
labels = torch.from_numpy(np.arange(len(features)) % 3)
weighted_knn(features, labels, test, 3, chunk=256, train_chunk=512)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((after - before) * 1024, float(mean.sum()), logits.shape[0])
"""


def test_a_pass_over_a_store_holds_blocks_not_the_store(tmp_path: Path) -> None:
    rows, width = 32768, 1024  # 128 MiB of float32; blocks of 2 to 8 MiB
    manifest = synthetic_manifest(tmp_path / "manifest.parquet", rows, slides=64)
    rng = np.random.default_rng(6)
    blocks = (rng.normal(size=(4096, width)).astype(np.float32) for _ in range(rows // 4096))
    store = write_store(tmp_path / "out", manifest, "synthetic", "b" * 64, blocks)
    open_embeddings(store)  # verified here, so the child only reads
    done = subprocess.run([sys.executable, "-c", CHILD, str(store)], capture_output=True, text=True, check=True)
    growth, _, predicted = done.stdout.split()
    assert int(predicted) == rows
    assert int(growth) < 40 * 2**20, f"the passes grew the resident set by {int(growth) / 2**20:.0f} MiB (store: 128 MiB)"


def in_memory_classify(kind: str, x: torch.Tensor, targets: torch.Tensor, parts: np.ndarray, classes: int,
                       cfg: ProbeConfig, seed: int) -> np.ndarray:
    """What ``bony evaluate`` computed before it streamed: the whole array in memory as one float32 tensor, z-scored
    by torch's mean and std of the train rows, the head fitted on tensors; k-NN by brute force."""
    train, val, test = (torch.from_numpy(parts == part) for part in ("train", "val", "test"))
    if kind == "knn":
        return brute_force_knn(x[train].numpy(), targets[train].numpy(), x[test].numpy(), classes, cfg.knn_k,
                               cfg.knn_temperature)
    reference = x[train]
    spread = reference.std(0)
    z = (x - reference.mean(0)) / torch.where(spread > 0, spread, torch.ones_like(spread))
    head = seed_mlp(x.shape[1], classes, cfg.mlp_hidden) if kind == "mlp" else torch.nn.Linear(x.shape[1], classes)
    fit = fit_classifier(head, (z[train], targets[train]), (z[val], targets[val]), metric="balanced_accuracy",
                         lr=cfg.lr, batch_size=cfg.batch_size, max_steps=cfg.max_steps, eval_every=cfg.eval_every,
                         patience=cfg.patience, seed=seed)
    return predict_logits(fit.head, z[test]).argmax(1).numpy()


@pytest.mark.parametrize("kind", ["mlp", "linear", "knn"])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_streamed_heads_give_the_numbers_of_the_whole_array_in_memory(tmp_path: Path, kind: str, dtype: str) -> None:
    rng = np.random.default_rng(7)
    labels = rng.integers(0, 3, 900)
    values = (rng.normal(size=(3, 24))[labels] * 0.6 + rng.normal(size=(900, 24)) + 5.0).astype(dtype)
    values[:, 4] *= 300.0  # scales apart, as the handcrafted baseline's channels are
    parts = np.array(["train", "val", "test"])[np.repeat(np.arange(30) % 5 // 2, 30)]  # whole "slides" of 30 rows
    store = stored(tmp_path, values)
    cfg = ProbeConfig(max_steps=60, eval_every=20, patience=2, mlp_hidden=[32], batch_size=64)
    streamed, _ = classify(kind, Features(open_embeddings(store)), torch.from_numpy(labels), parts, 3, cfg, 0, CPU)
    before = in_memory_classify(kind, torch.from_numpy(values.astype(np.float32)), torch.from_numpy(labels), parts, 3,
                                cfg, 0)
    np.testing.assert_array_equal(streamed["test"], before)
    assert 0.5 < (before == labels[parts == "test"]).mean() < 1.0, "a task the head can get partly wrong"
