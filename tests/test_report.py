"""The report: notebooks run by papermill on the smoke data, a failed notebook fails it, the book builds offline."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import nbformat
import pytest

from bonylib.config import load_config
from bonylib.errors import BonyError
from bonylib.report import ReportConfig, build_report
from bonylib.data.samples import shared_data_dir


def book_copy(repo: Path, dest: Path) -> Path:
    """The book's own files (config, TOC, pages, notebooks) in a scratch folder."""
    dest.mkdir()
    for name in ("_config.yml", "_toc.yml"):
        shutil.copy(repo / name, dest / name)
    shutil.copytree(repo / "book", dest / "book", ignore=shutil.ignore_patterns("executed"))
    shutil.copytree(repo / "notebooks", dest / "notebooks", ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    shutil.copytree(repo / "configs", dest / "configs")
    return dest


@pytest.mark.slow
def test_notebooks_run_and_book_builds_offline(tmp_path: Path, repo: Path, smoke_data: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    if not (repo / "book" / "_static" / "mathjax" / "tex-chtml.js").is_file():
        pytest.skip("MathJax is not vendored (make does it before the tests)")
    book = book_copy(repo, tmp_path / "book_root")
    run = tmp_path / "run"
    run.mkdir()
    (run / "data").symlink_to(smoke_data)
    cfg = load_config(ReportConfig, repo / "configs" / "report" / "smoke.yaml")
    chapters = [p.stem for p in sorted((repo / "notebooks").glob("[0-9][0-9]_*.ipynb"))]
    assert sorted(cfg.notebooks) == chapters, "every chapter, once"
    demo = load_config(ReportConfig, repo / "configs" / "report" / "demo.yaml")
    assert demo.notebooks == cfg.notebooks, "the smoke report runs the chapters in make report's order"
    order = cfg.notebooks.index
    assert order("04_pretraining") < order("03_xcit_attention"), "the attention chapter draws the pretrained teacher"
    assert order("08_wavelet_experiment") < order("05_benchmark_panda"), "the benchmark tables list the stem's run"
    index = build_report(book, run, cfg)
    progress = re.compile(r"step \d+/\d+ \(epoch \d+/\d+\): loss [\d.]+, [\d.]+ images/s, \d+m\d\ds left")
    assert progress.search(capsys.readouterr().err), "training progress is streamed to the terminal while it runs"

    executed = nbformat.read(book / "book" / "executed" / "01_datasets.ipynb", as_version=4)
    assert executed.metadata.papermill.parameters["run_dir"] == str(run)
    outputs = [o for c in executed.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 3, "PANDA, SICAPv2 and DeepGleason figures"
    for later in ("02_dino_theory", "04_pretraining", "03_xcit_attention", "08_wavelet_experiment"):
        executed = nbformat.read(book / "book" / "executed" / f"{later}.ipynb", as_version=4)
        assert not [o for c in executed.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert (run / "pretrain" / "teacher_backbone.safetensors").is_file()
    stemmed = json.loads((run / "pretrain_haar" / "teacher_backbone.json").read_text())
    assert stemmed["stem"] == "haar_bands", "the wavelet chapter trained and exported the stemmed run"
    assert (run / "report.yaml").is_file()

    assert index == book / "_build" / "html" / "index.html" and index.is_file()
    page = (book / "_build" / "html" / "book" / "executed" / "01_datasets.html").read_text()
    assert len(re.findall(r"<img ", page)) >= 3
    assert "_static/mathjax/tex-chtml.js" in page
    assert not re.search(r"<script[^>]+src=\"https?://", page), "no script loaded from the network"
    assert (book / "_build" / "html" / "_static" / "mathjax" / "output" / "chtml" / "fonts").is_dir()
    figures = {"03_xcit_attention": 3 if shared_data_dir() is None else 5, "08_wavelet_experiment": 2}
    for chapter, least in figures.items():  # 03: the cost plot, the demo tiles, two slide maps (+ real tiles, a scan)
        html = (book / "_build" / "html" / "book" / "executed" / f"{chapter}.html").read_text()
        assert len(re.findall(r"<img ", html)) >= least, chapter
    pretraining = (book / "_build" / "html" / "book" / "executed" / "04_pretraining.html").read_text()
    assert not progress.search(pretraining), "the book shows the run's results, not its progress lines"
    assert "precision fp32" in pretraining


def failing_notebook(path: Path) -> None:
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell("run_dir = ''")
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell("raise ValueError('stage broke')")]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)


def test_failed_notebook_fails_the_report(tmp_path: Path) -> None:
    book = tmp_path / "book_root"
    (book / "notebooks").mkdir(parents=True)
    (book / "_config.yml").write_text("title: t\n")
    (book / "_toc.yml").write_text("format: jb-book\nroot: intro\n")
    failing_notebook(book / "notebooks" / "01_broken.ipynb")
    with pytest.raises(BonyError, match="01_broken"):
        build_report(book, tmp_path / "run", ReportConfig())
    executed = json.loads((book / "book" / "executed" / "01_broken.ipynb").read_text())
    assert executed["metadata"]["papermill"]["exception"] is True
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

    book = tmp_path / "book_root"
    (book / "notebooks").mkdir(parents=True)
    for name in ("_config.yml", "_toc.yml"):
        (book / name).write_text("title: t\n")
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell("run_dir = ''\nwho = 'default'")
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell("open(run_dir + '/who.txt', 'w').write(who)")]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, book / "notebooks" / "01_who.ipynb")
    (tmp_path / "params.yaml").write_text("who: array task 3\n")
    run = tmp_path / "run"
    assert main(["report", "--run", str(run), "--book", str(book), "--parameters", str(tmp_path / "params.yaml"),
                 "notebooks=[01_who]", "build=false"]) == 0
    assert (run / "who.txt").read_text() == "array task 3"
    (tmp_path / "params.yaml").write_text("- not a mapping\n")
    assert main(["report", "--run", str(run), "--book", str(book), "--parameters", str(tmp_path / "params.yaml"),
                 "notebooks=[01_who]", "build=false"]) == 2
