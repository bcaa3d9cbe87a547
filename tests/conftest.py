"""Shared fixtures: the repository root, the smoke datasets (written once), the real sample scans, the smoke report."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from bonylib.config import load_config
from bonylib.data.samples import shared_data_dir
from bonylib.data.synthetic import SynthConfig, synthesize
from bonylib.report import ReportConfig, build_report
from bonylib.runtime import busy_cpus, plan_threads

REPO = Path(__file__).resolve().parent.parent

# Runs that a test compares bit for bit must use one thread count (another count sums in another order), and the
# trainer would change it with the machine's load (bonylib.runtime.plan_threads): pinned here for the session, and
# the notebooks the tests run, at what the load leaves when the session starts. tests/test_runtime.py unsets it to
# test the adaptation.
os.environ.setdefault("OMP_NUM_THREADS", str(plan_threads(0, busy=busy_cpus()).torch_threads))


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def smoke_config() -> SynthConfig:
    return load_config(SynthConfig, REPO / "configs" / "synth" / "smoke.yaml")


@pytest.fixture(scope="session")
def smoke_data(tmp_path_factory: pytest.TempPathFactory, smoke_config: SynthConfig) -> Path:
    """All three synthetic datasets at smoke size, written once per test session."""
    root = tmp_path_factory.mktemp("synth")
    synthesize("all", root, smoke_config)
    return root


@pytest.fixture(scope="session")
def images(smoke_data: Path) -> Path:
    """The smoke DeepGleason tiles: a folder of images the pretraining tests train on (``data.images=``)."""
    return smoke_data / "deepgleason" / "tiles"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    folder = shared_data_dir()
    if folder is None:
        pytest.skip("../shared/data (real sample scans) is not present")
    return folder


def book_copy(repo: Path, dest: Path) -> Path:
    """The book's own files (config, TOC, pages, notebooks, configs) in a scratch folder."""
    dest.mkdir()
    for name in ("_config.yml", "_toc.yml"):
        shutil.copy(repo / name, dest / name)
    shutil.copytree(repo / "book", dest / "book", ignore=shutil.ignore_patterns("executed"))
    shutil.copytree(repo / "notebooks", dest / "notebooks", ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    shutil.copytree(repo / "configs", dest / "configs")
    return dest


@dataclass(frozen=True)
class BuiltReport:
    """A report run and built once: its book root, run folder, HTML index page and what it streamed to stderr."""

    book: Path
    run: Path
    index: Path
    stderr: str


SMOKE_REPORT_TIMEOUT_S = 3600
"""pytest-timeout's limit for a test that uses :func:`smoke_report`: the first such test pays for building the
whole smoke report in its set-up (4-5 minutes on 2 free cores, 15 under the load of other jobs)."""


@pytest.fixture(scope="session")
def smoke_report(tmp_path_factory: pytest.TempPathFactory, smoke_data: Path) -> BuiltReport:
    """Every chapter of configs/report/smoke.yaml run on the smoke datasets and the book built, once per session:
    the report tests check its notebooks and pages, the browser test visits them."""
    if not (REPO / "book" / "_static" / "mathjax" / "tex-chtml.js").is_file():
        pytest.skip("MathJax is not vendored (make does it before the tests)")
    root = tmp_path_factory.mktemp("report")
    book = book_copy(REPO, root / "book_root")
    run = root / "run"
    run.mkdir()
    (run / "data").symlink_to(smoke_data)
    cfg = load_config(ReportConfig, REPO / "configs" / "report" / "smoke.yaml")
    streamed = io.StringIO()
    try:
        with contextlib.redirect_stderr(streamed):  # papermill streams the kernels' stderr to sys.stderr
            index = build_report(book, run, cfg)
    except BaseException:
        sys.__stderr__.write(streamed.getvalue()[-20000:])
        raise
    return BuiltReport(book, run, index, streamed.getvalue())
