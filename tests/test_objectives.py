"""The trainer runs any sum of objectives: a second term is a module and a config key, and it trains, logs,
checkpoints and resumes like DINO's; checkpoints written before objectives had their own state still resume.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from bonylib.compose.pretrain import PretrainConfig, build_trainer
from bonylib.config import load_config, option
from bonylib.models.head import CropOutputs
from bonylib.ssl import checkpoints
from bonylib.ssl.data import Batch
from bonylib.ssl.losses import OBJECTIVES
from bonylib.ssl.losses.base import Objective


class FeatureNorm(Objective):
    """A toy second term: the mean squared pooled feature of the student's crops (it pulls features towards 0,
    so it changes training through its gradient), with a state of its own: the batches it has seen."""

    def __init__(self, weight: float) -> None:
        super().__init__()
        self.weight = weight
        self.register_buffer("batches", torch.zeros((), dtype=torch.long))

    def forward(self, student: CropOutputs, teacher: CropOutputs, batch: Batch, epoch: int) -> torch.Tensor:
        self.batches += 1
        return student.cls.float().pow(2).mean()

    def metrics(self, teacher: CropOutputs, epoch: int) -> dict[str, float]:
        return {"feature_norm_batches": float(self.batches)}


@dataclass
class ToyConfig(PretrainConfig):
    """The config key the toy term adds."""

    feature_norm_weight: float = option(0.0, "weight of the toy feature-norm term (0: off)")


@pytest.fixture
def with_feature_norm(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(OBJECTIVES, "feature_norm",
                        lambda cfg: FeatureNorm(cfg.feature_norm_weight) if getattr(cfg, "feature_norm_weight", 0) else None)


def toy(repo: Path, images: Path, *overrides: str) -> ToyConfig:
    return load_config(ToyConfig, repo / "configs" / "pretrain" / "smoke.yaml", [f"data.images={images}", *overrides])


def logged(out: Path) -> list[dict]:
    return [row for row in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "loss" in row]


def test_a_second_objective_is_summed_logged_checkpointed_and_resumed_exactly(
        repo: Path, smoke_data: Path, tmp_path: Path, with_feature_norm: None) -> None:
    images = smoke_data / "deepgleason" / "tiles"
    build_trainer(toy(repo, images, "feature_norm_weight=0.5"), tmp_path / "whole").train()
    rows = logged(tmp_path / "whole")
    for row in rows:
        assert row["loss"] == pytest.approx(row["loss_dino"] + row["loss_feature_norm"], rel=1e-6)
        assert row["loss_feature_norm"] > 0 and row["feature_norm_batches"] == row["step"]
    state = torch.load(tmp_path / "whole" / "checkpoint.pth", weights_only=True)
    assert int(state["losses"]["feature_norm.batches"]) == 6 and "dino.centering.center" in state["losses"]

    dino_only = build_trainer(toy(repo, images), tmp_path / "dino")
    assert list(dino_only.model.objectives) == ["dino"], "weight 0 leaves the term out"
    dino_only.train()
    trained = [torch.load(tmp_path / run / "checkpoint.pth", weights_only=True)["student"] for run in ("whole", "dino")]
    assert any(not torch.equal(trained[0][name], trained[1][name]) for name in trained[0]), \
        "the second term changes training through its gradient"

    build_trainer(toy(repo, images, "feature_norm_weight=0.5", "max_steps=3"), tmp_path / "split").train()
    build_trainer(toy(repo, images, "feature_norm_weight=0.5"), tmp_path / "split").train()
    split = logged(tmp_path / "split")
    assert [r["step"] for r in split] == [r["step"] for r in rows]
    for a, b in zip(split, rows):
        for key in ("loss", "loss_dino", "loss_feature_norm", "feature_norm_batches"):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-7), (a["step"], key)


def test_a_checkpoint_from_before_objectives_had_state_resumes_exactly(repo: Path, smoke_data: Path,
                                                                       tmp_path: Path) -> None:
    """Checkpoints written by the trainer before the split hold DINO's center as ``center`` (no ``losses``): such a
    checkpoint, made here from a current one by that layout, resumes to the losses of an uninterrupted run."""
    images = smoke_data / "deepgleason" / "tiles"
    config = lambda *o: load_config(PretrainConfig, repo / "configs" / "pretrain" / "smoke.yaml",  # noqa: E731
                                    [f"data.images={images}", *o])
    build_trainer(config(), tmp_path / "whole").train()
    out = tmp_path / "old"
    build_trainer(config("max_steps=4"), out).train()
    state = torch.load(out / "checkpoint.pth", weights_only=True)
    state["center"] = state.pop("losses")["dino.centering.center"]
    for path in out.glob("checkpoint*.pth"):
        path.unlink()
        path.with_name(path.name + ".sha256").unlink()
    checkpoints.save(state, out, 4, keep=1)
    assert "losses" not in torch.load(out / "checkpoint.pth", weights_only=True)
    build_trainer(config(), out).train()
    whole, resumed = logged(tmp_path / "whole"), logged(out)
    assert [r["step"] for r in resumed] == list(range(1, 7))
    for a, b in zip(resumed, whole):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-7), a["step"]
