"""What to tile: the slides of a dataset folder, each with its mask, encoding and grouping.

``bony tile --format panda|sicapv2|deepgleason|slides`` turns a dataset folder (or a list of slide
files) into :class:`SlideJob` records. Problems that belong to one slide or one row (an unknown
provider, a duplicate id, a missing mask, a malformed CSV row, an id that is not a safe file name)
do not stop the listing: the job carries the error and the tiler records it as that slide's failure.

Ids and paths come from files users do not control (CSV rows, spreadsheets, file names): an id
becomes part of output file names (``parts/<id>.parquet``, ``shards/<id>.tar``) only after
:func:`id_problem` accepted it, and a path from a CSV is used only if it stays inside the dataset
folder. Slide paths are absolute, so a manifest works from any working folder.
"""

from __future__ import annotations

import csv
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pandas as pd

from bonylib.data.slides import IMAGE_SUFFIXES, TIFF_SUFFIXES
from bonylib.errors import BonyError
from bonylib.files import path_inside

FORMATS: tuple[str, ...] = ("panda", "sicapv2", "deepgleason", "slides")
SLIDE_SUFFIXES = frozenset(TIFF_SUFFIXES | IMAGE_SUFFIXES | {".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide"})
SICAPV2_MPP = 1.0  # SICAPv2 patches are 10x
DEEPGLEASON_MPP = 0.5
MAX_ID_LENGTH = 200
_UNSAFE_ID = re.compile(r"[/\\\x00-\x1f\x7f]")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SlideJob:
    """One slide to tile.

    ``group`` is the unit that must not straddle data splits (patient or source slide);
    ``split`` is the dataset's own split when it has one; ``patch`` marks a small image cut from a
    slide (SICAPv2, DeepGleason), which is not searched for tissue at low resolution and may be
    all glass; ``error`` is set for a slide known to be unusable before it is opened.
    """

    slide_id: str
    path: Path
    dataset: str = "slides"
    mask: Path | None = None
    encoding: str | None = None
    provider: str = ""
    group: str = ""
    split: str = ""
    mpp: float | None = None
    patch: bool = False
    error: str = ""


def id_problem(slide_id: str) -> str:
    """Why ``slide_id`` cannot name output files ("" when it can): it must be one plain file name.

    Spaces, brackets and other characters of real slide names are fine; a path separator, a control
    character or a leading dot ('..', hidden files) is not.
    """
    if not slide_id.strip():
        return "empty slide id"
    if _UNSAFE_ID.search(slide_id) or slide_id.startswith(".") or len(slide_id.encode()) > MAX_ID_LENGTH:
        return (f"slide id {slide_id!r} is not a safe file name (no '/', '\\', control characters or leading '.', "
                f"at most {MAX_ID_LENGTH} bytes: file names take 255, and temporary names add to the id)")
    return ""


def _checked(jobs: list[SlideJob]) -> list[SlideJob]:
    """Unsafe ids get an error; an exact repeat of a job is dropped (a duplicated CSV row); a different slide
    with an id already seen gets an error instead of overwriting the first one's outputs."""
    first: dict[str, SlideJob] = {}
    out = []
    for job in jobs:
        problem = id_problem(job.slide_id)
        if problem and not job.error:
            job = replace(job, error=problem)
        seen = first.get(job.slide_id)
        if seen == job:
            log.warning("%s: listed twice with the same values; tiled once", job.slide_id)
            continue
        if seen is not None and not job.error:
            job = replace(job, error=f"duplicate slide id '{job.slide_id}' (first seen in {seen.path})")
        first.setdefault(job.slide_id, job)
        out.append(job)
    return out


