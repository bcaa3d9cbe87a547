"""What to tile: the slides of a dataset folder, each with its mask, encoding and grouping.

``bony tile --format panda|sicapv2|deepgleason|slides`` turns a dataset folder (or a list of slide
files) into :class:`SlideJob` records. Problems that belong to one slide (an unknown provider, a
duplicate id, a missing mask) do not stop the listing: the job carries the error and the tiler
records it as that slide's failure.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path

import pandas as pd

from bonylib.data.slides import IMAGE_SUFFIXES, TIFF_SUFFIXES
from bonylib.errors import BonyError

FORMATS: tuple[str, ...] = ("panda", "sicapv2", "deepgleason", "slides")
SLIDE_SUFFIXES = frozenset(TIFF_SUFFIXES | IMAGE_SUFFIXES | {".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide"})
SICAPV2_MPP = 1.0  # SICAPv2 patches are 10x
DEEPGLEASON_MPP = 0.5


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


def _flag_duplicates(jobs: list[SlideJob]) -> list[SlideJob]:
    """Every slide after the first with an id already seen gets an error instead of overwriting it."""
    first: dict[str, Path] = {}
    out = []
    for job in jobs:
        if job.slide_id in first and not job.error:
            job = replace(job, error=f"duplicate slide id '{job.slide_id}' (first seen in {first[job.slide_id]})")
        first.setdefault(job.slide_id, job.path)
        out.append(job)
    return out


def panda_jobs(root: Path) -> list[SlideJob]:
    """PANDA: rows of ``train.csv``; masks in ``train_label_masks``, encoding by ``data_provider``."""
    csv = root / "train.csv"
    if not csv.is_file():
        raise BonyError(f"{root}: not a PANDA folder (train.csv missing)")
    table = pd.read_csv(csv, dtype=str)
    missing = {"image_id", "data_provider"} - set(table.columns)
    if missing:
        raise BonyError(f"{csv}: missing columns {sorted(missing)}")
    jobs = []
    for row in table.itertuples():
        provider = str(row.data_provider)
        error = "" if provider in ("radboud", "karolinska") else f"unknown data_provider '{provider}' (radboud or karolinska)"
        jobs.append(SlideJob(
            slide_id=str(row.image_id),
            path=root / "train_images" / f"{row.image_id}.tiff",
            dataset="panda",
            mask=root / "train_label_masks" / f"{row.image_id}_mask.tiff",
            encoding=provider if not error else None,
            provider=provider,
            group=str(row.image_id),
            error=error,
        ))
    return _flag_duplicates(jobs)


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
            split.update({str(n): name.lower() for n in pd.read_excel(sheet)["image_name"]})
    jobs = []
    for path in sorted(images.glob("*.jpg")):
        match = _SICAP_NAME.match(path.stem)
        jobs.append(SlideJob(
            slide_id=path.stem, path=path, dataset="sicapv2", mask=root / "masks" / path.name, encoding="sicapv2",
            provider="sicapv2", group=match["slide"] if match else path.stem,
            split=split.get(path.name, ""), mpp=SICAPV2_MPP, patch=True,
        ))
    return _flag_duplicates(jobs)


def deepgleason_jobs(root: Path) -> list[SlideJob]:
    """DeepGleason-style: each tile of ``tiles.csv`` is a one-level slide with its PNG mask."""
    csv = root / "tiles.csv"
    if not csv.is_file():
        raise BonyError(f"{root}: not a DeepGleason-style folder (tiles.csv missing)")
    table = pd.read_csv(csv, dtype=str)
    jobs = [
        SlideJob(slide_id=row.tile_id, path=root / row.image, dataset="deepgleason", mask=root / row.mask, encoding="deepgleason",
                 provider="deepgleason", group=row.slide_id, split=row.split, mpp=DEEPGLEASON_MPP, patch=True)
        for row in table.itertuples()
    ]
    return _flag_duplicates(jobs)


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
    return _flag_duplicates([SlideJob(slide_id=p.stem, path=p, group=p.stem) for p in paths])


def list_jobs(fmt: str, inputs: list[Path]) -> list[SlideJob]:
    """The slides to tile for ``fmt``; dataset formats take exactly one folder."""
    if fmt not in FORMATS:
        raise BonyError(f"unknown format '{fmt}' (choose from {', '.join(FORMATS)})")
    if fmt == "slides":
        return slide_files_jobs(inputs)
    if len(inputs) != 1 or not inputs[0].is_dir():
        raise BonyError(f"--format {fmt} takes one dataset folder, got {', '.join(map(str, inputs))}")
    return {"panda": panda_jobs, "sicapv2": sicapv2_jobs, "deepgleason": deepgleason_jobs}[fmt](inputs[0])
