"""Training checkpoints that are verified before they are trusted, and the config check that guards a resume.

Each checkpoint file has a SHA-256 sidecar (``checkpoint-<step>.pth.sha256``) written from the bytes
that were saved. A checkpoint whose bytes no longer match (a flipped bit on a shared filesystem, a
copy cut short), that torch cannot read, or that lacks a part of the training state is treated alike:
skipped with a warning naming the file and why, and the previous one is tried. A torch file that
loads is not proof of a good one: 64 bytes flipped inside tensor data loaded silently and the losses
diverged.

A resume must continue the same experiment: :func:`config_changes` lists the keys whose values
differ from those the checkpoint was trained with, and the trainer refuses all but the run-only keys
(:data:`RUN_ONLY_KEYS`) and those the user names in ``resume.allow_changes``.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import torch

from bonylib.config import flat_keys
from bonylib.errors import BonyError
from bonylib.files import atomic_path, sha256_file, write_text_atomic

log = logging.getLogger(__name__)

LATEST = "checkpoint.pth"
CHECKSUM_SUFFIX = ".sha256"
STATE_KEYS = ("step", "student", "teacher", "optimizer", "scaler", "losses", "rng_cpu", "rng_cuda", "config")
LEGACY_CENTER = "center"
"""Checkpoints written before the objectives had their own state hold DINO's center under this key instead of
``losses``: they still resume (:func:`objectives_state`)."""
RUN_ONLY_KEYS = ("data.workers", "log_every", "tensorboard", "checkpoint_every", "keep_checkpoints", "max_steps",
                 "resume.")
"""Keys (or key prefixes ending in '.') of the training schema that change how a run is executed, logged or
checkpointed, not what it trains: a resume may change them freely (each change is still recorded). Keys outside the
training schema (the k-NN monitor's, added by the composed config) never change what is trained either."""


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + CHECKSUM_SUFFIX)


class _HashingWriter:
    """A file as torch.save writes it (sequentially), hashing the bytes on their way: a checkpoint of
    gigabytes is not read back to compute its checksum."""

    def __init__(self, handle: BinaryIO) -> None:
        self.handle, self.digest = handle, hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        return self.handle.write(data)

    def flush(self) -> None:
        self.handle.flush()


def save(state: Mapping[str, Any], out: Path, step: int, keep: int) -> Path:
    """Write ``checkpoint-<step>.pth`` and its checksum, make ``checkpoint.pth`` a copy, keep the last ``keep``.

    The sidecar is written before the checkpoint is renamed into place: a kill between the two leaves a
    checksum that does not match the older file of that name, which is then skipped, never trusted.
    """
    numbered = out / f"checkpoint-{step:08d}.pth"
    with atomic_path(numbered) as tmp:
        # through a Python file the full disk's OSError reaches us (raised, or as the context of torch's
        # "unexpected pos" RuntimeError), and atomic_path turns it into DiskFullError; written by path,
        # torch's C++ writer reports only "unexpected pos"
        with open(tmp, "wb") as handle:
            hashing = _HashingWriter(handle)
            torch.save(dict(state), hashing)
        checksum = hashing.digest.hexdigest()
        write_text_atomic(_sidecar(numbered), checksum + "\n")
    write_text_atomic(_sidecar(out / LATEST), checksum + "\n")
    with atomic_path(out / LATEST) as tmp:
        shutil.copyfile(numbered, tmp)
    for old in sorted(out.glob("checkpoint-*.pth"))[: -keep or None]:
        old.unlink()
        _sidecar(old).unlink(missing_ok=True)
    for orphan in out.glob(f"checkpoint*.pth{CHECKSUM_SUFFIX}"):  # left by a save that died before its rename
        if not orphan.with_suffix("").is_file():
            orphan.unlink()
    return numbered


def _problem(path: Path, required: Iterable[str]) -> tuple[dict[str, Any] | None, str]:
    """``(state, "")`` for a sound checkpoint, ``(None, why)`` otherwise."""
    sidecar = _sidecar(path)
    if sidecar.is_file():
        expected = sidecar.read_text().strip()
        if sha256_file(path) != expected:
            return None, f"its bytes do not match the checksum in {sidecar.name}"
    else:
        log.warning("%s: no checksum file beside it (written by an older Bony?): loading it unverified", path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a truncated or foreign file fails anywhere inside the unpickler
        return None, f"torch cannot read it ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
    if not isinstance(state, dict):
        return None, f"it holds a {type(state).__name__}, not a training state"
    missing = [key for key in required if key not in state and not (key == "losses" and LEGACY_CENTER in state)]
    if missing:
        return None, f"it is not a bony pretrain checkpoint (no {', '.join(missing)})"
    return state, ""


def load_latest(out: Path, required: Iterable[str] = STATE_KEYS) -> tuple[dict[str, Any], Path] | None:
    """The newest sound checkpoint in ``out`` and its path; None when there is none at all.

    The numbered checkpoints come first, newest first (a kill between writing one and copying it to
    ``checkpoint.pth`` leaves the copy a step behind), then ``checkpoint.pth`` (the only one when
    ``keep_checkpoints`` is 0). Unsound ones are skipped with a warning. When checkpoints exist but none
    is sound, training must not silently start again from step 0 over a run's folder: that raises,
    naming each file and its fault.
    """
    candidates = [*sorted(out.glob("checkpoint-*.pth"), reverse=True), out / LATEST]
    faults = []
    for path in (p for p in candidates if p.is_file()):
        state, why = _problem(path, list(required))
        if state is not None:
            return state, path
        log.warning("%s: unusable checkpoint (%s), trying an older one", path, why)
        faults.append(f"{path.name}: {why}")
    if faults:
        raise BonyError(f"{out}: no usable checkpoint to resume from ({'; '.join(faults)}); move the run folder away "
                        f"to start again, or restore a good checkpoint")
    return None


def objectives_state(state: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The objectives' state of a training state: its ``losses``, or, in a checkpoint written before objectives
    were modules of their own, DINO's center as the DINO objective holds it."""
    if "losses" in state:
        return dict(state["losses"])
    return {"dino.centering.center": state[LEGACY_CENTER]}


def config_changes(saved: Mapping[str, Any], current: Mapping[str, Any],
                   defaults: Mapping[str, Any] | None = None) -> dict[str, tuple[Any, Any]]:
    """``{dotted key: (value in saved, value in current)}`` for every key whose value differs.

    A key that ``saved`` lacks takes its value from ``defaults``: an option added to the schema after the
    checkpoint was written (``model.stem``) has its default in a run that predates it, so resuming such a run
    with the default is no change.
    """
    old, new = {**flat_keys(defaults or {}), **flat_keys(saved)}, flat_keys(current)
    missing = object()
    return {key: (old.get(key), new.get(key)) for key in sorted(old.keys() | new.keys())
            if old.get(key, missing) != new.get(key, missing)}


def refused_changes(changes: Mapping[str, tuple[Any, Any]], allowed: Iterable[str],
                    trained: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """The changes a resume may not make: keys of the training schema ``trained`` (a config as a dict) that are
    neither run-only keys nor named in ``allowed``."""
    permitted = (*RUN_ONLY_KEYS, *allowed)
    schema = flat_keys(trained)
    return {key: values for key, values in changes.items() if key in schema
            and not any(key == p or (p.endswith(".") and key.startswith(p)) for p in permitted)}
