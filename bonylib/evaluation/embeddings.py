"""``bony embed``: frozen-encoder embeddings of a tile manifest, computed once and kept on disk.

Every benchmark head, probe and plot reads embeddings instead of running the encoder again (kaiko eva's
"embed once, fit many heads"), so a new head costs no second pass over the slides. One pass of an
encoder over a manifest is written to a *store*, a folder named by the encoder's fingerprint::

    <out>/<fingerprint[:16]>/
        meta.json            encoder name, identity and fingerprint, output, row shape and dtype, manifest path and
                             SHA-256, row count, rows per chunk, the precision the rows were computed in
        chunks/000012.ids.npy  row ids of chunk 12 (manifest rows 12 * chunk_rows ... 13 * chunk_rows - 1)
        chunks/000012.npy.sha256  the SHA-256 of the embeddings file, as checkpoints have theirs
        chunks/000012.npy      their embeddings: (rows, D) float32, or (rows, N, D) float16 patch tokens

A chunk is written atomically, ids first, its checksum, and embeddings last, so a chunk is complete exactly when
its ``.npy`` and its checksum exist: a kill loses at most the chunk in progress, and a rerun computes only missing
chunks. Patch tokens are stored as float16 to bound the size (PANDA's 2.85 M tiles x 196 tokens x 768 is 860 GB even
so); a token outside float16's range is refused rather than stored as infinity. Pooled outputs are float32 unless
``embed.pooled_dtype: float16`` halves them (the seed's 2.85 M x 4096 head output: 46.7 GB in float32, 23.4 GB in
float16; heads read them as float32 either way), in a folder of its own (``<fingerprint[:16]>-float16``).

**Verified once, recorded.** A chunk's bytes are checked against its checksum, its ids against the manifest's and its
values for NaN and infinity the first time a complete store is opened (the unsharded ``bony embed`` that finishes a
store does it), and each chunk that passed is recorded in ``verified.json`` with the size and modification time of
its files and its checksum. Later opens re-check only the chunks whose files differ from the record (a stat each):
hashing PANDA's 16 GB head-output store at every ``bony evaluate`` would cost about a minute of disk reading before
any head starts. What the record cannot see is a change that keeps a file's size within one tick of the filesystem's
clock; delete ``verified.json`` to have every chunk checked again.

**Read on demand** (:class:`StoredRows`). ``bony evaluate`` never holds a store in memory: heads gather the rows of
each batch, and passes over many rows (statistics, k-NN, predictions) read them in blocks. The format stays the
chunked ``.npy`` files: each chunk's header is read once for the offset of its data, and rows are read with
positioned reads (``os.preadv``) straight into the batch's buffer, a contiguous run of rows in one call. Two
alternatives were weighed. Memory-mapping each chunk (``np.load(mmap_mode="r")``) reads the same bytes, but every
page a process touches through a map counts in its resident set until the map is dropped: one pass over a 16 GB store
shows as 16 GB of RSS, which is what SLURM's memory accounting and OOM kills read, although the kernel could reclaim
it. zarr would add a dependency and a second on-disk format for what a header offset and a read already give: the
chunks are written once and never resized, and compression buys little on float embeddings.

Several runs may write one store at once (the tasks of an array, a rerun started beside one still running): a
chunk is written under the store's lock (``.lock``), and skipped if another run finished it meanwhile; the
temporary files of killed runs are removed under the same lock, so no run removes the file another is writing.

A store holds one encoder (fingerprint: weights, output, input size, normalisation) over one manifest
(its SHA-256): a run that finds other meta in the folder stops with an error naming both, so embeddings
of two encoders or two versions of a manifest are never mixed. ``--shard i/n`` computes chunks
i, i+n, ... (a SLURM array task each); the unsharded run computes what is left and checks that every
chunk is there and fits; :func:`open_embeddings` opens the store for reading in manifest order, and
:func:`load_embeddings` reads all of it into memory (for the small stores of curation and tests).

Chunks are keyed by the manifest's row ids (:func:`bonylib.data.manifest.read_manifest`, which refuses a
manifest whose rows could name files outside it or repeat a tile) before anything is computed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from bonylib import __version__
from bonylib.config import option
from bonylib.data.datasets import TileDataset, read_batches
from bonylib.data.manifest import read_manifest
from bonylib.errors import BonyError, ConfigError, one_line
from bonylib.models.encoders import OUTPUTS, Encoder
from bonylib.files import atomic_path, ensure_writable_dir, locked, read_json, sha256_file, write_text_atomic
from bonylib.memory import check_fits
from bonylib.runtime import PRECISIONS, busy_cpus, plan_threads, resolve_device, resolve_precision

log = logging.getLogger(__name__)

FORMAT = "bony-embeddings-1"
STORED_DTYPES = {"cls": "float32", "cls+mean": "float32", "patch": "float16"}
"""dtype of each output on disk by default: pooled features float32; patch tokens, N times larger, float16."""
POOLED_DTYPES = ("float32", "float16")
"""What ``pooled_dtype`` may choose for pooled outputs (patch tokens are always float16)."""
META_KEYS = ("encoder", "fingerprint", "output", "row_shape", "dtype", "rows", "chunk_rows", "manifest", "precision",
             "precision_reason")
"""What the code reads from a store's meta.json (besides its format)."""
CHECKSUM_SUFFIX = ".sha256"
LOCK = ".lock"
VERIFIED = "verified.json"
"""The record of chunks checked whole (checksum, ids, values) and the stat of their files when they were."""


