"""``bony evaluate``: encoders × benchmarks, heads fitted on cached embeddings, the seed's results table.

A config names the encoders (rows of the table) and the benchmarks with their protocol. For each
encoder and benchmark manifest, the embeddings are computed once into the store of ``bony embed``
(a rerun, or another benchmark on the same tiles, reads them back); each head is then fitted on them
once per run (seed, split), reading them from the store on demand (:mod:`bonylib.evaluation.features`: memory bounded
by batches and blocks, not by the row count), and each run writes::

    <out>/runs/<benchmark>/<head>/<encoder>/m<member>-<split>-s<seed>.json   metrics, 95 % CI over test slides
                                                                            (or why none),
                                                                            learning curve, confusion matrix,
                                                                            encoder and settings
    <out>/runs/<benchmark>/<head>/<encoder>/m<member>-<split>-s<seed>.npz    the predictions behind them
                                                                            (and decoded examples)

The npz is written before the JSON, both atomically, so a run is finished exactly when its JSON exists
beside its npz and holds the current settings' hash: a rerun skips it, a changed setting (steps, split, weights)
or a deleted npz redoes it. Other outputs: ``config.yaml`` (resolved), ``embeddings/<manifest sha>/`` (the stores),
``manifests/`` (tile selections of benchmarks with ``max_tiles``), and ``results.csv`` / ``results.md``
(:mod:`bonylib.evaluation.results`).

An encoder whose weights cannot be loaded (a missing or damaged file, a config it cannot be built from) or that
cannot take its tiles (a ViT built for 224 px given ``input_size: 96``) gets a row that says why, and the others
are evaluated; ``bony evaluate`` then exits non-zero (3, or 2 when no encoder could be evaluated). A config that
names an unknown benchmark or encoder kind, or an encoder name that is not a plain folder name, stops before
anything is written.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from bonylib import __version__
from bonylib.config import option, save_config, section
from bonylib.errors import BonyError, ConfigError
from bonylib.evaluation.benchmarks import BENCHMARKS
from bonylib.evaluation.benchmarks.common import Benchmark, Head, RunOutput, bootstrap_interval
from bonylib.evaluation.benchmarks.deepgleason import DeepGleasonConfig
from bonylib.evaluation.benchmarks.heads import HEADS_VERSION
from bonylib.evaluation.benchmarks.images import ImagesConfig
from bonylib.evaluation.benchmarks.isup import IsupConfig
from bonylib.evaluation.benchmarks.panda import PandaConfig
from bonylib.evaluation.benchmarks.sicapv2 import Sicapv2Config
from bonylib.evaluation.embeddings import STORED_DTYPES, EmbedConfig, embed, open_embeddings, stored_dtype
from bonylib.evaluation.features import Features
from bonylib.evaluation.results import Row, write_results
from bonylib.files import atomic_path, ensure_writable_dir, sha256_file, sha256_json, write_text_atomic
from bonylib.models.encoders import Encoder, check_input_size
from bonylib.models.registry import encoder_from_spec, rooted_spec, spec_forms
from bonylib.runtime import resolve_device

log = logging.getLogger(__name__)

FORMAT = "bony-metrics-1"
PATH_KEYS = ("manifest", "data")
"""A benchmark section's paths (``data`` where it has one): needed to run it, and taken from ``root``."""
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
"""An encoder name becomes a folder of the output: one plain name, no separators, no leading dot."""


@dataclass
class EncoderEntry:
    """One row of the results table."""

    name: str = option("", "the row's name and its folder in the output: letters, digits, '.', '_', '-' (at most 64)")
    specs: list[str] = option([], "encoder specs as bony embed --encoder takes them; several (random init seeds) "
                              "make one row, their runs pooled")
    label: str = option("", "the row's label in the table (default: the name); several specs add '(n seeds)'")
    input_size: int | None = option(None, "feed tiles at this side instead of the encoder's own (random init at the "
                                    "trained encoder's input size)")


