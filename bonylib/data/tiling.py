"""``bony tile``: cut slides into tiles, keep the tissue, label them from masks, write the manifest.

Per slide: find tissue on a low-resolution level, read only the grid tiles that touch tissue
(in blocks, so each JPEG tile of the file is decoded about once, and only the file tiles under
those grid tiles), measure each tile's quality, label kept tiles from the mask's code channel
read at the same level and place (counted per block), and write the slide's rows to
``parts/<slide_id>.parquet`` in one atomic step. A slide is done when its part exists: a rerun
(after a crash, ``kill -9`` or pre-emption) tiles only the others, and the manifest is assembled
from the parts, so it is the same as an uninterrupted run's. A slide that fails is recorded in
``failures.csv`` with its error and the run goes on.

Output folder::

    config.yaml        resolved config, format and inputs (a rerun must match it)
    parts/<id>.parquet every measured tile of one slide (kept or not, with the reason)
    shards/<id>.tar    kept tiles as JPEG (with ``shards=true``), byte ranges in the manifest
    manifest.parquet   kept tiles of all slides (the DESIGN.md contract)
    slides.parquet     one row per tiled slide: level, tile size, counts, time
    failures.csv       slide_id, path, error of the slides that failed in the last run
"""

from __future__ import annotations

import contextlib
import glob
import io
import json
import logging
import math
import tarfile
import time
import traceback
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from PIL import Image
from tqdm import tqdm

from bonylib.config import check_fractions, option, section, to_dict
from bonylib.data.labels import FRACTION_COLUMNS, POLICIES, tile_labels
from bonylib.data.mask_fractions import grid_class_fractions
from bonylib.data.quality import MEASURES, QualityConfig, TissueConfig, grid_measures, keep_tiles, tissue_mask
from bonylib.data.slides import Slide, SlideError, open_slide
from bonylib.data.sources import SlideJob, list_jobs
from bonylib.errors import BonyError, ConfigError
from bonylib.files import DiskFullError, atomic_path, ensure_writable_dir, reporting_full_disk, write_text_atomic

log = logging.getLogger(__name__)

IMAGE_POLICY = "image"
"""``label_policy`` of tiles labelled with their image's class from the dataset's table (a SICAPv2 patch without a
mask: its partition-spreadsheet class), not from a mask under the configured policy."""
NOMINAL_MPP = 0.5
"""Assumed level-0 µm/px for tissue detection on a slide read by level without resolution metadata."""


@dataclass
class TileConfig:
    """Options of ``bony tile``."""

    tile_px: int = option(224, "tile side in pixels at the target resolution (the encoder's input size)")
    mpp: float | None = option(
        0.5, "target µm per pixel: the coarsest level within mpp_tolerance of it is read as is; if none, the next "
        "finer level is read with a proportionally larger tile (resized when loaded). null: read `level`")
    level: int | None = option(None, "read this pyramid level with tiles of tile_px pixels, whatever its resolution")
    mpp_tolerance: float = option(0.1, "relative difference |level µm/px - mpp| / mpp accepted as equal (PANDA's 0.45-0.49 is 0.5)")
    slide_mpp: float | None = option(None, "level-0 µm per pixel for files without resolution metadata (plain images; "
                                     "--format imagefolder needs it: 40x scans are about 0.25, 20x 0.5, 10x 1.0)")
    min_tissue: float = option(0.1, "a grid tile is read only if the low-resolution tissue mask covers this fraction of it")
    label_policy: str = option("max", "tile label from its mask: max (highest class present, the seed's), majority, "
                               "or min_fraction (highest cancer class covering min_fraction of the tile's tissue)")
    min_fraction: float = option(0.05, "tissue fraction a cancer class needs under label_policy=min_fraction")
    missing_mask: str = option("fail", "a PANDA or DeepGleason slide whose mask file is missing: fail (recorded as a "
                               "failure) or unlabelled (tiled with an empty label_name); a SICAPv2 patch without a mask "
                               "takes its class in the partition spreadsheets (label_policy 'image')")
    shards: bool = option(False, "also write kept tiles as JPEG into one tar shard per slide, for fast training reads")
    shard_quality: int = option(95, "JPEG quality of the tiles in shards")
    workers: int = option(1, "processes tiling slides in parallel")
    block_tiles: int = option(4, "tiles per side of a block read at once: memory per worker ~ 3*(block_tiles*tile)^2 bytes. "
                              "4 (2.4 MB of 224-px RGB) stays in a core's cache from decode to measures: 8 tiled bench_tiling's "
                              "4 slides 3% slower with one worker and 10% with two")
    tissue: TissueConfig = section(TissueConfig, "tissue detection on a low-resolution level")
    quality: QualityConfig = section(QualityConfig, "per-tile quality thresholds; measures are saved in the manifest")

    def __post_init__(self) -> None:
        if self.tile_px < 16:
            raise ConfigError(f"tile_px must be at least 16, got {self.tile_px}")
        if self.mpp is None and self.level is None:
            raise ConfigError("set mpp (target µm per pixel) or level")
        if self.mpp is not None and self.level is not None:
            raise ConfigError("set mpp or level, not both (mpp=null level=0 reads level 0)")
        if self.mpp is not None and self.mpp <= 0 or self.slide_mpp is not None and self.slide_mpp <= 0:
            raise ConfigError("mpp and slide_mpp must be positive")
        if self.label_policy not in POLICIES:
            raise ConfigError(f"label_policy must be one of {', '.join(POLICIES)}, got '{self.label_policy}'")
        if self.missing_mask not in ("fail", "unlabelled"):
            raise ConfigError(f"missing_mask must be fail or unlabelled, got '{self.missing_mask}'")
        if self.workers < 1 or self.block_tiles < 1:
            raise ConfigError("workers and block_tiles must be at least 1")
        check_fractions("tile", self, ("min_tissue", "min_fraction", "mpp_tolerance"))