@dataclass
class EmbedConfig:
    """How ``bony embed`` runs (what it computes is set by MANIFEST, --encoder and --output)."""

    batch_size: int = option(64, "tiles per forward pass")
    device: str = option("auto", "auto (the first GPU if there is one, else the CPU), cpu, cuda or cuda:N")
    precision: str = option("auto", "autocast precision: auto (bf16 where the GPU or CPU computes it natively and, "
                            "on a CPU, measures faster), bf16, fp16 (GPU only) or fp32; a store keeps one precision")
    workers: Union[int, str] = option("auto", "DataLoader worker processes reading tiles: auto (from the CPUs this "
                                      "process may use) or a number (0: read in the main process)")
    chunk_rows: int = option(1024, "rows per chunk file: what a kill can lose; fixed when the store is created")
    pooled_dtype: str = option("float32", "dtype of pooled outputs (cls, cls+mean) on disk: float32, or float16 (half "
                               "the disk and page cache; heads compute in float32); a store of its own")

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.chunk_rows < 1:
            raise ConfigError("batch_size and chunk_rows must be at least 1")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got '{self.precision}'")
        if self.workers != "auto" and not (isinstance(self.workers, int) and self.workers >= 0):
            raise ConfigError(f"workers must be auto or a number >= 0, got '{self.workers}'")
        if self.pooled_dtype not in POOLED_DTYPES:
            raise ConfigError(f"pooled_dtype must be one of {', '.join(POOLED_DTYPES)}, got '{self.pooled_dtype}'")


# ---- batched inference (the one code path of the store and the k-NN monitor) -----------------


def _batches(encoder: Encoder, tiles: pd.DataFrame, root: Path | None, rows: Sequence[list[int]], output: str,
             workers: int, progress: tqdm | None = None) -> Iterator[torch.Tensor]:
    """Embeddings (float32, on the CPU) of each batch of row positions of ``tiles``, in order.

    Tiles are read at the encoder's input size (shards when the manifest has them, else the slides) and
    normalised by its own transform; ``encoder.embed`` runs under ``inference_mode`` in the encoder's
    precision on the device its weights are on.
    """
    if not rows:
        return  # starting worker processes for nothing costs seconds
    device = encoder.device
    dataset = TileDataset(tiles, root=root, tile_px=encoder.input_size, transform=encoder.transform)
    loader = DataLoader(dataset, batch_sampler=rows, num_workers=workers, pin_memory=device.type == "cuda")
    for images, _ in read_batches(loader):
        yield encoder.embed(images.to(device, non_blocking=True), output).cpu()
        if progress is not None:
            progress.update(len(images))


def embed_tiles(encoder: Encoder, tiles: pd.DataFrame, root: Path | None = None, output: str = "cls",
                batch_size: int = 64, workers: int = 0) -> torch.Tensor:
    """Embeddings of ``tiles`` (manifest rows) in order, in memory: (rows, D), or (rows, N, D) for ``patch``.

    For features that are used once, such as the trainer's k-NN monitor, whose weights change every
    epoch: the same reading, batching and precision as the store, nothing written. ``root`` is the folder
    the manifest's shard paths are relative to. ``workers`` defaults to 0 because in the trainer worker
    processes would receive SLURM's SIGTERM and die mid-evaluation, which its stop handling cannot catch.
    """
    if tiles.empty:
        raise BonyError("no tiles to embed")
    rows = len(tiles)
    batches = [list(range(start, min(start + batch_size, rows))) for start in range(0, rows, batch_size)]
    return torch.cat(list(_batches(encoder, tiles.reset_index(drop=True), root, batches, output, workers)))