@dataclass
class EvaluateConfig:
    """Options of ``bony evaluate``: the encoders (rows) and the benchmarks (columns) with their protocol."""

    encoders: list[EncoderEntry] = option([], "rows: a list of {name, specs, label, input_size}; a spec is one of "
                                          + spec_forms())
    benchmarks: list[str] = option(["panda", "deepgleason", "sicapv2", "isup"],
                                   f"benchmarks to run: {', '.join(BENCHMARKS)} (default: the seed's four; images needs "
                                   f"an image folder's manifest)")
    bootstrap: int = option(1000, "bootstrap resamples of the test slides for each 95 % interval (0: none)")
    root: str = option("", "folder that relative manifest, data and encoder weight paths are read from (default: the "
                           "working directory); the benchmark chapters set it to their run folder")
    embed: EmbedConfig = section(EmbedConfig, "embedding passes; embed.device also trains the heads")
    panda: PandaConfig = section(PandaConfig, "PANDA tile classification")
    deepgleason: DeepGleasonConfig = section(DeepGleasonConfig, "DeepGleason mask decoding")
    sicapv2: Sicapv2Config = section(Sicapv2Config, "SICAPv2 reconstruction and patch classification")
    isup: IsupConfig = section(IsupConfig, "slide-level ISUP grading (attention-MIL)")
    images: ImagesConfig = section(ImagesConfig, "image classification by k-fold (an image folder's tiles)")

    def __post_init__(self) -> None:
        unknown = [b for b in self.benchmarks if b not in BENCHMARKS]
        if unknown:
            raise ConfigError(f"benchmarks: unknown benchmark {unknown[0]!r} (choose from {', '.join(BENCHMARKS)})")
        if not self.benchmarks or len(set(self.benchmarks)) != len(self.benchmarks):
            raise ConfigError("benchmarks: name at least one benchmark, each once")
        for name in self.benchmarks:
            section_cfg = getattr(self, name)
            needed = [key for key in PATH_KEYS if hasattr(section_cfg, key)]
            if not all(getattr(section_cfg, key) for key in needed):
                raise ConfigError(f"{' and '.join(f'{name}.{key}' for key in needed)} must be set to run benchmark {name}")
            if not getattr(section_cfg, "heads", ["one"]):
                raise ConfigError(f"{name}.heads: name at least one head")
        if not self.encoders:
            raise ConfigError("encoders: name at least one encoder")
        for entry in self.encoders:
            if not _NAME.match(entry.name):
                raise ConfigError(f"encoders: name {entry.name!r} is not a plain folder name (letters, digits, '.', "
                                  f"'_', '-', not starting with '.' or '-', at most 64)")
            if not entry.specs:
                raise ConfigError(f"encoders: {entry.name} has no specs")
            if entry.input_size is not None:
                check_input_size(f"encoders: {entry.name}.input_size", entry.input_size)
        names = [entry.name for entry in self.encoders]
        if len(set(names)) != len(names):
            raise ConfigError(f"encoders: name {next(n for n in names if names.count(n) > 1)!r} is used twice")
        if self.bootstrap < 0:
            raise ConfigError("bootstrap must be at least 0")


def row_label(entry: EncoderEntry) -> str:
    """The table's label of an entry: its label or name, with the number of seeds (or encoders) it pools."""
    label = entry.label or entry.name
    if len(entry.specs) == 1:
        return label
    unit = "seeds" if all(spec.startswith("random:") for spec in entry.specs) else "encoders"
    return f"{label} ({len(entry.specs)} {unit})"


NOT_EVALUATED = "not evaluated: "
"""How a row's note starts when its encoder could not be evaluated at all."""


def load_members(entry: EncoderEntry) -> tuple[list[Encoder], str]:
    """The encoders of an entry, or none and the reason: a file that is missing or unusable, or an encoder that cannot
    embed a tile at the entry's input size (a :class:`BonyError`, found with one blank tile before any embedding is
    computed) becomes the row's note; a spec that cannot be understood (:class:`ConfigError`) stops the run."""
    members = []
    for spec in entry.specs:
        try:
            encoder = encoder_from_spec(spec)
            if entry.input_size:
                encoder = dataclasses.replace(encoder, input_size=entry.input_size)
            encoder.embedding_shape("cls")
        except ConfigError:
            raise
        except BonyError as exc:
            log.warning("encoder %s: %s", entry.name, exc)
            return [], f"{NOT_EVALUATED}{exc}"
        members.append(encoder)
    return members, ""