@dataclass(frozen=True)
class Plan:
    """How a slide is read: the level, the tile side there, and the resulting µm per pixel of a tile."""

    level: int
    size: int
    tile_mpp: float | None


def plan_reading(slide: Slide, cfg: TileConfig) -> Plan:
    """Choose the level and the tile side at that level for ``cfg``'s target resolution."""
    if cfg.level is not None:
        if cfg.level >= slide.level_count:
            raise SlideError(f"{slide.path}: level {cfg.level} requested, the slide has {slide.level_count}")
        return Plan(cfg.level, cfg.tile_px, slide.level_mpp(cfg.level))
    if slide.mpp is None:
        raise SlideError(f"{slide.path}: no resolution in the file; set slide_mpp=<µm per pixel> or level=<n>")
    assert cfg.mpp is not None
    mpps = [slide.level_mpp(k) for k in range(slide.level_count)]
    fine_enough = [k for k, m in enumerate(mpps) if m <= cfg.mpp * (1 + cfg.mpp_tolerance)]
    level = max(fine_enough, key=lambda k: mpps[k]) if fine_enough else 0
    close_enough = abs(mpps[level] / cfg.mpp - 1) <= cfg.mpp_tolerance
    size = cfg.tile_px if close_enough else int(round(cfg.tile_px * cfg.mpp / mpps[level]))
    return Plan(level, size, mpps[level] * size / cfg.tile_px)


def grid_tissue(mask: np.ndarray, scale: float, size: int, ny: int, nx: int) -> np.ndarray:
    """Tissue fraction of each (ny, nx) grid tile, from a tissue ``mask`` ``scale`` times coarser than the read level."""
    integral = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), np.float64)
    integral[1:, 1:] = mask.cumsum(0).cumsum(1)
    edges_y = np.clip(np.round(np.arange(ny + 1) * size / scale).astype(int), 0, mask.shape[0])
    edges_x = np.clip(np.round(np.arange(nx + 1) * size / scale).astype(int), 0, mask.shape[1])
    y0, y1, x0, x1 = edges_y[:-1, None], edges_y[1:, None], edges_x[None, :-1], edges_x[None, 1:]
    area = np.maximum((y1 - y0) * (x1 - x0), 1)
    total = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    return (total / area).astype(np.float32)


def _mask_level(mask: Slide, slide: Slide, level: int) -> int:
    """The mask level that matches the slide's read level pixel for pixel."""
    if mask.level_dimensions[0] != slide.level_dimensions[0]:
        raise SlideError(f"{mask.path}: mask size {mask.level_dimensions[0]} differs from the slide's {slide.level_dimensions[0]}")
    for k, dims in enumerate(mask.level_dimensions):
        if dims == slide.level_dimensions[level]:
            return k
    raise SlideError(f"{mask.path}: mask has no level of size {slide.level_dimensions[level]} (slide level {level})")