def csv_rows(path: Path, required: set[str]) -> Iterator[tuple[int, dict[str, str], str]]:
    """``(line, row, error)`` for each non-blank data line of a CSV; ``error`` names the file and line of a
    row that does not fit the header (and ``row`` is then its first cells). A file that cannot be read or
    lacks ``required`` columns raises :class:`BonyError` naming it."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise BonyError(f"{path}: cannot read ({exc})") from None
    reader = csv.reader(text.splitlines())
    try:
        header = [name.strip() for name in next(reader, [])]
        missing = required - set(header)
        if missing:
            raise BonyError(f"{path}: missing columns {sorted(missing)} (has {header})")
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue
            cells = dict(zip(header, (cell.strip() for cell in row)))
            error = "" if len(row) == len(header) else f"{path} line {reader.line_num}: {len(row)} fields, the header has {len(header)}"
            yield reader.line_num, cells, error
    except csv.Error as exc:
        raise BonyError(f"{path} line {reader.line_num}: not valid CSV ({exc})") from None


def _inside(root: Path, relative: str, what: str) -> tuple[Path, str]:
    """``root / relative`` and "" if it stays inside ``root`` (:func:`bonylib.files.path_inside`), else a path to
    report and the error."""
    path = path_inside(root, relative)
    if path is None:
        return root / "<outside>", f"{what} path {relative!r} is not inside {root}"
    return path, ""


def panda_jobs(root: Path) -> list[SlideJob]:
    """PANDA: rows of ``train.csv``; masks in ``train_label_masks``, encoding by ``data_provider``."""
    table = root / "train.csv"
    if not table.is_file():
        raise BonyError(f"{root}: not a PANDA folder (train.csv missing)")
    jobs = []
    for line, row, error in csv_rows(table, {"image_id", "data_provider"}):
        image_id, provider = row.get("image_id", ""), row.get("data_provider", "")
        if not error and not image_id:
            error = f"{table} line {line}: empty image_id"
        if not error and provider not in ("radboud", "karolinska"):
            error = f"unknown data_provider '{provider}' (radboud or karolinska)"
        if error or id_problem(image_id):
            jobs.append(SlideJob(slide_id=image_id or f"{table.name}:{line}", path=table, dataset="panda",
                                 provider=provider, error=error))
            continue
        jobs.append(SlideJob(
            slide_id=image_id,
            path=root / "train_images" / f"{image_id}.tiff",
            dataset="panda",
            mask=root / "train_label_masks" / f"{image_id}_mask.tiff",
            encoding=provider,
            provider=provider,
            group=image_id,
        ))
    return jobs


_SICAP_NAME = re.compile(r"(?P<slide>.+?)_Block_Region_")


def sicapv2_jobs(root: Path) -> list[SlideJob]:
    """SICAPv2: each patch is a one-level slide at 10x with its JPEG mask; split from ``partition/Test``."""
    images = root / "images"
    if not images.is_dir():
        raise BonyError(f"{root}: not a SICAPv2 folder (images/ missing)")
    split: dict[str, str] = {}
    for name in ("Train", "Test"):
        sheet = root / "partition" / "Test" / f"{name}.xlsx"
        if sheet.is_file():
            try:
                names = pd.read_excel(sheet)
            except Exception as exc:  # noqa: BLE001 - openpyxl and zipfile raise many kinds for a broken workbook
                raise BonyError(f"{sheet}: not a readable spreadsheet ({type(exc).__name__}: {exc})") from None
            if "image_name" not in names:
                raise BonyError(f"{sheet}: no image_name column (has {list(names.columns)})")
            split.update({str(n): name.lower() for n in names["image_name"].dropna()})
    jobs = []
    for path in sorted(images.glob("*.jpg")):
        match = _SICAP_NAME.match(path.stem)
        jobs.append(SlideJob(
            slide_id=path.stem, path=path, dataset="sicapv2", mask=root / "masks" / path.name, encoding="sicapv2",
            provider="sicapv2", group=match["slide"] if match else path.stem,
            split=split.get(path.name, ""), mpp=SICAPV2_MPP, patch=True,
        ))
    return jobs


def deepgleason_jobs(root: Path) -> list[SlideJob]:
    """DeepGleason-style: each tile of ``tiles.csv`` is a one-level slide with its PNG mask."""
    table = root / "tiles.csv"
    if not table.is_file():
        raise BonyError(f"{root}: not a DeepGleason-style folder (tiles.csv missing)")
    jobs = []
    for line, row, error in csv_rows(table, {"tile_id", "image", "mask", "slide_id", "split"}):
        image, image_error = _inside(root, row.get("image", ""), "image")
        mask, mask_error = _inside(root, row.get("mask", ""), "mask")
        tile_id = row.get("tile_id", "")
        error = error or (f"{table} line {line}: empty tile_id" if not tile_id else "") or image_error or mask_error
        jobs.append(SlideJob(slide_id=tile_id or f"{table.name}:{line}", path=image if not error else table,
                             dataset="deepgleason", mask=mask, encoding="deepgleason", provider="deepgleason",
                             group=row.get("slide_id", ""), split=row.get("split", ""), mpp=DEEPGLEASON_MPP, patch=True,
                             error=error))
    return jobs


def slide_files_jobs(inputs: list[Path]) -> list[SlideJob]:
    """Any slides: files, or folders searched recursively for slide and image files; no masks."""
    paths: list[Path] = []
    for item in inputs:
        if item.is_dir():
            paths += sorted(p for p in item.rglob("*") if p.is_file() and p.suffix.lower() in SLIDE_SUFFIXES)
        elif item.is_file():
            paths.append(item)
        else:
            raise BonyError(f"{item}: no such file or folder")
    return [SlideJob(slide_id=p.stem, path=p, group=p.stem) for p in paths]


def list_jobs(fmt: str, inputs: list[Path]) -> list[SlideJob]:
    """The slides to tile for ``fmt``; dataset formats take exactly one folder."""
    if fmt not in FORMATS:
        raise BonyError(f"unknown format '{fmt}' (choose from {', '.join(FORMATS)})")
    inputs = [Path(item).absolute() for item in inputs]  # manifests hold absolute paths: usable from any folder
    if fmt == "slides":
        return _checked(slide_files_jobs(inputs))
    if len(inputs) != 1 or not inputs[0].is_dir():
        raise BonyError(f"--format {fmt} takes one dataset folder, got {', '.join(map(str, inputs))}")
    return _checked({"panda": panda_jobs, "sicapv2": sicapv2_jobs, "deepgleason": deepgleason_jobs}[fmt](inputs[0]))