def _finished(record: Path, settings_sha: str) -> bool:
    """Whether ``record`` is a finished run with these settings and its predictions (an unreadable record, or one
    whose npz is gone, is redone: the table is computed from the predictions)."""
    try:
        meta = json.loads(record.read_text())
    except (OSError, ValueError):
        return False
    return (isinstance(meta, dict) and meta.get("settings_sha") == settings_sha
            and record.with_suffix(".npz").is_file())


def _write_run(record: Path, result: RunOutput, meta: dict[str, Any]) -> None:
    """Predictions (npz), then the JSON that marks the run finished; text arrays are stored as unicode, not pickles."""
    arrays = {key: value.astype(str) if value.dtype == object else value
              for key, value in ((k, np.asarray(v)) for k, v in result.arrays.items())}
    with atomic_path(record.with_suffix(".npz")) as tmp, open(tmp, "wb") as handle:
        np.savez_compressed(handle, **arrays)
    write_text_atomic(record, json.dumps({**meta, "predictions": record.with_suffix(".npz").name}, indent=1) + "\n")


def rooted(cfg: EvaluateConfig) -> EvaluateConfig:
    """``cfg`` with its relative paths (benchmark manifests and data, encoder weights) taken from ``cfg.root``."""
    if not cfg.root:
        return cfg
    root = Path(cfg.root)
    sections = {name: dataclasses.replace(section_cfg, **{key: str(root / getattr(section_cfg, key))
                                                          for key in PATH_KEYS if hasattr(section_cfg, key)})
                for name, section_cfg in ((name, getattr(cfg, name)) for name in BENCHMARKS) if section_cfg.manifest}
    encoders = [dataclasses.replace(entry, specs=[rooted_spec(spec, root) for spec in entry.specs]) for entry in cfg.encoders]
    return dataclasses.replace(cfg, encoders=encoders, root="", **sections)


