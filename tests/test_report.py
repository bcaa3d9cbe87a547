"""The report: notebooks run by papermill on the smoke data, the book builds offline, a rerun runs only what changed,
and a failed notebook stops the report naming its cell and error."""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import nbformat
import pytest

from bonylib.config import load_config
from bonylib.errors import BonyError
from bonylib.report import ReportConfig, build_report
from bonylib.data.samples import shared_data_dir
from tests.conftest import SMOKE_REPORT_TIMEOUT_S, BuiltReport


@pytest.mark.slow
@pytest.mark.timeout(SMOKE_REPORT_TIMEOUT_S)
def test_notebooks_run_and_book_builds_offline(smoke_report: BuiltReport, repo: Path) -> None:
    book, run, index = smoke_report.book, smoke_report.run, smoke_report.index
    cfg = load_config(ReportConfig, repo / "configs" / "report" / "smoke.yaml")
    chapters = [p.stem for p in sorted((repo / "notebooks").glob("[0-9][0-9]_*.ipynb"))]
    assert sorted(cfg.notebooks) == chapters, "every chapter, once"
    demo = load_config(ReportConfig, repo / "configs" / "report" / "demo.yaml")
    assert demo.notebooks == cfg.notebooks, "the smoke report runs the chapters in make report's order"
    order = cfg.notebooks.index
    assert order("04_pretraining") < order("03_xcit_attention"), "the attention chapter draws the pretrained teacher"
    assert order("08_wavelet_experiment") < order("05_benchmark_panda"), "the benchmark tables list the stem's run"
    progress = re.compile(r"step \d+/\d+ \(epoch \d+/\d+\): loss [\d.]+, [\d.]+ images/s, \d+m\d\ds left")
    assert progress.search(smoke_report.stderr), "training progress is streamed to the terminal while it runs"

    executed = nbformat.read(book / "book" / "executed" / "01_datasets.ipynb", as_version=4)
    relative = os.path.relpath(run, book / "notebooks")
    assert executed.metadata.papermill.parameters["run_dir"] == relative
    injected = next(c for c in executed.cells if "injected-parameters" in c.metadata.get("tags", []))
    assert f'run_dir = "{relative}"' in injected.source and str(run) not in injected.source, "no machine paths"
    outputs = [o for c in executed.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 3, "PANDA, SICAPv2 and DeepGleason figures"
    for later in ("02_dino_theory", "04_pretraining", "03_xcit_attention", "08_wavelet_experiment", "09_results",
                  "12_report_experiments"):
        executed = nbformat.read(book / "book" / "executed" / f"{later}.ipynb", as_version=4)
        assert not [o for c in executed.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert (run / "pretrain" / "teacher_backbone.safetensors").is_file()
    stemmed = json.loads((run / "pretrain_haar_approx" / "teacher_backbone.json").read_text())
    assert stemmed["stem"] == "haar_approx", "the wavelet chapter trained and exported the report's stemmed run"
    for sweep, arms in {"out_dim": 5, "single_view": 3}.items():  # the report's experiments, every arm trained
        assert len(list((run / "sweeps" / sweep).glob("*/teacher_backbone.json"))) == arms, sweep
    assert (run / "report.yaml").is_file()

    assert index == book / "_build" / "html" / "index.html" and index.is_file()
    page = (book / "_build" / "html" / "book" / "executed" / "01_datasets.html").read_text()
    assert len(re.findall(r"<img ", page)) >= 3
    assert "_static/mathjax/tex-chtml.js" in page
    assert not re.search(r"<script[^>]+src=\"https?://", page), "no script loaded from the network"
    assert (book / "_build" / "html" / "_static" / "mathjax" / "output" / "chtml" / "fonts").is_dir()
    figures = {"03_xcit_attention": 3 if shared_data_dir() is None else 5, "08_wavelet_experiment": 2,
               "06_benchmark_deepgleason": 3, "07_benchmark_sicapv2": 2, "09_results": 1, "12_report_experiments": 2}
    for chapter, least in figures.items():  # 03: the cost plot, the demo tiles, two slide maps (+ real tiles, a scan)
        html = (book / "_build" / "html" / "book" / "executed" / f"{chapter}.html").read_text()
        assert len(re.findall(r"<img ", html)) >= least, chapter
    pretraining = (book / "_build" / "html" / "book" / "executed" / "04_pretraining.html").read_text()
    assert not progress.search(pretraining), "the book shows the run's results, not its progress lines"
    assert "precision fp32" in pretraining


@pytest.mark.slow
@pytest.mark.timeout(SMOKE_REPORT_TIMEOUT_S)
def test_a_rerun_with_nothing_changed_runs_no_chapter(smoke_report: BuiltReport, repo: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    """Every chapter's notebook, parameters, named configs and run files (notebooks/run_files.yaml) are as the first
    run left them, so none runs again: the chapters that rewrite what they read (the results page rewrites the
    results table) record the files as they left them."""
    executed = smoke_report.book / "book" / "executed"
    before = {p.name: p.stat().st_mtime_ns for p in executed.glob("*.ipynb")}
    cfg = load_config(ReportConfig, repo / "configs" / "report" / "smoke.yaml", ["build=false"])
    with caplog.at_level(logging.INFO, logger="bonylib.report"):
        build_report(smoke_report.book, smoke_report.run, cfg)
    skipped = [r.getMessage().split(":")[0] for r in caplog.records if "up to date" in r.getMessage()]
    assert skipped == cfg.notebooks and not [r for r in caplog.records if r.getMessage().startswith("running ")]
    assert {p.name: p.stat().st_mtime_ns for p in executed.glob("*.ipynb")} == before


def notebook(path: Path, *cells: str, parameters: str = "run_dir = ''") -> None:
    """A notebook of a markdown title, a parameters cell and ``cells`` (code)."""
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell(parameters)
    params.metadata["tags"] = ["parameters"]
    nb.cells = [nbformat.v4.new_markdown_cell(f"# {path.stem}"), params, *map(nbformat.v4.new_code_cell, cells)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)


def small_book(root: Path, run_files: str = "") -> Path:
    book = root / "book_root"
    (book / "notebooks").mkdir(parents=True)
    (book / "_config.yml").write_text("title: t\n")
    (book / "_toc.yml").write_text("format: jb-book\nroot: intro\n")
    if run_files:
        (book / "notebooks" / "run_files.yaml").write_text(run_files)
    return book


def failing_notebook(path: Path) -> None:
    notebook(path, "raise ValueError('stage broke')")


LOGGED = "from pathlib import Path\nwith open(Path(run_dir, 'ran.log'), 'a') as log: log.write('{}\\n')"


def test_a_rerun_runs_only_the_chapters_whose_inputs_changed(tmp_path: Path) -> None:
    """01 writes made.txt; 02 reads it and the config file its parameter names, and writes used.txt; 03 lists no run
    files. Each appends its number to ran.log when it runs."""
    book = small_book(tmp_path, "01_make: [made.txt]\n02_use: [made.txt, used.txt]\n")
    folder = book / "notebooks"
    notebook(folder / "01_make.ipynb", LOGGED.format("01"), "Path(run_dir, 'made.txt').write_text('x' * size)",
             parameters="run_dir = ''\nsize = 3")
    use = "Path(run_dir, 'used.txt').write_text(Path(run_dir, 'made.txt').read_text() + Path(config).read_text())"
    notebook(folder / "02_use.ipynb", LOGGED.format("02"), use, parameters="run_dir = ''\nconfig = '../conf.txt'")
    notebook(folder / "03_free.ipynb", LOGGED.format("03"))
    (book / "conf.txt").write_text("a")
    run = tmp_path / "run"

    def report(**changes: object) -> list[str]:
        """The chapters that ran in one report (without the book)."""
        seen = (run / "ran.log").read_text().split() if (run / "ran.log").exists() else []
        options = {k: changes.pop(k) for k in ("only", "force") if k in changes}
        build_report(book, run, ReportConfig(build=False, **changes), **options)
        return (run / "ran.log").read_text().split()[len(seen):]

    assert report() == ["01", "02", "03"]
    assert report() == ["03"], "up to date, except the chapter that lists no run files"
    two = {"notebooks": ["01_make", "02_use"]}
    assert report(**two, parameters={"01_make": {"size": 4}}) == ["01", "02"], "01's parameter, then 02's input"
    assert report(**two, parameters={"01_make": {"size": 4}}) == []
    (book / "conf.txt").write_text("b")
    assert report(**two, parameters={"01_make": {"size": 4}}) == ["02"], "a file that a parameter names"
    notebook(folder / "02_use.ipynb", LOGGED.format("02"), use, "1 + 1", parameters="run_dir = ''\nconfig = '../conf.txt'")
    assert report(**two, parameters={"01_make": {"size": 4}}) == ["02"], "the notebook itself"
    (run / "used.txt").write_text("tampered")
    assert report(**two, parameters={"01_make": {"size": 4}}) == ["02"], "a run file it writes"
    assert (run / "used.txt").read_text() == "xxxxb"
    assert report(**two, parameters={"01_make": {"size": 4}}, only=["02"]) == ["02"], "--only runs it anyway"
    assert report(**two, parameters={"01_make": {"size": 4}}, force=True) == ["01", "02"]
    with pytest.raises(BonyError, match=r"--only 07: no such notebook in this report \(01_make, 02_use\)"):
        report(**two, only=["07"])


def test_a_failed_notebook_stops_the_report_naming_cell_and_error(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from bonylib.cli import main

    book = small_book(tmp_path)
    folder = book / "notebooks"
    notebook(folder / "01_fine.ipynb", "x = 1")
    notebook(folder / "02_broken.ipynb", "y = 2", "raise ValueError('stage broke')")
    notebook(folder / "03_after.ipynb", "from pathlib import Path\nPath(run_dir, 'after.txt').write_text('ran')")
    run = tmp_path / "run"
    assert main(["report", "--run", str(run), "--book", str(book)]) == 2
    copy = book / "book" / "executed" / "02_broken.ipynb"
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"bony report: error: 02_broken failed at cell 4 (In [4]): ValueError: stage broke (traceback in {copy}); "
        f"the chapters after it were not run")
    assert json.loads(copy.read_text())["metadata"]["papermill"]["exception"] is True, "the failed copy is kept"
    assert not (run / "after.txt").exists() and not (book / "book" / "executed" / "03_after.ipynb").exists()
    assert not (book / "_build").exists(), "no book is built over a failed notebook"


def test_not_a_book_root(tmp_path: Path) -> None:
    with pytest.raises(BonyError, match="_config.yml missing"):
        build_report(tmp_path, tmp_path / "run", ReportConfig())


def test_a_notebook_stem_never_names_a_path(tmp_path: Path) -> None:
    book = tmp_path / "book_root"
    (book / "notebooks").mkdir(parents=True)
    for name in ("_config.yml", "_toc.yml"):
        (book / name).write_text("title: t\n")
    for stem in ("../01_x", "01_x/../../y", "datasets"):
        with pytest.raises(BonyError, match="not a numbered notebook stem"):
            build_report(book, tmp_path / "run", ReportConfig(notebooks=[stem]))


def test_build_only_names_the_chapters_that_were_not_run(tmp_path: Path) -> None:
    book = tmp_path / "book_root"
    (book / "notebooks").mkdir(parents=True)
    (book / "book" / "executed").mkdir(parents=True)
    for name in ("_config.yml", "_toc.yml"):
        (book / name).write_text("title: t\n")
    for stem in ("01_a", "02_b", "03_c"):
        failing_notebook(book / "notebooks" / f"{stem}.ipynb")
    failing_notebook(book / "book" / "executed" / "02_b.ipynb")
    with pytest.raises(BonyError, match=r"no executed copy of 01_a, 03_c \(run them first"):
        build_report(book, tmp_path / "run", ReportConfig(execute=False))
    assert not (tmp_path / "run").exists(), "building only writes nothing into the run"


def test_a_parameters_file_reaches_the_notebook(tmp_path: Path) -> None:
    """What a notebook array task does: one notebook, its papermill parameters from a YAML file."""
    from bonylib.cli import main
    from tests.test_hostile_inputs import who_book

    book = who_book(tmp_path)
    (tmp_path / "params.yaml").write_text("who: array task 3\n")
    run = tmp_path / "run"
    assert main(["report", "--run", str(run), "--book", str(book), "--parameters", str(tmp_path / "params.yaml"),
                 "notebooks=[01_who]", "build=false"]) == 0
    assert (run / "who.txt").read_text() == "array task 3"
    (tmp_path / "params.yaml").write_text("- not a mapping\n")
    assert main(["report", "--run", str(run), "--book", str(book), "--parameters", str(tmp_path / "params.yaml"),
                 "notebooks=[01_who]", "build=false"]) == 2
