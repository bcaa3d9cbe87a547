"""What to tile: the slides of a dataset folder, each with its mask, encoding and grouping.

``bony tile --format panda|sicapv2|deepgleason|imagefolder|slides`` turns a dataset folder (or a list of
slide files) into :class:`SlideJob` records. Problems that belong to one slide or one row (an unknown
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

from bonylib.data.sicapv2_tables import (PATCH_CLASSES, TILE_LABELS, gleason_text, read_sheet, read_slide_labels,
                                         slide_of)
from bonylib.data.slides import IMAGE_SUFFIXES, TIFF_SUFFIXES
from bonylib.errors import BonyError
from bonylib.files import path_inside

FORMATS: tuple[str, ...] = ("panda", "sicapv2", "deepgleason", "imagefolder", "slides")
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
    slide (SICAPv2, DeepGleason, an image folder's images), which is not searched for tissue at low
    resolution and may be all glass; ``error`` is set for a slide known to be unusable before it is opened.

    Labels that are not in a mask: ``label`` is the ``label_name`` its tiles take when it has no mask (a
    SICAPv2 patch's spreadsheet class); ``image_label`` the class of the whole image in the dataset's own
    words (SICAPv2's NC/G3/G4/G5, an image folder's sub-folder); ``parent_slide`` and ``parent_label`` the
    whole slide a patch was cut from and that slide's label (SICAPv2: its Gleason score from
    ``wsi_labels.xlsx``), kept for patches that have no label of their own.
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
    label: str = ""
    image_label: str = ""
    parent_slide: str = ""
    parent_label: str = ""


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


def sicapv2_jobs(root: Path) -> list[SlideJob]:
    """SICAPv2: each patch of ``images/`` is a one-level slide at 10x, as complete or partial a copy as the user has.

    Labels come from SICAPv2's own tables (:mod:`bonylib.data.sicapv2_tables`): a patch with a mask in ``masks/``
    is labelled from it under the tiling's ``label_policy``; a patch without one takes its class in the partition
    spreadsheets (``label``: SICAPv2's majority vote of the patch's annotations); a patch in no spreadsheet is
    unlabelled and keeps its slide's Gleason score (``parent_label``). The split is the ``Test`` partition's,
    the group the patient (``wsi_labels.xlsx``; the slide when the table is absent). Patches the spreadsheets
    list but ``images/`` lacks (a partial download) are counted in one log line with the other gaps, not
    reported one by one.
    """
    images = root / "images"
    if not images.is_dir():
        raise BonyError(f"{root}: not a SICAPv2 folder (images/ missing)")
    split: dict[str, str] = {}
    classes: dict[str, str] = {}
    for name in ("Train", "Test"):
        sheet = root / "partition" / "Test" / f"{name}.xlsx"
        if sheet.is_file():
            table = read_sheet(sheet)
            split.update(dict.fromkeys(table["image_name"], name.lower()))
            classes.update(zip(table["image_name"], (PATCH_CLASSES[k] for k in table["label"])))
    slides = read_slide_labels(root) if (root / "wsi_labels.xlsx").is_file() else None
    jobs = []
    for path in sorted(images.glob("*.jpg")):
        slide = slide_of(path.stem) or path.stem
        known = slides is not None and slide in slides.index
        mask = root / "masks" / path.name
        jobs.append(SlideJob(
            slide_id=path.stem, path=path, dataset="sicapv2", mask=mask if mask.is_file() else None,
            encoding="sicapv2", provider="sicapv2", group=str(slides.at[slide, "patient"]) if known else slide,
            split=split.get(path.name, ""), mpp=SICAPV2_MPP, patch=True,
            label=TILE_LABELS[classes[path.name]] if path.name in classes else "",
            image_label=classes.get(path.name, ""), parent_slide=slide,
            parent_label=gleason_text(*slides.loc[slide, ["primary", "secondary"]]) if known else "",
        ))
    _log_sicapv2_gaps(root, jobs, set(classes), slides is not None)
    return jobs


def _log_sicapv2_gaps(root: Path, jobs: list[SlideJob], listed: set[str], has_slide_table: bool) -> None:
    """One line on what a SICAPv2 copy holds and lacks (whatever the number of patches), and the label policy
    that follows from it."""
    present = {job.path.name for job in jobs}
    labelled = sum(job.path.name in listed for job in jobs)
    without_mask = sum(job.mask is None for job in jobs)
    absent = len(listed - present)
    unlisted = len(jobs) - labelled
    parts = [f"{len(jobs)} patches in images/, {labelled} of them in the partition spreadsheets"]
    if unlisted:
        kept = "their slide's Gleason score kept in parent_label" if has_slide_table else "no wsi_labels.xlsx"
        parts.append(f"{unlisted} in none (unlabelled; {kept})")
    if absent:
        parts.append(f"{absent} patches the spreadsheets list are not in images/ (a partial copy: left out)")
    if without_mask:
        parts.append(f"{without_mask} without a mask in masks/: their tiles take the patch's spreadsheet class "
                     f"(label_policy 'image': SICAPv2's majority vote of the patch's annotations) instead of the "
                     f"mask under label_policy")
    (log.warning if absent or without_mask or unlisted else log.info)("%s: %s", root, "; ".join(parts))


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


def image_folder_jobs(root: Path) -> list[SlideJob]:
    """A folder of labelled images as torchvision's ``ImageFolder`` reads it: ``root/<class>/<image>``, the class
    being the sub-folder (``image_label``). An image one level deeper, ``root/<class>/<group>/<image>``, takes that
    folder as its group (the patient or core it comes from); elsewhere there is no group, and benchmarks then
    split by image. Images directly in ``root`` (no class) and deeper ones are counted in one line and left out.
    Each image is one small slide (``patch``): plain images carry no resolution, so tiling needs ``slide_mpp``.
    """
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise BonyError(f"{root}: no class sub-folders (an image folder holds <class>/<image> files)")
    jobs, skipped = [], 0
    for folder in folders:
        for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES):
            depth = len(path.relative_to(folder).parts)
            if depth > 2:
                skipped += 1
                continue
            jobs.append(SlideJob(slide_id=path.stem, path=path, dataset="imagefolder",
                                 group=path.parent.name if depth == 2 else "", patch=True, image_label=folder.name))
    skipped += sum(1 for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    grouped = sum(bool(job.group) for job in jobs)
    counts = ", ".join(f"{folder.name} {sum(job.image_label == folder.name for job in jobs)}" for folder in folders)
    log.info("%s: %d images in %d classes (%s), %d with a group folder%s", root, len(jobs), len(folders), counts,
             grouped, f"; {skipped} images outside <class>/ or <class>/<group>/ left out" if skipped else "")
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
    readers = {"panda": panda_jobs, "sicapv2": sicapv2_jobs, "deepgleason": deepgleason_jobs,
               "imagefolder": image_folder_jobs}
    return _checked(readers[fmt](inputs[0]))