# ---- the store -------------------------------------------------------------------------------


@dataclass(frozen=True)
class EmbedResult:
    """What one ``bony embed`` call did: chunks it computed, chunks it found complete, and chunks of other
    shards still missing (0 after an unsharded call, which computes them)."""

    store: Path
    computed: int
    skipped: int
    missing: int


def stored_dtype(output: str, pooled_dtype: str = "float32") -> str:
    """The dtype ``output`` is stored in: patch tokens float16, pooled outputs ``pooled_dtype``."""
    return STORED_DTYPES[output] if output == "patch" else pooled_dtype


def store_path(out: Path, encoder: Encoder, output: str = "cls", dtype: str | None = None) -> Path:
    """The store folder of ``encoder``'s ``output`` under ``out``; a dtype other than the output's default
    (``float16`` pooled outputs) gets a folder of its own, so the two never meet in one store."""
    name = encoder.fingerprint(output)[:16]
    return Path(out) / (name if dtype in (None, STORED_DTYPES[output]) else f"{name}-{dtype}")


def _chunk_paths(store: Path, chunk: int) -> tuple[Path, Path]:
    """(ids, embeddings) files of chunk ``chunk``."""
    return store / "chunks" / f"{chunk:06d}.ids.npy", store / "chunks" / f"{chunk:06d}.npy"


def _checksum_path(values_path: Path) -> Path:
    return values_path.with_name(values_path.name + CHECKSUM_SUFFIX)


def _complete(store: Path, chunk: int) -> bool:
    """Whether chunk ``chunk`` was written whole: its embeddings and their checksum are there (a chunk of a store
    written before chunks had checksums counts as missing, and is computed again)."""
    values_path = _chunk_paths(store, chunk)[1]
    return values_path.is_file() and _checksum_path(values_path).is_file()


def _chunk_rows(meta: dict[str, Any], chunk: int) -> range:
    start = chunk * meta["chunk_rows"]
    return range(start, min(start + meta["chunk_rows"], meta["rows"]))


def _chunk_count(meta: dict[str, Any]) -> int:
    return math.ceil(meta["rows"] / meta["chunk_rows"])


