"""Sweeps: one pretraining recipe and named sets of overrides (its arms), each arm a ``bony pretrain`` run of its own.

The seed's report ran experiments, not only one model: it compared the head's output dimension and first trained with
a loss that did not decrease. A sweep file (``configs/pretrain/sweeps/*.yaml``) makes each such experiment runnable
as it was run, at any scale:

.. code-block:: yaml

    base: ../seed.yaml                  # the recipe every arm changes (relative to this file)
    overrides: []                       # keys every arm sets (optional)
    arms:                               # in order: an arm's index is its position here
      out_dim_1024: [model.out_dim=1024]
      out_dim_2048: [model.out_dim=2048]

An arm's config is the base recipe, then the sweep's ``overrides``, then the caller's (a smaller run: a shorter
schedule, another backbone), then the arm's own keys, which nothing may override: a caller's key that an arm sets
is refused, since the arm would no longer be what it studies. The same file runs at the seed's scale (its base) and at
the demo's (``bony sweep --config configs/pretrain/demo.yaml``, the base replaced). Each arm trains through the one
pretraining entry point (:func:`bonylib.compose.pretrain.build_trainer`) into ``OUT/<arm>``, and resumes there.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from bonylib import plotting
from bonylib.compose.pretrain import PretrainConfig, build_trainer
from bonylib.config import load_config, read_mapping
from bonylib.errors import ConfigError
from bonylib.ssl.runs import training_log, training_summary

ARM_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
"""An arm's name is its run folder's: no path separators, no spaces."""
OVERRIDE = re.compile(r"^[A-Za-z_][\w.]*=[^\n]*$")


@dataclass(frozen=True)
class Sweep:
    """A parsed sweep file: the base recipe, the keys every arm sets, and each arm's keys by name (in file order)."""

    path: Path
    base: Path
    overrides: tuple[str, ...]
    arms: dict[str, tuple[str, ...]]

    def arm_keys(self, arm: str) -> set[str]:
        """The config keys ``arm`` sets."""
        return override_keys(self.arms[arm])


def override_keys(items: Sequence[str]) -> set[str]:
    """The keys of ``key=value`` overrides."""
    return {item.partition("=")[0].strip() for item in items}


def _overrides(path: Path, where: str, value: object) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(item, str) and OVERRIDE.match(item) for item in value):
        raise ConfigError(f"{path}: {where} must be a list of key=value overrides (for example model.out_dim=1024), "
                          f"got {value!r}")
    keys = [item.partition("=")[0] for item in value]
    if len(set(keys)) != len(keys):
        raise ConfigError(f"{path}: {where} sets a key twice: {', '.join(sorted(k for k in keys if keys.count(k) > 1))}")
    return tuple(value)


def read_sweep(path: Path) -> Sweep:
    """The sweep in ``path``; a :class:`ConfigError` naming the file and the key at fault otherwise. Every arm's config
    is resolved once here, so that a bad key or value is found before any arm trains."""
    path = Path(path)
    mapping = read_mapping(path)
    unknown = sorted(set(mapping) - {"base", "overrides", "arms"})
    if unknown:
        raise ConfigError(f"{path}: unknown key '{unknown[0]}' (a sweep has base, overrides and arms)")
    base = mapping.get("base")
    if not isinstance(base, str) or not base:
        raise ConfigError(f"{path}: base must name the pretraining recipe the arms change (relative to the sweep file)")
    arms = mapping.get("arms")
    if not isinstance(arms, dict) or not arms:
        raise ConfigError(f"{path}: arms must map each arm's name to its list of key=value overrides")
    shared = _overrides(path, "overrides", mapping.get("overrides"))
    parsed: dict[str, tuple[str, ...]] = {}
    for name, keys in arms.items():
        if not isinstance(name, str) or not ARM_NAME.match(name):
            raise ConfigError(f"{path}: arm name {name!r} must be letters, digits, '_', '.' or '-' (it names a folder)")
        parsed[name] = _overrides(path, f"arms.{name}", keys)
        both = override_keys(shared) & override_keys(parsed[name])
        if both:
            raise ConfigError(f"{path}: arm {name} sets {', '.join(sorted(both))}, which overrides already sets for "
                              f"every arm")
    sweep = Sweep(path, (path.parent / base), shared, parsed)
    for name in parsed:
        arm_config(sweep, name)
    return sweep


def pick_arm(sweep: Sweep, which: str | int) -> str:
    """The arm ``which`` names: its name, or its index in the file (0 first; a SLURM array task id)."""
    names = list(sweep.arms)
    listed = ", ".join(f"{i}: {name}" for i, name in enumerate(names))
    if isinstance(which, int) or str(which).isdigit():
        index = int(which)
        if index < len(names):
            return names[index]
        raise ConfigError(f"{sweep.path}: no arm {index}, the arms are {listed}")
    if which in sweep.arms:
        return str(which)
    raise ConfigError(f"{sweep.path}: no arm '{which}', the arms are {listed}")


def arm_overrides(sweep: Sweep, arm: str, overrides: Sequence[str] = ()) -> list[str]:
    """The overrides ``bony pretrain`` applies to the base recipe for ``arm``, in order: the sweep's, the caller's
    ``overrides``, the arm's. A caller's key that the arm sets is refused."""
    clash = override_keys(overrides) & sweep.arm_keys(arm)
    if clash:
        raise ConfigError(f"override {', '.join(sorted(clash))}: arm {arm} of {sweep.path} sets it, and the arm would "
                          f"no longer be what the sweep compares")
    return [*sweep.overrides, *overrides, *sweep.arms[arm]]


