"""A pretraining run's log: written as the run goes (``log.jsonl``, mirrored to TensorBoard), read back as tables.

The trainer writes through :class:`RunLog`, which keeps each step once across interruptions; the chapters that
look at a run (pretraining, the wavelet experiment) read it through :func:`training_log`, so a run is read one way
wherever it is shown (comparing two runs' configs: :mod:`bonylib.compose.pretrain`).
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Any

import pandas as pd

from bonylib.errors import BonyError
from bonylib.files import append_line, write_text_atomic

log = logging.getLogger(__name__)

LOG_FILE = "log.jsonl"


class RunLog:
    """``log.jsonl`` of a run (one JSON object per record) and, with ``tensorboard``, the same numbers as TensorBoard
    scalars under ``tensorboard/``. Written by the main process only."""

    def __init__(self, out: Path, tensorboard: bool = False) -> None:
        self.path, self.tensorboard = Path(out) / LOG_FILE, tensorboard
        self._writer: Any = None

    def open(self, step: int) -> None:
        """Start writing after ``step``, the step training resumes from: records past it (logged before an
        interruption, to be logged again) and a line cut short by a kill are dropped, and so are TensorBoard events
        past it, so each step is logged once."""
        if self.path.is_file():
            lines = self.path.read_text().splitlines()
            kept = []
            for line in lines:
                with contextlib.suppress(json.JSONDecodeError):
                    if json.loads(line)["step"] <= step:
                        kept.append(line)
            if len(kept) < len(lines):
                log.warning("%s: dropping %d line(s) logged after step %d (the step training resumes from)", self.path,
                            len(lines) - len(kept), step)
                write_text_atomic(self.path, "".join(f"{line}\n" for line in kept))
        if self.tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # TensorBoard's import is slow: only when asked for

            self._writer = SummaryWriter(str(self.path.parent / "tensorboard"), purge_step=step + 1)

    def write(self, record: dict[str, Any]) -> None:
        """Append one record (with ``step``) and, when enabled, its numbers to TensorBoard at its step."""
        append_line(self.path, json.dumps(record))
        if self._writer is not None:
            for key, value in record.items():
                if key not in ("step", "epoch"):
                    self._writer.add_scalar(f"pretrain/{key}", value, record["step"])

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def training_log(run: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The run's ``log.jsonl`` as two tables: the logged optimisation steps (loss, entropies, schedules,
    images/s) and the k-NN evaluations (one row per epoch end). A line cut short by a kill is skipped, as the
    trainer itself does when it resumes."""
    path = Path(run) / LOG_FILE
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
