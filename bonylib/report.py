"""The HTML report: numbered notebooks run by papermill, then jupyter-book.

Notebooks are run here, not by the book: each gets the run folder as a papermill parameter (relative to the
notebook's folder, where it runs, so the page shows ``../runs/demo`` rather than this machine's paths) and is
written, executed, to ``book/executed/``, which the book renders without executing again.

A chapter runs again only when something it depends on changed: its notebook, its parameters, the files its
parameters name (configs, recipes), or the files it reads and writes in the run folder, which
``notebooks/run_files.yaml`` lists per chapter. All of these are compared by content, and the executed copy
records what it was made from (``metadata.bony.report_key``); a chapter that is not listed there runs every
time. Changes to ``bonylib`` itself are not tracked: ``--only NN`` or ``--force`` reruns after one.

The first notebook that raises stops the report with one line naming it, the cell and the error's last line;
its executed copy (with the traceback) is kept, the chapters after it are not run on inputs it did not make,
and no book is built over it.

Parameters are input: papermill writes each key into the injected cell as it is, so a key must be a plain Python
identifier (``x = 1; import os; ...`` would run), and each value a type papermill writes back as itself (None, a
bool, a number, text, lists and mappings of them; a YAML date would arrive as text, a set as its repr).
:func:`check_parameters` refuses anything else in one line, before anything is saved or run.
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import json
import keyword
import logging
import os
import re
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bonylib.config import option, read_mapping, save_config
from bonylib.errors import BonyError, ConfigError
from bonylib.files import atomic_path, ensure_writable_dir, sha256_file, sha256_json

log = logging.getLogger(__name__)

EXECUTED = Path("book") / "executed"
RUN_FILES = Path("notebooks") / "run_files.yaml"
"""Per chapter, the paths in the run folder it reads or writes (relative to the run folder)."""
KEY_FORMAT = 1
"""Version of what the report key covers: a change here reruns every chapter once."""
PAPERMILL_CELLS = ("injected-parameters", "papermill-error-cell-tag")
"""Tags of the cells papermill adds to an executed copy (not counted when naming a notebook's cell)."""


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

    def __post_init__(self) -> None:
        if self.cell_timeout_s < 1:
            raise ConfigError(f"cell_timeout_s must be at least 1 second, got {self.cell_timeout_s}")
        for stem, values in self.parameters.items():
            if not re.fullmatch(r"\d\d_[A-Za-z0-9_-]+", str(stem)):
                raise ConfigError(f"parameters: {stem!r} is not a numbered notebook stem (NN_name)")
            if not isinstance(values, dict):
                raise ConfigError(f"parameters.{stem}: a mapping of parameter names to values, not a "
                                  f"{type(values).__name__}")
            check_parameters(values, f"parameters.{stem}")


def _value_problem(value: Any) -> str:
    """Why papermill would not hand ``value`` to a notebook as itself, or "" (it writes None, bools, numbers and text
    as literals, lists and text-keyed mappings of them recursively, and anything else as the text of its repr)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return ""
    if isinstance(value, list):
        return next((problem for problem in map(_value_problem, value) if problem), "")
    if isinstance(value, dict):
        keys = [key for key in value if not isinstance(key, str)]
        if keys:
            return f"a mapping key {keys[0]!r} that is not text"
        return next((problem for problem in map(_value_problem, value.values()) if problem), "")
    return f"a {type(value).__name__} ({' '.join(repr(value).split())[:80]})"


def check_parameters(parameters: dict[Any, Any], where: str) -> None:
    """Refuse notebook parameters that papermill cannot pass safely: a key that is not a Python identifier, or is a
    keyword (it is pasted into the injected cell as code), and a value it would not write back as itself
    (:func:`_value_problem`). One :class:`ConfigError` line naming ``where`` (a file, or the config key) and the key."""
    for key, value in parameters.items():
        if not isinstance(key, str) or not key.isidentifier() or keyword.iskeyword(key):
            raise ConfigError(f"{where}: parameter {' '.join(repr(key).split())[:80]} is not a Python name (letters, "
                              f"digits and '_', not starting with a digit, not a keyword): papermill writes it into "
                              f"the notebook as code")
        problem = _value_problem(value)
        if problem:
            raise ConfigError(f"{where}: parameter {key!r} holds {problem}, which papermill cannot pass to the notebook "
                              f"as itself (use text, a number, true/false, null, or lists and mappings of them)")


@dataclass(frozen=True)
class Failure:
    """Where an executed notebook raised: the cell (counted in the source notebook, from 1), its execution count,
    and the last line of the error."""

    cell: int
    execution_count: int | None
    last_line: str

    def describe(self, name: str, executed: Path) -> str:
        """One line for the terminal: notebook, cell, error, and where the traceback is."""
        count = f" (In [{self.execution_count}])" if self.execution_count else ""
        where = f" at cell {self.cell}{count}" if self.cell else ""
        return f"{name} failed{where}: {self.last_line} (traceback in {executed})"


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


def select(sources: Sequence[Path], only: Sequence[str]) -> list[Path]:
    """The notebooks of ``sources`` that ``only`` names, by number (``05``) or stem (``05_benchmark_panda``)."""
    chosen = []
    for name in only:
        matches = [s for s in sources if s.stem == name or s.stem.split("_", 1)[0] == name]
        if not matches:
            raise BonyError(f"--only {name}: no such notebook in this report ({', '.join(s.stem for s in sources)})")
        chosen += [m for m in matches if m not in chosen]
    return [s for s in sources if s in chosen]


def _read_notebook(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise BonyError(f"{path}: not a readable notebook ({exc})") from None


def failure_of(path: Path) -> Failure | None:
    """Where the executed notebook ``path`` raised, or None when papermill records no exception."""
    nb = _read_notebook(path)
    if not nb.get("metadata", {}).get("papermill", {}).get("exception"):
        return None
    number = 0
    for cell in nb.get("cells", []):
        if set(cell.get("metadata", {}).get("tags", [])) & set(PAPERMILL_CELLS):
            continue
        number += 1
        if cell.get("metadata", {}).get("papermill", {}).get("exception"):
            errors = [o for o in cell.get("outputs", []) if o.get("output_type") == "error"]
            text = f"{errors[-1].get('ename', 'Error')}: {errors[-1].get('evalue', '')}" if errors else "no error output"
            lines = [line for line in text.splitlines() if line.strip()] or [text]
            return Failure(number, cell.get("execution_count"), lines[-1].strip())
    return Failure(0, None, "the kernel stopped outside any cell")


def papermill_failed(path: Path) -> bool:
    """Whether an executed notebook records a papermill exception (papermill writes it even on failure)."""
    return failure_of(path) is not None


class Fingerprints:
    """Content digests of files and folders, each file read once per report (memoised by its size and time)."""

    def __init__(self) -> None:
        self._files: dict[tuple[str, int, int], str] = {}

    def file(self, path: Path) -> str:
        stat = path.stat()
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        if key not in self._files:
            self._files[key] = sha256_file(path)
        return self._files[key]

    def path(self, path: Path) -> str:
        """A file's SHA-256; a folder's over its files' names and digests (hidden files, such as the temporaries of
        atomic writes and locks, left out); ``"absent"`` when there is nothing."""
        if path.is_file():
            return self.file(path)
        if not path.is_dir():
            return "absent"
        digest = hashlib.sha256()
        for folder, dirs, files in os.walk(path, followlinks=True):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(f for f in files if not f.startswith(".")):
                file = Path(folder) / name
                digest.update(f"{file.relative_to(path)}\0{self.file(file)}\n".encode())
        return digest.hexdigest()


def read_run_files(book: Path) -> dict[str, list[str]]:
    """:data:`RUN_FILES` of ``book``: chapter stem -> paths relative to the run folder (none listed: {})."""
    path = book / RUN_FILES
    if not path.is_file():
        return {}
    listed = read_mapping(path)
    for stem, paths in listed.items():
        if not isinstance(paths, list) or not all(isinstance(p, str) and p for p in paths):
            raise BonyError(f"{path}: {stem} must list paths in the run folder (a YAML list of strings)")
        outside = [p for p in paths if Path(p).is_absolute() or ".." in Path(p).parts]
        if outside:
            raise BonyError(f"{path}: {stem}: {outside[0]!r} is not a path inside the run folder")
    return listed


def _parameter_defaults(source: Path) -> dict[str, Any]:
    """The values of the notebook's parameters cell that are Python literals (papermill's own reading of the cell)."""
    import papermill

    defaults = {}
    for name, entry in papermill.inspect_notebook(str(source)).items():
        with contextlib.suppress(ValueError, SyntaxError, TypeError):
            defaults[name] = ast.literal_eval(str(entry["default"]))
    return defaults


def _named_files(values: Any, folder: Path) -> Iterator[Path]:
    """The existing files that string parameters name (a config, a recipe), relative paths taken from ``folder``."""
    if isinstance(values, dict):
        for value in values.values():
            yield from _named_files(value, folder)
    elif isinstance(values, (list, tuple)):
        for value in values:
            yield from _named_files(value, folder)
    elif isinstance(values, str) and values and "\n" not in values and len(values) < 4096:
        path = folder / values
        with contextlib.suppress(OSError):
            if path.is_file():
                yield path.resolve()


def report_key(source: Path, parameters: dict[str, Any], run: Path, run_files: Sequence[str] | None,
               fingerprints: Fingerprints) -> str | None:
    """What a chapter's executed copy was made from, as one digest: the notebook's bytes, its parameters, the files
    they name, and ``run_files`` in ``run`` (None: the chapter lists none, and runs every time)."""
    if run_files is None:
        return None
    effective = {**_parameter_defaults(source), **parameters}
    payload = {
        "format": KEY_FORMAT,
        "notebook": fingerprints.file(source),
        "parameters": parameters,
        "named_files": {str(p): fingerprints.file(p) for p in sorted(set(_named_files(effective, source.parent)))},
        "run_files": {p: fingerprints.path(run / p) for p in run_files},
    }
    return sha256_json(payload)


def recorded_key(executed: Path) -> str | None:
    """The key an executed copy was made with (None: no copy, a failed one, or one from before keys)."""
    if not executed.is_file():
        return None
    nb = _read_notebook(executed)
    if nb.get("metadata", {}).get("papermill", {}).get("exception"):
        return None
    return nb.get("metadata", {}).get("bony", {}).get("report_key")


def _record_key(executed: Path, key: str) -> None:
    nb = _read_notebook(executed)
    nb.setdefault("metadata", {}).setdefault("bony", {})["report_key"] = key
    with atomic_path(executed) as tmp:
        tmp.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")


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


def run_notebook(source: Path, dest: Path, parameters: dict[str, Any], timeout_s: int) -> Failure | None:
    """Execute ``source`` with ``parameters`` into ``dest``; return where it failed, or None.

    The notebook runs with its own folder as working directory, as it does in JupyterLab. What its
    cells write to stderr (logging: training progress, warnings) is streamed to this process's stderr
    while it runs, so a long chapter is not silent in the terminal. A failed run's copy is kept.
    """
    import papermill
    from nbclient.exceptions import CellTimeoutError, DeadKernelError
    from papermill.exceptions import PapermillExecutionError

    stopped = None
    with atomic_path(dest) as tmp, _environment(TQDM_DISABLE="1"):
        try:
            papermill.execute_notebook(
                str(source), str(tmp), parameters=parameters, cwd=str(source.parent),
                kernel_name="python3", progress_bar=False, execution_timeout=timeout_s,
                stderr_file=sys.stderr,  # the kernel's log lines (training progress) reach the terminal as they come
            )
        except PapermillExecutionError:
            pass  # the copy records the failed cell and its error
        except (CellTimeoutError, DeadKernelError) as exc:
            stopped = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
        if not tmp.exists() or tmp.stat().st_size == 0:
            raise BonyError(f"{source}: papermill wrote no notebook")
    failure = failure_of(dest)
    if stopped:  # a timeout or a dead kernel: the error is the exception's, the cell the one papermill marked
        failure = Failure(failure.cell if failure else 0, failure.execution_count if failure else None, stopped)
    return failure


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


def _execute(book: Path, run: Path, cfg: ReportConfig, sources: Sequence[Path], forced: Sequence[Path]) -> list[str]:
    """Run the notebooks of ``sources`` that are out of date (or ``forced``) in order; return the stems that ran.
    The first failure raises, after its copy is written."""
    run_files = read_run_files(book)
    fingerprints = Fingerprints()
    ran = []
    for source in sources:
        dest = book / EXECUTED / source.name
        parameters = {"run_dir": os.path.relpath(run, source.parent), **cfg.parameters.get(source.stem, {})}
        key = report_key(source, parameters, run, run_files.get(source.stem), fingerprints)
        if source not in forced and key is not None and recorded_key(dest) == key:
            log.info("%s: up to date (notebook, parameters and run files unchanged), not run", source.stem)
            continue
        log.info("running %s", source.name)
        failure = run_notebook(source, dest, parameters, cfg.cell_timeout_s)
        if failure is not None:
            raise BonyError(failure.describe(source.stem, dest) + "; the chapters after it were not run")
        ran.append(source.stem)
        key = report_key(source, parameters, run, run_files.get(source.stem), fingerprints)
        if key is not None:  # the run files as the chapter left them (it may rewrite what it reads)
            _record_key(dest, key)
    return ran


def build_report(book: Path, run: Path, cfg: ReportConfig, only: Sequence[str] = (), force: bool = False) -> Path:
    """Run the notebooks for ``run`` that are out of date and build the book under ``book``; return the HTML index
    page (or the executed folder without ``build``). ``only``: run just these notebooks (numbers or stems), whatever
    the record says; ``force``: run every notebook."""
    book, run = Path(book).resolve(), Path(run).resolve()
    for name in ("_config.yml", "_toc.yml"):
        if not (book / name).is_file():
            raise BonyError(f"{book}: not a book root ({name} missing)")
    sources = notebook_paths(book, list(cfg.notebooks))
    if cfg.execute:
        ensure_writable_dir(run)
        save_config(cfg, run / "report.yaml")
        chosen = select(sources, only) if only else sources
        _execute(book, run, cfg, chosen, chosen if (force or only) else [])
    missing = [source.stem for source in sources if not (book / EXECUTED / source.name).is_file()]
    if missing:
        raise BonyError(f"{book / EXECUTED}: no executed copy of {', '.join(missing)} (run them first, "
                        f"e.g. with slurm/notebook.sbatch)")
    for path in sorted((book / EXECUTED).glob("*.ipynb")):
        failure = failure_of(path)
        if failure is not None:
            raise BonyError(failure.describe(path.stem, path) + "; no book is built over it")
    return build_book(book) if cfg.build else book / EXECUTED
