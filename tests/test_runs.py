"""Reading pretraining runs: the log as tables (a line cut by a kill skipped), a run's summary against a hand
computation, and the settings two runs trained differently (run-only keys and defaults left out)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from bonylib.compose.pretrain import PretrainConfig, require_same_budget, training_differences
from bonylib.config import dump_config, load_config
from bonylib.errors import BonyError
from bonylib.ssl.runs import training_log, training_summary


def _step(step: int, loss: float, speed: float, memory: float = 100.0) -> dict:
    return {"step": step, "epoch": 0, "loss": loss, "teacher_entropy": loss - 1, "collapse_entropy": 5.5,
            "images_per_s": speed, "peak_memory_mb": memory}


def _run(folder: Path, records: list[dict], cut: bool = False) -> Path:
    folder.mkdir(parents=True)
    text = "".join(json.dumps(r) + "\n" for r in records)
    (folder / "log.jsonl").write_text(text + ('{"step": 99, "lo' if cut else ""))
    return folder


def test_log_tables_and_summary(tmp_path: Path) -> None:
    records = [_step(5, 5.0, 1.0), _step(10, 4.0, 30.0, 120.0), _step(15, 3.0, 20.0),
               {"step": 15, "epoch": 0, "knn_accuracy": 0.7, "knn_balanced_accuracy": 0.4,
                "knn_balanced_accuracy_cancer": 0.8}, _step(20, 2.0, 40.0), _step(25, 1.0, 10.0)]
    run = _run(tmp_path / "run", records, cut=True)
    steps, knn = training_log(run)
    assert steps["step"].tolist() == [5, 10, 15, 20, 25] and knn["step"].tolist() == [15]
    summary = training_summary(run, last=2)
    assert summary == {"steps": 25.0, "loss (last 2 logged)": 1.5, "teacher entropy (last 2 logged)": 0.5,
                       "images/s (median)": 25.0,  # of 30, 20, 40, 10: the first step's 1.0 pays for start-up
                       "peak memory (MB)": 120.0, "k-NN balanced accuracy": 0.4,
                       "k-NN balanced accuracy cancer": 0.8}


def test_an_empty_or_missing_log_is_named(tmp_path: Path) -> None:
    with pytest.raises(BonyError, match="no training log"):
        training_log(tmp_path)
    run = _run(tmp_path / "run", [])
    with pytest.raises(BonyError, match="no logged step yet"):
        training_log(run)


def test_differences_are_what_was_trained_differently(tmp_path: Path, repo: Path) -> None:
    recipe = repo / "configs" / "pretrain" / "demo.yaml"
    plain = load_config(PretrainConfig, recipe, ["data.manifest=/data/tiles.parquet"])
    stemmed = load_config(PretrainConfig, recipe, ["data.manifest=/data/tiles.parquet", "model.stem=haar_bands",
                                                   "data.workers=0", "log_every=1", "knn.max_tiles=10"])
    for name, cfg in (("plain", plain), ("stemmed", stemmed)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.yaml").write_text(dump_config(cfg))
    assert training_differences(tmp_path / "plain", tmp_path / "stemmed") == {"model.stem": ("none", "haar_bands")}
    old = yaml.safe_load((tmp_path / "plain" / "config.yaml").read_text())
    del old["model"]["stem"]  # a run written before the stem existed trained without one
    (tmp_path / "plain" / "config.yaml").write_text(yaml.safe_dump(old))
    assert training_differences(tmp_path / "plain", tmp_path / "stemmed") == {"model.stem": ("none", "haar_bands")}
    assert training_differences(tmp_path / "stemmed", tmp_path / "stemmed") == {}
    with pytest.raises(BonyError, match="no run config"):
        training_differences(tmp_path / "plain", tmp_path / "nowhere")


def test_same_budget_needs_only_the_studied_setting_and_the_same_steps(tmp_path: Path, repo: Path) -> None:
    """max_steps is a run-only key for a resume, but it cuts training short: it breaks the budget; so does a run
    that has not trained as far as the other."""
    recipe = repo / "configs" / "pretrain" / "demo.yaml"
    base = ["data.manifest=/data/tiles.parquet"]
    plain = load_config(PretrainConfig, recipe, base)
    stemmed = load_config(PretrainConfig, recipe, [*base, "model.stem=haar_bands", "data.workers=0"])
    short = load_config(PretrainConfig, recipe, [*base, "model.stem=haar_bands", "max_steps=50"])
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "config.yaml").write_text(dump_config(plain))
    require_same_budget(tmp_path / "plain", stemmed, {"model.stem"})  # before the stemmed run trains
    assert training_differences(tmp_path / "plain", short) == {"model.stem": ("none", "haar_bands"),
                                                              "max_steps": (0, 50)}
    with pytest.raises(BonyError, match="max_steps: 0 / 50"):
        require_same_budget(tmp_path / "plain", short, {"model.stem"})
    with pytest.raises(BonyError, match="differ in nothing"):
        require_same_budget(tmp_path / "plain", plain, {"model.stem"})

    (tmp_path / "stemmed").mkdir()
    (tmp_path / "stemmed" / "config.yaml").write_text(dump_config(stemmed))
    (tmp_path / "plain" / "log.jsonl").write_text(json.dumps(_step(510, 3.0, 20.0)) + "\n")
    (tmp_path / "stemmed" / "log.jsonl").write_text(json.dumps(_step(250, 4.0, 20.0)) + "\n")
    with pytest.raises(BonyError, match="trained 510 steps and .* 250"):
        require_same_budget(tmp_path / "plain", tmp_path / "stemmed", {"model.stem"})
    (tmp_path / "stemmed" / "log.jsonl").write_text(json.dumps(_step(510, 4.0, 20.0)) + "\n")
    require_same_budget(tmp_path / "plain", tmp_path / "stemmed", {"model.stem"})