class Evaluation:
    """One ``bony evaluate`` call: the benchmarks built from the config, the stores, the runs."""

    def __init__(self, cfg: EvaluateConfig, out: Path) -> None:
        cfg = rooted(cfg)
        self.cfg, self.out = cfg, Path(out)
        self.device = resolve_device(cfg.embed.device)
        # a spec that cannot be understood stops here, before anything is written
        self.entries = [(entry, *load_members(entry)) for entry in cfg.encoders]
        self.benchmarks: list[Benchmark] = [BENCHMARKS[name](getattr(cfg, name), self.out / "manifests")
                                            for name in cfg.benchmarks]
        self.settings = {(bench.name, head): bench.settings(head) for bench in self.benchmarks for head in bench.heads}
        ensure_writable_dir(self.out)
        self._store_roots: dict[Path, Path] = {}
        self.fitted = self.kept = 0

    @property
    def not_evaluated(self) -> list[tuple[str, str]]:
        """(name, reason) of each encoder that could not be evaluated."""
        return [(entry.name, note.removeprefix(NOT_EVALUATED)) for entry, members, note in self.entries if not members]

    def store_root(self, manifest: Path) -> Path:
        """The folder of ``manifest``'s stores, named by its content (``bony embed`` keeps one manifest a folder)."""
        if manifest not in self._store_roots:
            self._store_roots[manifest] = self.out / "embeddings" / sha256_file(manifest)[:16]
        return self._store_roots[manifest]

    def features(self, encoder: Encoder, manifest: Path, output: str) -> Features:
        """``encoder``'s ``output`` embeddings of ``manifest`` in row order, computed into the store once and read from
        it on demand (never the whole store in memory)."""
        result = embed(manifest, encoder, self.store_root(manifest), output, self.cfg.embed)
        return Features(open_embeddings(result.store, manifest))

    def run(self) -> tuple[Path, Path]:
        """Every (encoder, benchmark, head, run) not already finished, then the results table; returns (csv, md)."""
        save_config(self.cfg, self.out / "config.yaml")
        total = sum(len(members) * len(head.runs) for _, members, _ in self.entries for bench in self.benchmarks
                    for head in bench.heads.values())
        rows = []
        with tqdm(total=total, desc="evaluating", unit="run") as progress:
            for entry, members, note in self.entries:
                row = Row(entry.name, row_label(entry), entry.specs[0].partition(":")[0], [note] if note else [])
                for index, encoder in enumerate(members):
                    for bench in self.benchmarks:
                        self._benchmark(row, index, encoder, bench, progress)
                rows.append(row)
        csv, md = write_results(self.out, rows, self.benchmarks, self.cfg.bootstrap)
        log.info("%d runs fitted, %d kept from earlier calls; results: %s, %s", self.fitted, self.kept, csv, md)
        return csv, md

    def _benchmark(self, row: Row, index: int, encoder: Encoder, bench: Benchmark, progress: tqdm) -> None:
        """The runs of one encoder (member ``index`` of ``row``) on one benchmark; embeddings only if a run is due."""
        cache: dict[str, Features] = {}
        for head in bench.heads.values():
            if head.output == "patch" and encoder.patch_size is None:
                progress.update(len(head.runs))
                skipped = f"no patch tokens: {bench.name} {head.name} not run"
                if skipped not in row.notes:
                    row.notes.append(skipped)
                continue
            for split, seed in head.runs:
                record = (self.out / "runs" / bench.name / head.name / row.name / f"m{index}-{split}-s{seed}.json")
                stored = stored_dtype(head.output, self.cfg.embed.pooled_dtype)
                settings_sha = sha256_json({"settings": self.settings[(bench.name, head.name)], "head": head.name,
                                        "split": split, "seed": seed, "fingerprint": encoder.fingerprint(head.output),
                                        "heads_version": HEADS_VERSION,
                                        # float16 rows give other numbers; the default adds no key (runs are kept)
                                        **({"stored": stored} if stored != STORED_DTYPES[head.output] else {})})
                row.records.append(record)
                if _finished(record, settings_sha):
                    self.kept += 1
                else:
                    if head.output not in cache:
                        cache[head.output] = self.features(encoder, bench.manifest, head.output)
                    self._fit(bench, head, split, seed, cache[head.output], encoder, row, index, record, settings_sha)
                    self.fitted += 1
                progress.update()

    def _fit(self, bench: Benchmark, head: Head, split: str, seed: int, features: Features, encoder: Encoder,
             row: Row, index: int, record: Path, settings_sha: str) -> None:
        """Fit one run, bootstrap its intervals over the test slides, and write its predictions and JSON."""
        start = time.perf_counter()
        result = bench.fit(head.name, split, seed, features, self.device)
        classes = bench.classes(head.name)
        arrays = {key: np.asarray(value) for key, value in result.arrays.items() if not key.startswith("example_")}
        intervals = {name: bootstrap_interval(name, [arrays], arrays["groups"], classes, self.cfg.bootstrap,
                                              bench.group_unit) for name in result.metrics}
        meta = {"format": FORMAT, "benchmark": bench.name, "title": bench.title, "head": head.name, "encoder": row.name,
                "label": row.label, "member": index, "encoder_name": encoder.name, "encoder_identity": encoder.identity,
                "fingerprint": encoder.fingerprint(head.output), "output": head.output, "split": split, "seed": seed,
                "metrics": result.metrics, "ci95": {k: [v.low, v.high] for k, v in intervals.items()},
                "ci95_missing": {k: v.reason for k, v in intervals.items() if not v.shown},
                "bootstrap": self.cfg.bootstrap, "info": result.info,
                "settings": self.settings[(bench.name, head.name)], "settings_sha": settings_sha,
                "device": str(self.device), "seconds": time.perf_counter() - start, "bony": __version__}
        _write_run(record, result, meta)
        shown = ", ".join(f"{k} {v:.4g}" for k, v in result.metrics.items() if not k.startswith("dice_"))
        log.info("%s/%s %s m%d %s seed %d: %s (%.1f s)", bench.name, head.name, row.name, index, split, seed, shown,
                 meta["seconds"])


def evaluate(cfg: EvaluateConfig, out: Path) -> tuple[Path, Path]:
    """Run ``cfg``'s encoders on its benchmarks into ``out`` (resuming what is there); returns results.csv and .md."""
    return Evaluation(cfg, out).run()