def _whole(value: Any, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _meta_problem(meta: dict[str, Any]) -> str:
    """What is wrong with the values of a store's meta.json that the store's code computes with, or ""."""
    if not all(isinstance(meta[key], str) for key in ("encoder", "fingerprint", "precision", "precision_reason")):
        return "encoder, fingerprint and precision are not text"
    if meta["output"] not in OUTPUTS or meta["dtype"] not in (
            (STORED_DTYPES["patch"],) if meta["output"] == "patch" else POOLED_DTYPES):
        return (f"output {meta['output']!r} stored as {meta['dtype']!r} is not one of {STORED_DTYPES} (pooled outputs "
                f"may be {' or '.join(POOLED_DTYPES)})")
    if not _whole(meta["rows"], 1) or not _whole(meta["chunk_rows"], 1):
        return f"rows {meta['rows']!r} and chunk_rows {meta['chunk_rows']!r} are not whole numbers >= 1"
    shape = meta["row_shape"]
    if not isinstance(shape, list) or len(shape) != (2 if meta["output"] == "patch" else 1) \
            or not all(_whole(n, 1) for n in shape):
        return f"row_shape {shape!r} is not the shape of one {meta['output']} embedding"
    manifest = meta["manifest"]
    if not isinstance(manifest, dict) or not isinstance(manifest.get("sha256"), str) \
            or not isinstance(manifest.get("path"), str):
        return "manifest is not {path, sha256}"
    return ""


def _read_meta(store: Path) -> dict[str, Any]:
    """A store's checked meta.json: its format, the keys the code reads, and their types and ranges."""
    path = store / "meta.json"
    if not path.is_file():
        raise BonyError(f"{store}: not an embedding store (no meta.json); run bony embed first")
    meta = read_json(path)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise BonyError(f"{path}: not a {FORMAT} store")
    missing = [key for key in META_KEYS if key not in meta]
    problem = f"no {', '.join(missing)}" if missing else _meta_problem(meta)
    if problem:
        raise BonyError(f"{path}: incomplete or damaged store metadata ({problem}); delete the folder to recompute")
    return meta


def _check_meta(store: Path, found: dict[str, Any], wanted: dict[str, Any]) -> None:
    """Refuse to add to a store of another encoder, another manifest or another chunk size."""
    if found["fingerprint"] != wanted["fingerprint"]:
        raise BonyError(f"{store}: holds embeddings of encoder {found['encoder']!r} (output {found['output']}, fingerprint "
                        f"{found['fingerprint'][:16]}), not of {wanted['encoder']!r} (output {wanted['output']}, fingerprint "
                        f"{wanted['fingerprint'][:16]}); embeddings of two encoders are never mixed: use another --out, "
                        f"or delete the folder to recompute")
    if found["manifest"]["sha256"] != wanted["manifest"]["sha256"]:
        raise BonyError(f"{store}: was computed from manifest {found['manifest']['path']} (sha256 "
                        f"{found['manifest']['sha256'][:12]}, {found['rows']} rows), but {wanted['manifest']['path']} "
                        f"has sha256 {wanted['manifest']['sha256'][:12]} ({wanted['rows']} rows): the manifest changed; "
                        f"use another --out, or delete the folder to recompute")
    if found["dtype"] != wanted["dtype"]:
        raise BonyError(f"{store}: holds {found['dtype']} rows, not {wanted['dtype']}; rerun with "
                        f"pooled_dtype={found['dtype']}, or delete the folder to recompute")
    if found["chunk_rows"] != wanted["chunk_rows"]:
        raise BonyError(f"{store}: was written in chunks of {found['chunk_rows']} rows, not {wanted['chunk_rows']}; "
                        f"rerun with chunk_rows={found['chunk_rows']}")


def _open_store(store: Path, wanted: dict[str, Any]) -> dict[str, Any]:
    """The store's meta, created from ``wanted`` if the folder is new, else checked against it.

    Array tasks may start together: each reads the meta back after writing it, so a task whose meta
    lost the race is checked against the winner's like any later run.
    """
    ensure_writable_dir(store / "chunks")
    if not (store / "meta.json").is_file():
        write_text_atomic(store / "meta.json", json.dumps(wanted, indent=2) + "\n")
    found = _read_meta(store)
    _check_meta(store, found, wanted)
    return found


def _remove_stale_temporaries(store: Path) -> None:
    """Delete the half-written chunk files that killed runs left. Under the store's lock: a run holds it for as long
    as its temporaries exist (:func:`_write_chunk`), so every temporary seen while holding it is a dead run's. Where
    the filesystem refuses locks nothing is deleted (the files are hidden and ignored; delete them once no run is
    writing)."""
    with locked(store / LOCK) as held:
        if not held:
            log.warning("%s: the filesystem refuses file locks: left-over temporary files are not removed", store)
            return
        # temporary names are ".<name>.<8 random characters>.tmp<suffix>" (files.atomic_path)
        for path in (store / "chunks").glob(".[0-9]*.tmp.*"):
            log.info("removing %s, left by an interrupted run", path)
            path.unlink(missing_ok=True)


def _write_chunk(store: Path, meta: dict[str, Any], chunk: int, ids: np.ndarray, embeddings: torch.Tensor) -> None:
    """Write one chunk: its ids, its checksum, then its embeddings in the store's dtype (with the checksum, what marks
    it complete), all under the store's lock; a chunk another run completed meanwhile is left as it is."""
    rows = _chunk_rows(meta, chunk)
    with np.errstate(over="ignore"):  # an overflow is reported below, with the rows
        values = embeddings.numpy().astype(meta["dtype"])
    if not np.isfinite(values).all():
        raise BonyError(f"{store}: rows {rows.start}-{rows.stop - 1} embed to values that are not finite in "
                        f"{meta['dtype']} (NaN weights, or patch tokens beyond float16's 65504); nothing written for them")
    ids_path, values_path = _chunk_paths(store, chunk)
    with locked(store / LOCK):
        if _complete(store, chunk):
            return
        with atomic_path(ids_path) as tmp, open(tmp, "wb") as handle:
            np.save(handle, ids[rows.start : rows.stop], allow_pickle=False)
        with atomic_path(values_path) as tmp:
            with open(tmp, "wb") as handle:
                np.save(handle, values, allow_pickle=False)
            write_text_atomic(_checksum_path(values_path), sha256_file(tmp) + "\n")


def _check_chunk(store: Path, meta: dict[str, Any], chunk: int, ids: np.ndarray) -> None:
    """Check chunk ``chunk`` whole: its bytes against its checksum, its ids against the manifest's, its shape, dtype
    and layout against the meta and its values for NaN and infinity; a damaged, edited or foreign chunk raises
    :class:`BonyError` naming the file. The values are read through a map dropped on return, so checking a store
    holds one chunk resident at a time."""
    rows = _chunk_rows(meta, chunk)
    ids_path, values_path = _chunk_paths(store, chunk)
    again = "delete it and rerun bony embed to recompute it"
    try:
        expected = _checksum_path(values_path).read_text().strip()
        if sha256_file(values_path) != expected:
            raise BonyError(f"{values_path}: its bytes do not match {_checksum_path(values_path).name} (damaged or "
                            f"changed after it was written); {again}")
        stored_ids = np.load(ids_path, allow_pickle=False)
        values = np.load(values_path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise BonyError(f"{values_path}: unreadable chunk ({one_line(exc, 200)}); {again}") from None
    expected_shape = (len(rows), *meta["row_shape"])
    if values.shape != expected_shape or values.dtype != np.dtype(meta["dtype"]) or not values.flags.c_contiguous:
        raise BonyError(f"{values_path}: shape {values.shape} {values.dtype}, expected {expected_shape} {meta['dtype']}; "
                        f"{again}")
    if stored_ids.shape != (len(rows),) or not np.array_equal(stored_ids, ids[rows.start : rows.stop]):
        raise BonyError(f"{ids_path}: row ids differ from manifest rows {rows.start}-{rows.stop - 1}; delete the chunk "
                        f"and rerun bony embed to recompute it")
    finite = np.isfinite(values).reshape(len(rows), -1).all(axis=1)
    if not finite.all():
        row = rows.start + int(np.argmin(finite))
        raise BonyError(f"{values_path}: manifest row {row} has values that are not finite (NaN or infinity); {again}")


def _stamp(store: Path, chunk: int) -> list[Any]:
    """What the verification record keeps of a chunk: its files' sizes and modification times, and its checksum."""
    ids_path, values_path = _chunk_paths(store, chunk)
    ids_stat, values_stat = ids_path.stat(), values_path.stat()
    return [ids_stat.st_size, ids_stat.st_mtime_ns, values_stat.st_size, values_stat.st_mtime_ns,
            _checksum_path(values_path).read_text().strip()]


def _read_record(store: Path) -> dict[str, Any]:
    """The store's verification record; a missing or damaged one is empty (every chunk is checked again)."""
    try:
        record = json.loads((store / VERIFIED).read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return {}
    return record if isinstance(record, dict) else {}


def _verify(store: Path, meta: dict[str, Any], ids: np.ndarray) -> int:
    """Check every chunk the record does not vouch for (:func:`_check_chunk`) and record those that pass; returns how
    many were checked. A chunk that fails raises before anything about it is recorded."""
    record = _read_record(store)
    checked: dict[str, list[Any]] = {}
    for chunk in range(_chunk_count(meta)):
        name = _chunk_paths(store, chunk)[1].name
        try:
            stamp = _stamp(store, chunk)
        except (OSError, UnicodeDecodeError):
            stamp = None  # _check_chunk names what is wrong
        if stamp is None or record.get(name) != stamp:
            _check_chunk(store, meta, chunk, ids)
            checked[name] = _stamp(store, chunk)
    if checked:
        with locked(store / LOCK):  # another reader may be recording its own checks: keep them
            write_text_atomic(store / VERIFIED, json.dumps({**_read_record(store), **checked}, indent=0) + "\n")
    return len(checked)


def _missing_chunks(store: Path, meta: dict[str, Any]) -> list[int]:
    return [c for c in range(_chunk_count(meta)) if not _complete(store, c)]


def _chunk_batches(meta: dict[str, Any], chunks: Sequence[int], batch_size: int) -> tuple[list[list[int]], list[int | None]]:
    """Batches of manifest rows covering ``chunks``, none straddling two chunks (so a chunk's rows are computed in
    the same batches whether or not a run was interrupted), and for each batch the chunk it completes, if any."""
    batches: list[list[int]] = []
    ends: list[int | None] = []
    for chunk in chunks:
        rows = _chunk_rows(meta, chunk)
        for start in range(rows.start, rows.stop, batch_size):
            batches.append(list(range(start, min(start + batch_size, rows.stop))))
            ends.append(chunk if start + batch_size >= rows.stop else None)
    return batches, ends


def embed(manifest: Path, encoder: Encoder, out: Path, output: str = "cls", cfg: EmbedConfig | None = None,
          shard: tuple[int, int] = (0, 1)) -> EmbedResult:
    """Embed every tile of ``manifest`` (this shard's chunks) into ``store_path(out, encoder, output)``.

    Resumes: chunks already on disk are kept. With ``shard=(i, n)``, n > 1, only chunks i, i+n, ... are
    computed; a run without shard computes whatever is left and checks every chunk (ids, shape, dtype),
    which is the assembling step after an array job. The encoder's network is moved to ``cfg.device``; the
    precision is resolved for that device (``cfg.precision``) and recorded in the meta, and a run that would add
    rows in another precision stops.
    """
    cfg = cfg or EmbedConfig()
    index, count = shard
    if not 0 <= index < count:
        raise BonyError(f"--shard {index}/{count}: need 0 <= i < n")
    manifest = Path(manifest).resolve()
    frame, ids = read_manifest(manifest)
    if frame.empty:
        raise BonyError(f"{manifest}: the manifest has no tiles")
    device = resolve_device(cfg.device)
    encoder = dataclasses.replace(encoder, precision=resolve_precision(cfg.precision, device)).to(device)
    on_cpu = device.type == "cpu"
    threads = plan_threads(cfg.workers, gpu=not on_cpu, busy=busy_cpus() if on_cpu else 0.0)
    threads.apply()
    log.info("%d torch threads (%s) and %d data workers on %d usable CPUs", threads.torch_threads, threads.reason,
             threads.workers, threads.cpus)
    dtype = stored_dtype(output, cfg.pooled_dtype)
    store = store_path(out, encoder, output, dtype)
    wanted = {
        "format": FORMAT, "encoder": encoder.name, "fingerprint": encoder.fingerprint(output),
        "identity": encoder.identity, "output": output, "row_shape": list(encoder.embedding_shape(output)),
        "dtype": dtype, "rows": len(ids), "chunk_rows": cfg.chunk_rows,
        "manifest": {"path": str(manifest), "sha256": sha256_file(manifest)},
        "precision": encoder.precision.name, "precision_reason": encoder.precision.reason, "bony": __version__,
    }
    meta = _open_store(store, wanted)
    mine = range(index, _chunk_count(meta), count)
    pending = [c for c in mine if not _complete(store, c)]
    if pending and meta["precision"] != encoder.precision.name:
        raise BonyError(f"{store}: its rows were computed in {meta['precision']} ({meta['precision_reason']}); this run "
                        f"resolves {encoder.precision.name} ({encoder.precision.reason}): run it on the same kind of "
                        f"device or with precision={meta['precision']}")
    log.info("%s: %d chunks of %d rows for shard %d/%d, %d already done, %d to compute on %s in %s with %d workers",
             store, len(mine), meta["chunk_rows"], index, count, len(mine) - len(pending), len(pending), device,
             encoder.precision.name, threads.workers)
    _remove_stale_temporaries(store)
    batches, ends = _chunk_batches(meta, pending, cfg.batch_size)
    parts: list[torch.Tensor] = []
    with tqdm(total=sum(len(b) for b in batches), desc="embedding", unit="tile") as progress:
        batched = _batches(encoder, frame, manifest.parent, batches, output, threads.workers, progress)
        for values, chunk in zip(batched, ends):
            parts.append(values)
            if chunk is not None:
                _write_chunk(store, meta, chunk, ids, torch.cat(parts))
                parts = []
    if count == 1:
        _verify(store, meta, ids)
    missing = len(_missing_chunks(store, meta))
    log.info("%s: %d chunks computed, %d kept, %d of other shards missing", store, len(pending),
             len(mine) - len(pending), missing)
    return EmbedResult(store, len(pending), len(mine) - len(pending), missing)


class StoredRows:
    """The rows of a complete, verified store, read on demand in manifest order (see the module docstring).

    ``read(positions)`` returns those rows, in the order asked, in the stored dtype; positions are grouped by chunk
    and each run of consecutive rows is one positioned read into the result, so a block of rows costs one system call
    per chunk it spans and a shuffled batch one per row. At most :attr:`OPEN_FILES` chunk files are kept open.
    """

    OPEN_FILES = 64

    def __init__(self, store: Path, meta: dict[str, Any], ids: np.ndarray) -> None:
        self.store, self.meta, self.ids = store, meta, ids
        self.shape: tuple[int, ...] = (meta["rows"], *meta["row_shape"])
        self.dtype = np.dtype(meta["dtype"])
        self._row_bytes = math.prod(meta["row_shape"]) * self.dtype.itemsize
        self._files: OrderedDict[int, tuple[int, int]] = OrderedDict()  # chunk -> (descriptor, data offset)

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def nbytes(self) -> int:
        """Bytes of all rows in the stored dtype."""
        return len(self) * self._row_bytes

    def _open(self, chunk: int) -> tuple[int, int]:
        """(descriptor, offset of the data) of chunk ``chunk``'s file, its header checked again (cheap, and the
        offset must come from it)."""
        if chunk in self._files:
            self._files.move_to_end(chunk)
            return self._files[chunk]
        path = _chunk_paths(self.store, chunk)[1]
        expected = (len(_chunk_rows(self.meta, chunk)), *self.meta["row_shape"])
        try:
            with open(path, "rb") as handle:
                version = np.lib.format.read_magic(handle)
                shape, fortran, dtype = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                                         else np.lib.format.read_array_header_2_0)(handle)
                offset = handle.tell()
            if shape != expected or fortran or dtype != self.dtype or path.stat().st_size != offset + math.prod(shape) * dtype.itemsize:
                raise ValueError(f"holds {shape} {dtype}, expected {expected} {self.dtype} in C order")
            descriptor = os.open(path, os.O_RDONLY)
        except (OSError, ValueError) as exc:
            raise BonyError(f"{path}: unreadable chunk ({one_line(exc, 200)}); delete it and rerun bony embed") from None
        if len(self._files) >= self.OPEN_FILES:
            os.close(self._files.popitem(last=False)[1][0])
        self._files[chunk] = (descriptor, offset)
        return descriptor, offset

    def read(self, positions: np.ndarray | Sequence[int]) -> np.ndarray:
        """Rows ``positions`` (manifest row numbers; repeats allowed) as (n, *row_shape), stored dtype."""
        positions = np.asarray(positions, dtype=np.int64).reshape(-1)
        if not len(positions):
            return np.empty((0, *self.shape[1:]), dtype=self.dtype)
        if positions.min() < 0 or positions.max() >= len(self):
            raise IndexError(f"row positions must be in 0..{len(self) - 1}")
        order = np.argsort(positions, kind="stable")
        ordered = positions[order]
        out = np.empty((len(positions), *self.shape[1:]), dtype=self.dtype)
        raw = out.reshape(len(positions), -1).view(np.uint8)
        chunk_of = ordered // self.meta["chunk_rows"]
        breaks = np.flatnonzero((np.diff(ordered) != 1) | (np.diff(chunk_of) != 0)) + 1
        for start, stop in zip(np.r_[0, breaks].tolist(), np.r_[breaks, len(ordered)].tolist()):
            chunk = int(chunk_of[start])
            descriptor, offset = self._open(chunk)
            first = int(ordered[start]) - chunk * self.meta["chunk_rows"]
            target = memoryview(raw[start:stop]).cast("B")
            if os.preadv(descriptor, [target], offset + first * self._row_bytes) != len(target):
                raise BonyError(f"{_chunk_paths(self.store, chunk)[1]}: shorter than its header says; delete it and "
                                f"rerun bony embed")
        if np.all(order[:-1] < order[1:]):
            return out
        unsorted = np.empty_like(out)
        unsorted[order] = out
        return unsorted

    def close(self) -> None:
        """Close the chunk files kept open."""
        while self._files:
            os.close(self._files.popitem()[1][0])

    def __del__(self) -> None:
        self.close()


def open_embeddings(store: Path, manifest: Path | None = None) -> StoredRows:
    """A complete store opened for reading in manifest order (:class:`StoredRows`).

    Checks before it returns: the manifest (the one the store names, or ``manifest`` when it was moved) still has
    the SHA-256 the store was computed from, every chunk is there, and each chunk not yet verified passes
    :func:`_check_chunk` (then it is recorded). Any difference raises :class:`BonyError` naming the store or file.
    """
    store = Path(store)
    meta = _read_meta(store)
    manifest = Path(manifest or meta["manifest"]["path"])
    if not manifest.is_file():
        raise BonyError(f"{store}: its manifest {manifest} is not there; pass the manifest's new path")
    if sha256_file(manifest) != meta["manifest"]["sha256"]:
        raise BonyError(f"{store}: {manifest} changed since these embeddings were computed (sha256 differs); "
                        f"rerun bony embed into another --out")
    _, ids = read_manifest(manifest)
    if len(ids) != meta["rows"]:
        raise BonyError(f"{store}: holds {meta['rows']} rows, its manifest {manifest} {len(ids)}")
    missing = _missing_chunks(store, meta)
    if missing:
        raise BonyError(f"{store}: {len(missing)} of {_chunk_count(meta)} chunks missing (first: {missing[0]}); "
                        f"run bony embed without --shard to compute them")
    checked = _verify(store, meta, ids)
    if checked:
        log.info("%s: %d of %d chunks verified (checksum, ids, finite values) and recorded", store, checked,
                 _chunk_count(meta))
    return StoredRows(store, meta, ids)


def load_embeddings(store: Path, manifest: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, embeddings)`` of a complete store, in manifest order, in memory: (rows,) ids and (rows, D) in the
    stored dtype or (rows, N, D) float16 patch tokens; checked as :func:`open_embeddings` checks. For stores that fit
    in memory (curation, tests); ``bony evaluate`` reads rows on demand instead."""
    rows = open_embeddings(store, manifest)
    check_fits(rows.nbytes, f"{store}: {len(rows)} embeddings of shape {rows.shape[1:]}")
    try:
        return rows.ids, rows.read(np.arange(len(rows)))
    finally:
        rows.close()


def write_store(out: Path, manifest: Path, name: str, fingerprint: str, blocks: Iterable[np.ndarray],
                output: str = "cls", chunk_rows: int = 1024) -> Path:
    """A store of rows computed elsewhere, under ``out/<fingerprint[:16]>`` (or its dtype's folder), as ``bony embed``
    writes its own: ``blocks`` are consecutive row blocks of ``manifest`` in its order, in the dtype to store
    (float32 or float16; float16 patch tokens). For benchmarks and tests that need stores of a given size and
    structure without an encoder (``benchmarks/bench_scale.py``); resumes like :func:`embed` (chunks on disk are
    kept, but ``blocks`` are read through)."""
    manifest = Path(manifest).resolve()
    _, ids = read_manifest(manifest)
    rows_done, parts, chunk = 0, [], 0
    meta: dict[str, Any] | None = None
    store = Path(out)
    for block in blocks:
        if meta is None:
            dtype = str(block.dtype)
            store = Path(out) / (fingerprint[:16] if dtype == STORED_DTYPES[output] else f"{fingerprint[:16]}-{dtype}")
            meta = _open_store(store, {
                "format": FORMAT, "encoder": name, "fingerprint": fingerprint, "identity": {"kind": "written"},
                "output": output, "row_shape": list(block.shape[1:]), "dtype": dtype, "rows": len(ids),
                "chunk_rows": chunk_rows, "manifest": {"path": str(manifest), "sha256": sha256_file(manifest)},
                "precision": "fp32", "precision_reason": "written by write_store", "bony": __version__})
            _remove_stale_temporaries(store)
        parts.append(np.asarray(block))
        rows_done += len(block)
        while rows_done >= min((chunk + 1) * chunk_rows, len(ids)) and chunk < _chunk_count(meta):
            values = np.concatenate(parts)
            size = len(_chunk_rows(meta, chunk))
            if not _complete(store, chunk):
                _write_chunk(store, meta, chunk, ids, torch.from_numpy(np.ascontiguousarray(values[:size])))
            parts, chunk = [values[size:]], chunk + 1
    if meta is None or rows_done != len(ids):
        raise BonyError(f"{manifest}: {len(ids)} rows, but {rows_done} were given to store")
    return store
