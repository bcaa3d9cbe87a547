"""Synthetic datasets in the exact on-disk formats of PANDA, SICAPv2 and DeepGleason.

The real datasets cannot be downloaded on every machine (nor in CI); these writers produce small,
seeded look-alikes whose files every Bony reader opens as it would the real ones. Tissue is
painted by :mod:`.tissue` so that classes differ by morphology, with stain variation, debris and
pen ink that make tissue detection and colour-invariance real problems.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import yaml
from tqdm import tqdm

from bonylib.config import option, section, to_dict
from bonylib.data.synthetic import deepgleason, panda, sicapv2
from bonylib.errors import BonyError, ConfigError
from bonylib.files import atomic_dir, ensure_writable_dir, write_text_atomic

log = logging.getLogger(__name__)

DATASETS: tuple[str, ...] = ("panda", "sicapv2", "deepgleason")


@dataclass
class SynthConfig:
    """Options of ``bony synth``."""

    seed: int = option(0, "random seed; the same seed and options give byte-identical datasets")
    workers: int = option(1, "processes that render slides in parallel")
    panda: panda.PandaSynth = section(panda.PandaSynth, "PANDA look-alike")
    sicapv2: sicapv2.Sicapv2Synth = section(sicapv2.Sicapv2Synth, "SICAPv2 look-alike")
    deepgleason: deepgleason.DeepGleasonSynth = section(deepgleason.DeepGleasonSynth, "DeepGleason-style tiles")

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ConfigError(f"workers must be at least 1, got {self.workers}")


def _map(fn: Callable[[int], Any], n: int, workers: int, desc: str) -> list[Any]:
    """``[fn(i) for i in range(n)]`` with a progress bar, over ``workers`` processes."""
    if workers == 1:
        return [fn(i) for i in tqdm(range(n), desc=desc, unit="slide")]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(tqdm(pool.map(fn, range(n)), total=n, desc=desc, unit="slide"))


def _write_panda(root: Path, cfg: SynthConfig) -> None:
    rows = _map(partial(panda.write_slide, root, cfg.panda, cfg.seed), cfg.panda.slides, cfg.workers, "PANDA")
    panda.write_train_csv(root, rows)


def _write_sicapv2(root: Path, cfg: SynthConfig) -> None:
    fn = partial(sicapv2.write_slide, root, cfg.sicapv2, cfg.seed)
    results = _map(fn, cfg.sicapv2.slides, cfg.workers, "SICAPv2")
    wsi = [w for w, _ in results]
    patches = {str(w["slide_id"]): rows for w, rows in results}
    sicapv2.write_partitions(root, cfg.sicapv2, cfg.seed, wsi, patches)


def _write_deepgleason(root: Path, cfg: SynthConfig) -> None:
    fn = partial(deepgleason.write_slide, root, cfg.deepgleason, cfg.seed)
    rows = [row for slide in _map(fn, cfg.deepgleason.slides, cfg.workers, "DeepGleason") for row in slide]
    deepgleason.write_index(root, cfg.deepgleason, cfg.seed, rows)


_WRITERS: dict[str, Callable[[Path, SynthConfig], None]] = {
    "panda": _write_panda,
    "sicapv2": _write_sicapv2,
    "deepgleason": _write_deepgleason,
}


def dataset_config(cfg: SynthConfig, dataset: str) -> dict[str, Any]:
    """The part of the config that decides ``dataset``'s files (saved as its ``config.yaml``)."""
    return {"seed": cfg.seed, dataset: to_dict(getattr(cfg, dataset))}


def synthesize(dataset: str, out: Path, cfg: SynthConfig, overwrite: bool = False) -> list[Path]:
    """Write ``dataset`` (or ``all`` three, in sub-folders) to ``out``; return the dataset folders.

    The folder appears whole or not at all (written beside it, then renamed). A folder already
    holding the same dataset from the same config is kept as is, so reruns cost nothing; any other
    existing folder is replaced only with ``overwrite``.
    """
    if dataset == "all":
        return [p for name in DATASETS for p in synthesize(name, Path(out) / name, cfg, overwrite)]
    if dataset not in _WRITERS:
        raise BonyError(f"unknown dataset '{dataset}' (choose from {', '.join(DATASETS)}, all)")
    out = Path(out)
    ensure_writable_dir(out)
    wanted = yaml.safe_dump(dataset_config(cfg, dataset), sort_keys=False)
    if out.exists() and not out.is_dir():
        raise BonyError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        saved = out / "config.yaml"
        if saved.is_file() and saved.read_text() == wanted:
            log.info("%s: %s already written with this config, kept", out, dataset)
            return [out]
        if not overwrite:
            raise BonyError(f"{out}: folder exists and holds something else; pass --overwrite to replace it")
    log.info("writing synthetic %s to %s", dataset, out)
    with atomic_dir(out) as tmp:
        _WRITERS[dataset](tmp, cfg)
        write_text_atomic(tmp / "config.yaml", wanted)
    return [out]

