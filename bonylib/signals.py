"""Stop signals (SIGTERM, and SIGUSR1: SLURM's warning before the time limit) turned into a flag.

A run must be able to stop cleanly whenever the signal comes, including in the first seconds of a
job, while Python is still importing torch: SLURM may send the warning up to a minute early, and
pre-emption sends SIGTERM at any moment. Python's default for both is to die on the spot, so
``python -m bonylib pretrain`` starts catching them before it imports anything heavy, and the
trainer acts on what was caught once it can write a checkpoint. No torch import here, on purpose.
"""

from __future__ import annotations

import signal
from typing import Any

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

_received: list[int] = []
_previous: dict[int, Any] = {}


def _record(signum: int, frame: Any) -> None:
    _received.append(signum)


def catch_stop_signals() -> None:
    """From now on SIGTERM and SIGUSR1 are recorded instead of ending the process (again: no effect)."""
    for sig in STOP_SIGNALS:
        if sig not in _previous:
            _previous[sig] = signal.signal(sig, _record)


def stop_received() -> int | None:
    """The first stop signal caught since :func:`catch_stop_signals`, or None."""
    return _received[0] if _received else None


def release_stop_signals() -> None:
    """Put back the handlers that were there before :func:`catch_stop_signals`, and forget what was caught."""
    for sig, handler in _previous.items():
        signal.signal(sig, handler)
    _previous.clear()
    _received.clear()


def ignore_stop_signals(worker_id: int = 0) -> None:
    """For DataLoader workers (``worker_init_fn``): ignore the stop signals. The main process decides when
    to stop, checkpoints, and ends them; SLURM and ``kill`` of a job signal every process of the group."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
