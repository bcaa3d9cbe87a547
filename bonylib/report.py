"""The HTML report: numbered notebooks run by papermill, then jupyter-book.

Notebooks are run here, not by the book: each gets the run folder as a papermill parameter and is
written, executed, to ``book/executed/``, which the book renders without executing again. A
notebook that raised is reported by name and fails the report; it never reaches the book as an
ordinary page.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bonylib.config import option, save_config
from bonylib.errors import BonyError
from bonylib.files import atomic_path, ensure_writable_dir

log = logging.getLogger(__name__)

EXECUTED = Path("book") / "executed"


@dataclass
class ReportConfig:
    """Options of ``bony report``."""

    notebooks: list[str] = option([], "notebook stems to run, in order (empty: every notebooks/NN_*.ipynb)")
    parameters: dict[str, dict[str, Any]] = option(
        {}, "papermill parameters per notebook stem, e.g. parameters.01_datasets.max_slides=2"
    )
    cell_timeout_s: int = option(3600, "longest a notebook cell may run")
    build: bool = option(True, "build the HTML book after running the notebooks")
    execute: bool = option(True, "run the notebooks; false: only build the book from the executed copies already in "
                                 "book/executed (those a SLURM notebook array wrote, slurm/notebook.sbatch)")


def notebook_paths(book: Path, stems: list[str]) -> list[Path]:
    """The source notebooks to run: ``stems`` in order, or every numbered notebook."""
    folder = book / "notebooks"
    if not stems:
        found = sorted(folder.glob("[0-9][0-9]_*.ipynb"))
        if not found:
            raise BonyError(f"{folder}: no numbered notebooks (NN_name.ipynb) to run")
        return found
    bad = [stem for stem in stems if not re.fullmatch(r"\d\d_[A-Za-z0-9_-]+", stem)]
    if bad:
        raise BonyError(f"notebook {bad[0]!r} is not a numbered notebook stem (NN_name, as in {folder})")
    paths = [folder / f"{stem}.ipynb" for stem in stems]
    for path in paths:
        if not path.is_file():
            raise BonyError(f"{path}: notebook not found")
    return paths


def papermill_failed(path: Path) -> bool:
    """Whether an executed notebook records a papermill exception (papermill writes it even on failure)."""
    meta = json.loads(path.read_text()).get("metadata", {}).get("papermill", {})
    return bool(meta.get("exception"))


@contextlib.contextmanager
def _environment(**values: str) -> Iterator[None]:
    """Set environment variables for the kernels started inside the block (progress bars off in the book)."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def run_notebook(source: Path, dest: Path, parameters: dict[str, Any], timeout_s: int) -> bool:
    """Execute ``source`` with ``parameters`` into ``dest``; return whether it ran without error.

    The notebook runs with its own folder as working directory, as it does in JupyterLab. What its
    cells write to stderr (logging: training progress, warnings) is streamed to this process's stderr
    while it runs, so a long chapter is not silent in the terminal.
    """
    import papermill
    from papermill.exceptions import PapermillExecutionError

    with atomic_path(dest) as tmp, _environment(TQDM_DISABLE="1"):
        try:
            papermill.execute_notebook(
                str(source), str(tmp), parameters=parameters, cwd=str(source.parent),
                kernel_name="python3", progress_bar=False, execution_timeout=timeout_s,
                stderr_file=sys.stderr,  # the kernel's log lines (training progress) reach the terminal as they come
            )
        except PapermillExecutionError as exc:
            log.error("%s failed: %s: %s", source.name, exc.ename, exc.evalue)
        if not tmp.exists() or tmp.stat().st_size == 0:
            raise BonyError(f"{source}: papermill wrote no notebook")
    return not papermill_failed(dest)


def build_book(book: Path) -> Path:
    """Build the HTML book; warnings are errors (``-W``); return the index page."""
    jb = Path(sys.executable).with_name("jupyter-book")
    cmd = [str(jb), "build", str(book), "-W", "--keep-going"]
    log.info("building the book: %s", " ".join(cmd))
    if subprocess.run(cmd, cwd=book, env={**os.environ, "PYTHONWARNINGS": "ignore"}).returncode != 0:
        raise BonyError(f"{book}: jupyter-book build failed (see its messages above)")
    index = book / "_build" / "html" / "index.html"
    if not index.is_file():
        raise BonyError(f"{index}: the book build produced no index page")
    return index


def build_report(book: Path, run: Path, cfg: ReportConfig) -> Path:
    """Run the notebooks for ``run`` and build the book under ``book``; return the HTML index page."""
    book, run = Path(book).resolve(), Path(run).resolve()
    for name in ("_config.yml", "_toc.yml"):
        if not (book / name).is_file():
            raise BonyError(f"{book}: not a book root ({name} missing)")
    sources = notebook_paths(book, list(cfg.notebooks))
    failed = []
    if cfg.execute:
        ensure_writable_dir(run)
        save_config(cfg, run / "report.yaml")
        for source in sources:
            parameters = {"run_dir": str(run), **cfg.parameters.get(source.stem, {})}
            log.info("running %s", source.name)
            if not run_notebook(source, book / EXECUTED / source.name, parameters, cfg.cell_timeout_s):
                failed.append(source.stem)
    else:
        missing = [source.stem for source in sources if not (book / EXECUTED / source.name).is_file()]
        if missing:
            raise BonyError(f"{book / EXECUTED}: no executed copy of {', '.join(missing)} (run them first, "
                            f"e.g. with slurm/notebook.sbatch)")
    stale = [p.stem for p in sorted((book / EXECUTED).glob("*.ipynb")) if papermill_failed(p)]
    failed += [s for s in stale if s not in failed]
    if failed:
        raise BonyError(f"notebooks failed: {', '.join(failed)} (executed copies with tracebacks in {book / EXECUTED})")
    return build_book(book) if cfg.build else book / EXECUTED