def arm_config(sweep: Sweep, arm: str, base: Path | None = None, overrides: Sequence[str] = ()) -> PretrainConfig:
    """The config ``arm`` trains with: ``base`` (default: the sweep's) with :func:`arm_overrides`."""
    recipe = Path(base) if base is not None else sweep.base
    keys = arm_overrides(sweep, arm, overrides)
    try:
        return load_config(PretrainConfig, recipe, keys)
    except ConfigError as exc:
        raise ConfigError(f"{sweep.path}, arm {arm}: {exc}") from None


def train_arms(sweep: Sweep, out: Path, arms: Sequence[str] = (), base: Path | None = None,
               overrides: Sequence[str] = ()) -> dict[str, Path]:
    """Train (or resume) ``arms`` (default: every arm, in file order), each into ``out/<arm>``; their run folders by
    name. A finished arm is found finished by its checkpoint and only exported again."""
    chosen = list(arms) or list(sweep.arms)
    configs = {arm: arm_config(sweep, arm, base, overrides) for arm in chosen}  # every arm checked before any trains
    return {arm: build_trainer(cfg, Path(out) / arm).train() for arm, cfg in configs.items()}


FOLDER = "sweeps"
"""The folder of the chapter "The report's experiments" in the run folder: one sub-folder per sweep, one run per arm."""


def demo_sweep(run: Path, sweep: Path, recipe: Path, overrides: Sequence[str]) -> dict[str, Path]:
    """The arms of ``sweep`` on ``recipe`` (the demo's, for the seed's) at the chapter's budget (``overrides``), on
    the run folder's PANDA tiles with the k-NN monitor on its DeepGleason tiles (run at the last step), trained or
    resumed into ``run/sweeps/<sweep name>/<arm>``."""
    tiles = Path(run) / "tiles"
    located = [f"data.manifest={tiles / 'panda' / 'manifest.parquet'}",
               f"knn.manifest={tiles / 'deepgleason' / 'manifest.parquet'}", *overrides]
    parsed = read_sweep(sweep)
    return train_arms(parsed, Path(run) / FOLDER / parsed.path.stem, base=recipe, overrides=located)


def cluster_command(sweep: Path, out: str = "/scratch/bony/runs") -> str:
    """The seed-scale command of ``sweep``: one array task of ``slurm/sweep.sbatch`` per arm, on the sweep's own base."""
    parsed = read_sweep(sweep)
    return (f"mkdir -p logs && sbatch --array=0-{len(parsed.arms) - 1} slurm/sweep.sbatch "
            f"configs/pretrain/sweeps/{parsed.path.name} {out}/{parsed.path.stem}")


def relative_logs(runs: dict[str, Path]) -> dict[str, pd.DataFrame]:
    """Each arm's logged steps with the loss and the teacher's entropy as fractions of ln K (1: uniform targets), so
    that arms with different numbers of prototypes K compare, and the loss less the teacher's entropy: the mean
    KL(P_t || P_s) over the crop pairs, what the student has left to learn of its targets (about: the entropy is
    logged under the center as the step left it)."""
    logs = {}
    for arm, path in runs.items():
        steps, _ = training_log(path)
        logs[arm] = steps.assign(loss_of_ln_k=steps["loss"] / steps["collapse_entropy"],
                                 entropy_of_ln_k=steps["teacher_entropy"] / steps["collapse_entropy"],
                                 loss_over_entropy=steps["loss"] - steps["teacher_entropy"])
    return logs


def sweep_curves(runs: dict[str, Path]) -> Figure:
    """The arms side by side: loss and teacher entropy over ln K, the loss above the entropy, the spread of the
    teacher's normalised outputs (near 0: one output for every tile)."""
    return plotting.run_curves(relative_logs(runs), {
        "loss_of_ln_k": "loss / ln K", "entropy_of_ln_k": "teacher entropy / ln K (1: uniform)",
        "loss_over_entropy": "loss - teacher entropy (about KL)", "feature_std": "std of normalised teacher outputs"})


def sweep_table(runs: dict[str, Path], last: int = 3) -> pd.DataFrame:
    """One row per arm: its prototypes K, the loss and the teacher entropy over ln K at the first logged step and
    averaged over the ``last`` logged ones, the loss above the entropy there, and the run's summary (steps, images/s,
    the k-NN balanced accuracies of its last monitor)."""
    rows = {}
    for arm, steps in relative_logs(runs).items():
        tail = steps.tail(last)
        summary = training_summary(runs[arm], last)
        rows[arm] = {"K": round(math.exp(float(steps["collapse_entropy"].iloc[0]))),
                     "loss / ln K (first logged)": float(steps["loss_of_ln_k"].iloc[0]),
                     f"loss / ln K (last {len(tail)})": float(tail["loss_of_ln_k"].mean()),
                     f"entropy / ln K (last {len(tail)})": float(tail["entropy_of_ln_k"].mean()),
                     f"loss - entropy (last {len(tail)})": float(tail["loss_over_entropy"].mean()),
                     **{k: v for k, v in summary.items() if k == "steps" or k.startswith(("images/s", "k-NN"))}}
    return pd.DataFrame(rows).T
