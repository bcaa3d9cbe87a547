"""``bony pretrain`` as users run it: the training of :mod:`bonylib.ssl` with the k-NN monitor of
:mod:`bonylib.evaluation`, and the reading of finished runs that compares two of them.

The trainer does not import the evaluation stage: it takes any monitor (:class:`bonylib.ssl.trainer.Monitor`),
and this module gives it the k-NN one when ``knn.manifest`` names labelled tiles. The config users write is
:class:`PretrainConfig`: the training schema plus the monitor's section.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bonylib.config import load_config, section, to_dict
from bonylib.errors import BonyError
from bonylib.evaluation.knn import KnnConfig, KnnMonitor
from bonylib.ssl.checkpoints import config_changes, refused_changes
from bonylib.ssl.config import TrainConfig
from bonylib.ssl.distributed import World
from bonylib.ssl.runs import training_log
from bonylib.ssl.trainer import Trainer


@dataclass
class PretrainConfig(TrainConfig):
    """Options of ``bony pretrain``."""

    knn: KnnConfig = section(KnnConfig, "k-NN monitoring")


def knn_monitor(cfg: PretrainConfig) -> KnnMonitor | None:
    """The run's k-NN monitor, with its eval transform (global crop size, normalisation); None without
    ``knn.manifest``."""
    if not cfg.knn.manifest:
        return None
    return KnnMonitor(cfg.knn, cfg.seed, cfg.crops.global_size, cfg.crops.mean, cfg.crops.std)


def build_trainer(cfg: PretrainConfig, out: Path, world: World | None = None) -> Trainer:
    """The trainer of ``cfg`` writing to ``out``, with its k-NN monitor."""
    return Trainer(cfg, out, world, monitor=knn_monitor(cfg))


def run_config(run: Path | TrainConfig) -> dict[str, Any]:
    """The config a run trained with (its ``config.yaml``), complete: a key added to the schema after the run
    was written has its default. A config (a run about to start: ``Trainer.resolved_config``) is taken as it is."""
    if isinstance(run, TrainConfig):
        return to_dict(run)
    path = Path(run) / "config.yaml"
    if not path.is_file():
        raise BonyError(f"{path}: no run config (is {run} a pretraining run folder? run bony pretrain first)")
    return to_dict(load_config(PretrainConfig, path))


def training_differences(first: Path | TrainConfig, second: Path | TrainConfig) -> dict[str, tuple[Any, Any]]:
    """``{dotted key: (first's value, second's value)}`` for every setting that changes what the two runs
    trained. Keys that only change how a run is executed, logged or monitored (data workers, logging, the k-NN
    monitor; :data:`~bonylib.ssl.checkpoints.RUN_ONLY_KEYS`) are left out, except ``max_steps``, which a resume
    may change but which cuts the training short; a key one run predates counts at its default."""
    changes = config_changes(run_config(first), run_config(second))
    differences = refused_changes(changes, allowed=(), trained=to_dict(TrainConfig()))
    if "max_steps" in changes:
        differences["max_steps"] = changes["max_steps"]
    return differences


def require_same_budget(first: Path | TrainConfig, second: Path | TrainConfig, studied: set[str]) -> None:
    """A :class:`BonyError` unless the two runs differ in exactly the ``studied`` settings and, where both have
    trained, in no number of steps: the condition for reading a difference between them as the studied setting's
    effect at the same compute budget. Check a run before it trains (pass its resolved config) and after."""
    differences = training_differences(first, second)
    if set(differences) != studied:
        listed = ", ".join(f"{key}: {a!r} / {b!r}" for key, (a, b) in differences.items()) or "nothing"
        raise BonyError(f"{first} and {second} differ in {listed}; a comparison at the same budget needs them to "
                        f"differ in {', '.join(sorted(studied))} only")
    trained = [training_log(run)[0]["step"].iloc[-1] for run in (first, second)
               if not isinstance(run, TrainConfig) and (Path(run) / "log.jsonl").is_file()]
    if len(trained) == 2 and trained[0] != trained[1]:
        raise BonyError(f"{first} trained {trained[0]} steps and {second} {trained[1]}: finish both before comparing")