def _blocks(rows: np.ndarray, cols: np.ndarray, block: int) -> list[np.ndarray]:
    """Indices of candidate tiles grouped by block, blocks in raster order (OpenSlide's tile cache then serves block edges)."""
    if rows.size == 0:
        return []
    keys = (rows // block) * (cols.max() // block + 1) + cols // block
    order = np.argsort(keys, kind="stable")
    split_at = np.flatnonzero(np.diff(keys[order])) + 1
    return np.split(order, split_at)


def _band_blocks(blocks: list[np.ndarray], band: Band) -> list[np.ndarray]:
    """The blocks of band ``(k, n)``: consecutive blocks holding about a k-th n-th of the candidate tiles each (a block
    goes to the band in which its first tile falls), so that the bands' rows in order are the slide's."""
    k, n = band
    if n == 1:
        return blocks
    sizes = [len(block) for block in blocks]
    before = np.cumsum([0] + sizes[:-1])
    total = max(sum(sizes), 1)
    return [block for block, first in zip(blocks, before) if min(n - 1, first * n // total) == k]


def part_schema(shards: bool) -> pa.Schema:
    """Columns of a part file (and, less ``keep`` and ``reason``, of the manifest), fixed so that
    parts of slides with no tiles concatenate with the others."""
    fields = [
        ("slide_id", pa.string()), ("x", pa.int64()), ("y", pa.int64()), ("level", pa.int64()), ("size", pa.int64()),
        ("label_name", pa.string()), ("tissue", pa.float32()), *((m, pa.float32()) for m in MEASURES),
        *((c, pa.float32()) for c in FRACTION_COLUMNS), ("keep", pa.bool_()), ("reason", pa.string()),
        ("mpp", pa.float32()), ("dataset", pa.string()), ("provider", pa.string()), ("group", pa.string()),
        ("split", pa.string()), ("path", pa.string()), ("label_policy", pa.string()), ("image_label", pa.string()),
        ("parent_slide", pa.string()), ("parent_label", pa.string()),
    ]
    if shards:
        fields += [("shard", pa.string()), ("shard_offset", pa.int64()), ("shard_length", pa.int64())]
    return pa.schema(fields)


Band = tuple[int, int]
"""Which part of a slide's blocks a task tiles: ``(k, n)``, the k-th of n runs of consecutive blocks."""


def tile_slide(job: SlideJob, cfg: TileConfig, out: Path, band: Band = (0, 1)) -> tuple[dict[str, Any], pd.DataFrame | None]:
    """Tile one slide, write its part (and shard), return its summary row and None; or, for band ``(k, n)`` with
    n > 1, tile only the k-th of n runs of its blocks and return the band's summary and rows, which
    :func:`write_bands` joins into the part once every band is in. Raises on a bad slide."""
    start = time.perf_counter()
    if job.error:
        raise SlideError(f"{job.path}: {job.error}")
    with open_slide(job.path, job.mpp) as slide, contextlib.ExitStack() as stack:
        if slide.mpp is None:
            slide.mpp = cfg.slide_mpp
        plan = plan_reading(slide, cfg)
        if plan.size < cfg.tile_px:  # counted over the run in one warning (tile): one line per patch drowns the log
            log.debug("%s: level %d is coarser than mpp=%s; %d-px tiles will be upsampled to %d",
                      job.path, plan.level, cfg.mpp, plan.size, cfg.tile_px)
        mask_slide = None
        if job.mask is not None:
            if job.mask.is_file():
                mask_slide = stack.enter_context(open_slide(job.mask, slide.mpp, require_rgb=False))
            elif cfg.missing_mask == "fail":
                raise SlideError(f"{job.mask}: mask file missing (missing_mask=unlabelled tiles such slides without labels)")
        shard = stack.enter_context(ShardWriter(out, job.slide_id, cfg.shard_quality)) if cfg.shards else None
        rows, grid_tiles = _tile_rows(slide, mask_slide, job, plan, cfg, shard, band)
        dimensions = slide.level_dimensions[0]
    summary = _summary({
        "slide_id": job.slide_id, "path": str(job.path), "provider": job.provider,
        "width": dimensions[0], "height": dimensions[1], "level": plan.level, "size": plan.size, "mpp": plan.tile_mpp,
        "grid_tiles": grid_tiles}, rows, time.perf_counter() - start)
    if band[1] > 1:
        return summary, rows
    _write_part(out, job.slide_id, rows, summary, cfg.shards)
    return summary, None


def _summary(slide: dict[str, Any], rows: pd.DataFrame, seconds: float) -> dict[str, Any]:
    """A slide's row of ``slides.parquet``: what describes the slide, the counts of its measured tiles, the time."""
    return {**slide, "read_tiles": len(rows), "kept_tiles": int(rows["keep"].sum()), "seconds": seconds,
            **{f"dropped_{reason}": int((rows["reason"] == reason).sum()) for reason in sorted(set(rows["reason"]) - {""})}}


def _write_part(out: Path, slide_id: str, rows: pd.DataFrame, summary: dict[str, Any], shards: bool) -> None:
    """``parts/<slide_id>.parquet`` in one atomic step, its summary in the file's metadata: the slide is done."""
    table = pa.Table.from_pandas(rows, schema=part_schema(shards), preserve_index=False)
    table = table.replace_schema_metadata({b"bony_summary": json.dumps(summary).encode()})
    with atomic_path(out / "parts" / f"{slide_id}.parquet") as tmp:
        pq.write_table(table, tmp)


def write_bands(out: Path, bands: list[tuple[dict[str, Any], pd.DataFrame]], shards: bool) -> dict[str, Any]:
    """Join a slide's bands (in band order) into its part, the same rows as the slide tiled whole; return its summary
    (the time is the bands' sum)."""
    rows = pd.concat([band_rows for _, band_rows in bands], ignore_index=True)
    first = bands[0][0]
    slide = {key: value for key, value in first.items() if key not in ("read_tiles", "kept_tiles", "seconds")
             and not key.startswith("dropped_")}
    summary = _summary(slide, rows, sum(summary["seconds"] for summary, _ in bands))
    _write_part(out, str(first["slide_id"]), rows, summary, shards)
    return summary


class ShardWriter:
    """Kept tiles of one slide as JPEG members of ``shards/<slide_id>.tar``, written block by block.

    The tar is written under a temporary name and renamed when the slide is complete, before its
    part file: a manifest row never points into a half-written shard.
    """

    def __init__(self, out: Path, slide_id: str, quality: int) -> None:
        self.name, self.slide_id, self.quality = f"shards/{slide_id}.tar", slide_id, quality
        self._atomic = atomic_path(out / self.name)

    def __enter__(self) -> ShardWriter:
        self._tmp = self._atomic.__enter__()
        self._tar = tarfile.open(self._tmp, "w")
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            self._tar.close()
        except BaseException as error:  # closing flushes: a full disk shows here; the temporary file still goes
            self._atomic.__exit__(type(error), error, error.__traceback__)
            raise
        self._atomic.__exit__(*exc)

    def write(self, tiles: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Append ``tiles``; return the byte offset and length of each JPEG in the tar."""
        offsets, lengths = np.zeros(len(tiles), np.int64), np.zeros(len(tiles), np.int64)
        for i, (tile, x, y) in enumerate(zip(tiles, xs, ys)):
            buffer = io.BytesIO()
            Image.fromarray(tile).save(buffer, format="JPEG", quality=self.quality)
            info = tarfile.TarInfo(f"{self.slide_id}_{x}_{y}.jpg")
            info.size = buffer.tell()
            buffer.seek(0)
            self._tar.addfile(info, buffer)
            # the data ends where the archive now ends, before its padding to 512-byte blocks
            offsets[i] = self._tar.offset - -(-info.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
            lengths[i] = info.size
        return offsets, lengths


def _tile_rows(slide: Slide, mask_slide: Slide | None, job: SlideJob, plan: Plan, cfg: TileConfig,
               shard: ShardWriter | None, band: Band = (0, 1)) -> tuple[pd.DataFrame, int]:
    """Measure, filter and label the tissue tiles of one slide: the rows of its part file, and the grid size."""
    level, size = plan.level, plan.size
    ds = slide.level_downsamples[level]
    width, height = slide.level_dimensions[level]
    ny, nx = max(0, (height - size) // size + 1), max(0, (width - size) // size + 1)
    if ny * nx == 0:
        raise SlideError(f"{slide.path}: smaller than one tile ({width}x{height} px at level {level}, tiles of {size} px)")
    if job.patch:
        # a patch is too small for a low-resolution search: every tile is read, quality decides
        fraction = np.ones((ny, nx), np.float32)
    else:
        base_mpp = slide.mpp or NOMINAL_MPP
        overview_level = int(np.argmin([abs(np.log(base_mpp * d / cfg.tissue.detect_mpp)) for d in slide.level_downsamples]))
        tissue = tissue_mask(slide.read_level(overview_level), base_mpp * slide.level_downsamples[overview_level], cfg.tissue)
        if not tissue.any():
            raise SlideError(f"{slide.path}: no tissue found (all background at level {overview_level})")
        fraction = grid_tissue(tissue, slide.level_downsamples[overview_level] / ds, size, ny, nx)
    rows, cols = np.nonzero(fraction >= cfg.min_tissue)
    mask_level = _mask_level(mask_slide, slide, level) if mask_slide is not None else None

    columns: dict[str, list[np.ndarray]] = {}
    for block in _band_blocks(_blocks(rows, cols, cfg.block_tiles), band):
        r, c = rows[block], cols[block]
        r0, c0 = int(r.min()), int(c.min())
        bh, bw = (int(r.max()) - r0 + 1) * size, (int(c.max()) - c0 + 1) * size
        location = (int(round(c0 * size * ds)), int(round(r0 * size * ds)))
        cells = np.zeros((bh // size, bw // size), bool)
        cells[r - r0, c - c0] = True
        grid = _grid(slide.read_region(location, level, (bw, bh), cells), size)
        measures = grid_measures(grid, r - r0, c - c0)
        keep, reason = keep_tiles(measures, cfg.quality)
        x, y = np.round(c * size * ds).astype(np.int64), np.round(r * size * ds).astype(np.int64)
        block_columns: dict[str, np.ndarray] = {"x": x, "y": y, "tissue": fraction[r, c], "keep": keep, "reason": reason,
                                                **measures}
        if mask_slide is not None and mask_level is not None:
            codes = _grid(mask_slide.read_codes(location, mask_level, (bw, bh), cells), size)
            try:
                block_columns["fractions"] = grid_class_fractions(codes, r - r0, c - c0, job.encoding or "")
            except ValueError as exc:
                raise SlideError(f"{mask_slide.path}: {exc}") from None
        if shard is not None:
            offsets, lengths = np.full(len(r), -1, np.int64), np.full(len(r), -1, np.int64)
            offsets[keep], lengths[keep] = shard.write(grid[(r - r0)[keep], :, (c - c0)[keep]], x[keep], y[keep])
            block_columns.update(shard_offset=offsets, shard_length=lengths)
        for key, value in block_columns.items():
            columns.setdefault(key, []).append(value)
    schema = part_schema(shard is not None)
    if not columns:
        return schema.empty_table().to_pandas(), ny * nx
    joined = {key: np.concatenate(parts) for key, parts in columns.items()}
    n = len(joined["x"])
    fractions = joined.pop("fractions", np.full((n, len(FRACTION_COLUMNS)), np.nan, np.float32))
    if mask_slide is not None:
        labels, policy = tile_labels(fractions, cfg.label_policy, cfg.min_fraction), cfg.label_policy
    else:
        labels, policy = job.label, IMAGE_POLICY if job.label else ""
    frame = pd.DataFrame({
        "slide_id": job.slide_id, "x": joined["x"], "y": joined["y"], "level": level, "size": size,
        "label_name": labels,
        "tissue": joined["tissue"], **{m: joined[m] for m in MEASURES},
        **{column: fractions[:, k] for k, column in enumerate(FRACTION_COLUMNS)},
        "keep": joined["keep"], "reason": joined["reason"].astype(str),
        "mpp": plan.tile_mpp if plan.tile_mpp is not None else np.nan,
        "dataset": job.dataset, "provider": job.provider, "group": job.group, "split": job.split, "path": str(job.path),
        "label_policy": policy, "image_label": job.image_label, "parent_slide": job.parent_slide,
        "parent_label": job.parent_label,
    })
    if shard is not None:
        frame["shard"] = np.where(frame["keep"], shard.name, "")
        frame["shard_offset"], frame["shard_length"] = joined["shard_offset"], joined["shard_length"]
    return frame, ny * nx


def _grid(image: np.ndarray, size: int) -> np.ndarray:
    """A block ``image`` viewed as a (rows, size, cols, size, ...) grid of tiles, without copying:
    ``grid[r, :, c]`` gathers the tiles at grid positions (r, c), and the quality measures gather
    only the subsampled pixels they use."""
    return image.reshape(image.shape[0] // size, size, image.shape[1] // size, size, *image.shape[2:])


def load_kernels() -> float:
    """Compile (on a first run) or load from numba's cache the compiled per-tile kernels of the quality measures and
    the mask counts, in this process; return the seconds it took (nothing, once loaded).

    :func:`tile` calls it before it starts its workers, which then inherit the loaded kernels: without it, each
    worker would spend about 0.5 s setting numba up, and on a fresh install each would compile the kernels (about
    5 s) at the same time as the others."""
    start = time.perf_counter()
    grid_measures(np.full((1, 6, 1, 6, 3), 255, np.uint8), np.zeros(1, np.intp), np.zeros(1, np.intp))
    grid_class_fractions(np.zeros((1, 6, 1, 6), np.uint8), np.zeros(1, np.intp), np.zeros(1, np.intp), "radboud")
    return time.perf_counter() - start


def _tile_or_fail(job: SlideJob, cfg: TileConfig, out: Path,
                  band: Band = (0, 1)) -> tuple[tuple[dict[str, Any], pd.DataFrame | None] | None, str]:
    """Run :func:`tile_slide` turning any error into a message, so one bad slide never stops a run.

    A full output disk is not the slide's fault and every later slide would fail the same way: it
    stops the run (:class:`DiskFullError`, naming the output folder); the finished slides' parts are
    kept and a rerun resumes.
    """
    return _or_fail(job, out, lambda: tile_slide(job, cfg, out, band))


def _or_fail(job: SlideJob, out: Path, work: Callable[[], Any]) -> tuple[Any, str]:
    """``(work(), "")``, or ``(None, message)`` for any error but a full disk (see :func:`_tile_or_fail`)."""
    try:
        with reporting_full_disk(out, f"slide {job.slide_id}"):
            return work(), ""
    except DiskFullError:
        raise
    except BonyError as exc:
        return None, str(exc)
    except Exception as exc:  # noqa: BLE001 - a corrupt file can raise anything from a decoder
        log.debug("slide %s failed:\n%s", job.slide_id, traceback.format_exc())
        return None, f"{job.path}: {type(exc).__name__}: {exc}"


@dataclass(frozen=True)
class TileResult:
    """What a ``bony tile`` run did."""

    out: Path
    tiled: int
    skipped: int
    failures: pd.DataFrame
    manifest: Path | None


RUN_ONLY_KEYS = ("workers", "block_tiles")
"""Options that change how a run goes, not what it writes: a resume may change them."""


def _check_config(out: Path, record: dict[str, Any], overwrite: bool, sharded: bool) -> None:
    """A run resumes only into a folder tiled with the same config; ``overwrite`` starts it afresh."""
    saved = out / "config.yaml"
    text = yaml.safe_dump({k: v for k, v in record.items() if k not in RUN_ONLY_KEYS}, sort_keys=False)
    if saved.is_file() and saved.read_text() != text:
        if not overwrite:
            raise BonyError(f"{out}: tiled before with another config (see its config.yaml); "
                            "use a new folder or --overwrite to start again")
        if sharded:
            raise BonyError("--overwrite with --shard would delete the other array tasks' slides; "
                            "clear the folder once before submitting the array")
        for stale in ("parts", "shards"):
            for path in (out / stale).glob("*"):
                path.unlink()
        for path in (*out.glob("failures*.csv"), out / "manifest.parquet", out / "slides.parquet"):
            path.unlink(missing_ok=True)
    write_text_atomic(saved, text)


def tile(fmt: str, inputs: list[Path], out: Path, cfg: TileConfig, shard: tuple[int, int] = (0, 1),
         overwrite: bool = False) -> TileResult:
    """Tile every slide of ``inputs`` (this shard's share), resuming from earlier runs into ``out``.

    With ``shard=(i, n)``, n > 1, only slides i, i+n, ... are tiled and no manifest is written;
    a run without shard, after all array tasks ended, retries their failures and assembles.
    """
    if fmt == "imagefolder" and cfg.mpp is not None and cfg.slide_mpp is None:
        raise BonyError("--format imagefolder: plain images carry no resolution; give it with slide_mpp=<µm per pixel> "
                        "(40x scans: about 0.25), or tile the images' own pixels with mpp=null level=0")
    jobs = list_jobs(fmt, [Path(p) for p in inputs])
    index, count = shard
    if not 0 <= index < count:
        raise BonyError(f"--shard {index}/{count}: need 0 <= i < n")
    jobs = sorted(jobs, key=lambda j: (j.slide_id, str(j.path)))[index::count]
    out = ensure_writable_dir(Path(out))
    record = {"format": fmt, "inputs": [str(Path(p).resolve()) for p in inputs], **to_dict(cfg)}
    _check_config(out, record, overwrite, sharded=count > 1)
    done = {p.stem for p in (out / "parts").glob("*.parquet")}
    pending = [j for j in jobs if j.slide_id not in done or j.error]
    _remove_stale_temporaries(out, [j for j in pending if not j.error], whole_run=count == 1)
    log.info("%d slides: %d already tiled, %d to do, %d workers", len(jobs), len(jobs) - len(pending), len(pending), cfg.workers)
    if pending:
        log.debug("compiled kernels ready in %.2f s", load_kernels())
    failures: list[dict[str, str]] = []
    upsampled: list[dict[str, Any]] = []
    with tqdm(total=len(pending), desc="tiling", unit="slide") as progress:
        for job, summary, error in _run(pending, cfg, out):
            if error:
                log.warning("slide %s failed: %s", job.slide_id, error)
                failures.append({"slide_id": job.slide_id, "path": str(job.path), "error": error})
            else:
                progress.set_postfix_str(f"{job.slide_id[:12]}: {summary['kept_tiles']} tiles")
                if summary["size"] < cfg.tile_px:
                    upsampled.append(summary)
            progress.update()
    if upsampled:
        sizes = sorted({int(s["size"]) for s in upsampled})
        log.warning("%d slides have no level as fine as mpp=%s: their %s-px regions are upsampled to tile_px=%d "
                    "(finest level: %.3g µm/px, e.g. %s); tile at their resolution with mpp=<that value>",
                    len(upsampled), cfg.mpp, "/".join(map(str, sizes)), cfg.tile_px,
                    upsampled[0]["mpp"] * cfg.tile_px / upsampled[0]["size"], upsampled[0]["slide_id"])
    failed = pd.DataFrame(failures, columns=["slide_id", "path", "error"]).sort_values("slide_id")
    manifest = None
    if count == 1:
        with atomic_path(out / "failures.csv") as tmp:
            failed.to_csv(tmp, index=False)
        for task_failures in out.glob("failures-*-of-*.csv"):  # superseded: their slides were retried here
            task_failures.unlink()
        manifest = assemble(out, [j.slide_id for j in jobs if not j.error])  # a rejected id never names a file
    else:
        with atomic_path(out / f"failures-{index}-of-{count}.csv") as tmp:
            failed.to_csv(tmp, index=False)
    return TileResult(out, len(pending) - len(failed), len(jobs) - len(pending), failed, manifest)


def _remove_stale_temporaries(out: Path, jobs: list[SlideJob], whole_run: bool) -> None:
    """Delete half-written files left by a killed run: those of this run's slides and, for a whole
    (unsharded) run, of the manifest and tables. A slide belongs to one array task, so tasks
    sharing the folder never delete each other's files in progress."""
    stale: list[Path] = []
    for job in jobs:
        # temporary names are ".<stem>.<8 random characters>.tmp<suffix>" (files.atomic_path)
        stale += (out / "parts").glob(f".{glob.escape(job.slide_id)}.{'?' * 8}.tmp.parquet")
        stale += (out / "shards").glob(f".{glob.escape(job.slide_id)}.{'?' * 8}.tmp.tar")
    if whole_run:
        stale += [p for p in out.glob(".*.tmp.*") if p.is_file()]
    for path in stale:
        log.info("removing %s, left by an interrupted run", path)
        path.unlink(missing_ok=True)


def _run(jobs: list[SlideJob], cfg: TileConfig, out: Path) -> Iterator[tuple[SlideJob, dict[str, Any] | None, str]]:
    """Tile ``jobs`` in this process or over ``cfg.workers`` processes, yielding results as slides finish.

    With several workers, a slide larger than a ``2 * workers``-th of the run is tiled as bands of
    its blocks, one task each, joined into its part when all are in (:func:`band_counts`): with few
    slides, two workers' wall time was set by the largest (42 % of bench_tiling's 4 slides), not by
    their speed. The parts are the same as a whole slide's. A band that fails fails its slide.
    Results are kept by the job's place in ``jobs``, not its id: a duplicate id is a job of its own
    (refused), which must not fail the slide whose id it repeats.
    """
    if cfg.workers == 1:
        for job in jobs:
            result, error = _tile_or_fail(job, cfg, out)
            yield job, result[0] if result else None, error
        return
    for job in jobs:  # refused before any reading: no process needed
        if job.error:
            yield job, None, f"{job.path}: {job.error}"
    usable = [(index, job) for index, job in enumerate(jobs) if not job.error]
    counts = band_counts([job for _, job in usable], cfg)
    tasks = [(index, job, (k, n)) for (index, job), n in zip(usable, counts) for k in range(n)]
    bands: dict[int, dict[int, tuple[dict[str, Any], pd.DataFrame]]] = {}
    failed: set[int] = set()
    with contextlib.closing(_run_tasks(tasks, cfg, out, failed)) as results:
        for (index, job, (k, n)), result, error in results:
            if index in failed:
                continue
            if result is None:
                failed.add(index)
                bands.pop(index, None)
                yield job, None, error
                continue
            summary, rows = result
            if rows is None:  # a whole slide: its part is written
                yield job, summary, ""
                continue
            done = bands.setdefault(index, {})
            done[k] = (summary, rows)
            if len(done) == n:
                del bands[index]
                joined = [done[i] for i in range(n)]
                yield (job, *_or_fail(job, out, lambda: write_bands(out, joined, cfg.shards)))


def band_counts(jobs: list[SlideJob], cfg: TileConfig) -> list[int]:
    """In how many bands each slide is tiled: one, unless the run has several workers and the slide's file is more
    than a ``2 * workers``-th of all the files (then as many bands as that share goes into it, at most ``workers``).
    Over thousands of slides none is; patches are never split, nor slides written into shards (one tar a slide).
    The bands of a slide each find its tissue again (tens of milliseconds), a cost only few-slide runs pay."""
    if cfg.workers == 1 or cfg.shards:
        return [1] * len(jobs)
    sizes = [_file_bytes(job) for job in jobs]
    share = sum(sizes) / (2 * cfg.workers)
    if share == 0:
        return [1] * len(jobs)
    return [1 if job.patch else max(1, min(cfg.workers, math.ceil(size / share))) for job, size in zip(jobs, sizes)]


Task = tuple[int, SlideJob, Band]
"""A job's place in the run's list, the job, and the band of it to tile."""


def _run_tasks(tasks: list[Task], cfg: TileConfig, out: Path,
               failed: set[int]) -> Iterator[tuple[Task, tuple[dict[str, Any], pd.DataFrame | None] | None, str]]:
    """Run ``tasks`` over ``cfg.workers`` processes, yielding each one's result as it finishes.

    Workers take the largest tasks first, so that the last to finish are small ones and the
    workers end together (in file order, two large slides left to the end keep one worker busy
    while the other waits). A worker that dies (a decoder crashing on a corrupt file, the kernel
    killing it for memory) breaks the pool: the tasks it left unfinished are then retried one per
    fresh process, so the culprit is recorded as failed and the others are tiled; the bands of
    jobs already ``failed`` (the caller's set, filled as results come) are not retried.
    """
    unfinished: list[Task] = []
    with ProcessPoolExecutor(max_workers=cfg.workers) as pool:
        largest_first = sorted(tasks, key=lambda task: _file_bytes(task[1]) / task[2][1], reverse=True)
        futures = {pool.submit(_tile_or_fail, job, cfg, out, band): (index, job, band)
                   for index, job, band in largest_first}
        reported: set[Future] = set()
        try:
            for future in as_completed(futures):
                result = future.result()  # raises if the pool broke, or the disk is full
                reported.add(future)
                yield (futures[future], *result)
        except (DiskFullError, GeneratorExit):  # every queued task would fail the same way, or no one waits for them
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        except BrokenProcessPool:
            for future, task in futures.items():
                if future in reported:
                    continue
                if future.done() and future.exception() is None:
                    yield (task, *future.result())
                else:
                    unfinished.append(task)
    for index, job, band in unfinished:
        if index in failed:
            continue
        with ProcessPoolExecutor(max_workers=1) as alone:
            try:
                yield ((index, job, band), *alone.submit(_tile_or_fail, job, cfg, out, band).result())
            except BrokenProcessPool:
                yield ((index, job, band), None,
                       f"{job.path}: the worker process died while tiling this slide (crash or out of memory)")


def _file_bytes(job: SlideJob) -> int:
    """Size of a slide's file, a proxy for its tiling time (0 for a missing file: it fails at once)."""
    return job.path.stat().st_size if job.path.is_file() else 0


def assemble(out: Path, slide_ids: list[str]) -> Path:
    """Write ``manifest.parquet`` (kept tiles) and ``slides.parquet`` from the parts of ``slide_ids``.

    Parts are streamed one at a time in slide order, so memory stays that of one slide and the
    manifest does not depend on the order in which slides finished.
    """
    parts = [out / "parts" / f"{sid}.parquet" for sid in sorted(set(slide_ids))]
    parts = [p for p in parts if p.is_file()]
    summaries = []
    with atomic_path(out / "manifest.parquet") as tmp:
        writer = None
        for part in parts:
            table = pq.read_table(part)
            summaries.append(json.loads(table.schema.metadata[b"bony_summary"]))
            kept = table.filter(table["keep"]).drop_columns(["keep", "reason"]).replace_schema_metadata(None)
            if writer is None:
                writer = pq.ParquetWriter(tmp, kept.schema)
            writer.write_table(kept)
        if writer is None:
            empty = part_schema(False)
            pq.write_table(empty.empty_table().drop_columns(["keep", "reason"]), tmp)
        else:
            writer.close()
    with atomic_path(out / "slides.parquet") as tmp:
        pd.DataFrame(summaries).to_parquet(tmp, index=False)
    return out / "manifest.parquet"


def read_part(out: Path, slide_id: str) -> pd.DataFrame:
    """Every measured tile of one slide, kept or dropped with its reason (for plots of the filter)."""
    return pd.read_parquet(Path(out) / "parts" / f"{slide_id}.parquet")
