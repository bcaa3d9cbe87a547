"""Reading finished pretraining runs: the training log as tables, and what two runs trained differently.

The chapters that look at a run (pretraining, the wavelet experiment) read its folder through these, so a
run is read one way wherever it is shown, and a comparison between two runs can check that only the
studied setting differs before it reports a difference as that setting's effect.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from bonylib.config import load_config, to_dict
from bonylib.errors import BonyError
from bonylib.ssl.checkpoints import config_changes, refused_changes
from bonylib.ssl.trainer import PretrainConfig


def training_log(run: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The run's ``log.jsonl`` as two tables: the logged optimisation steps (loss, entropies, schedules,
    images/s) and the k-NN evaluations (one row per epoch end). A line cut short by a kill is skipped, as the
    trainer itself does when it resumes."""
    path = Path(run) / "log.jsonl"
    if not path.is_file():
        raise BonyError(f"{path}: no training log (is {run} a pretraining run folder? run bony pretrain first)")
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    steps = pd.DataFrame([r for r in records if "loss" in r])
    if steps.empty:
        raise BonyError(f"{path}: no logged step yet")
    return steps, pd.DataFrame([r for r in records if "knn_accuracy" in r])


def run_config(run: Path | PretrainConfig) -> dict[str, Any]:
    """The config a run trained with (its ``config.yaml``), complete: a key added to the schema after the run
    was written has its default. A :class:`PretrainConfig` (a run about to start: ``Trainer.resolved_config``)
    is taken as it is."""
    if isinstance(run, PretrainConfig):
        return to_dict(run)
    path = Path(run) / "config.yaml"
    if not path.is_file():
        raise BonyError(f"{path}: no run config (is {run} a pretraining run folder? run bony pretrain first)")
    return to_dict(load_config(PretrainConfig, path))


def training_differences(first: Path | PretrainConfig, second: Path | PretrainConfig) -> dict[str, tuple[Any, Any]]:
    """``{dotted key: (first's value, second's value)}`` for every setting that changes what the two runs
    trained. Keys that only change how a run is executed, logged or monitored (data workers, logging, the k-NN
    monitor; :data:`~bonylib.ssl.checkpoints.RUN_ONLY_KEYS`) are left out, except ``max_steps``, which a resume
    may change but which cuts the training short; a key one run predates counts at its default."""
    changes = config_changes(run_config(first), run_config(second))
    differences = refused_changes(changes, allowed=())
    if "max_steps" in changes:
        differences["max_steps"] = changes["max_steps"]
    return differences


def require_same_budget(first: Path | PretrainConfig, second: Path | PretrainConfig, studied: set[str]) -> None:
    """A :class:`BonyError` unless the two runs differ in exactly the ``studied`` settings and, where both have
    trained, in no number of steps: the condition for reading a difference between them as the studied setting's
    effect at the same compute budget. Check a run before it trains (pass its resolved config) and after."""
    differences = training_differences(first, second)
    if set(differences) != studied:
        listed = ", ".join(f"{key}: {a!r} / {b!r}" for key, (a, b) in differences.items()) or "nothing"
        raise BonyError(f"{first} and {second} differ in {listed}; a comparison at the same budget needs them to "
                        f"differ in {', '.join(sorted(studied))} only")
    trained = [training_log(run)[0]["step"].iloc[-1] for run in (first, second)
               if not isinstance(run, PretrainConfig) and (Path(run) / "log.jsonl").is_file()]
    if len(trained) == 2 and trained[0] != trained[1]:
        raise BonyError(f"{first} trained {trained[0]} steps and {second} {trained[1]}: finish both before comparing")


def training_summary(run: Path, last: int = 5) -> dict[str, float]:
    """A run in a few numbers: steps trained, the loss and teacher entropy averaged over its ``last`` logged steps
    (one logged step is noisy), the median images/s (the first logged step is left out: it pays for start-up),
    the peak memory, and the last k-NN balanced accuracies when the run had a k-NN monitor."""
    steps, knn = training_log(run)
    tail = steps.tail(last)
    speed = steps["images_per_s"].iloc[1:] if len(steps) > 1 else steps["images_per_s"]
    summary = {"steps": float(steps["step"].iloc[-1]), f"loss (last {len(tail)} logged)": float(tail["loss"].mean()),
               f"teacher entropy (last {len(tail)} logged)": float(tail["teacher_entropy"].mean()),
               "images/s (median)": float(speed.median()), "peak memory (MB)": float(steps["peak_memory_mb"].max())}
    if not knn.empty:
        for column in knn.columns:
            if column.startswith("knn_balanced_accuracy"):
                summary[f"k-NN {column.removeprefix('knn_').replace('_', ' ')}"] = float(knn[column].iloc[-1])
    return summary
