"""objective: dinov2 in the one trainer: each term logged and summed, its state checkpointed and resumed exactly, its
weights part of the config a resume checks; with its extra terms at weight 0 it is DINO, bit for bit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bonylib.compose.pretrain import build_trainer
from bonylib.errors import BonyError, ConfigError
from tests.test_pretrain import config


def logged(out: Path) -> list[dict]:
    return [row for row in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "loss" in row]


EVERY_TERM = ("objective=dinov2", "crops.global_size=64", "dinov2.kde_weight=0.05", "dinov2.separate_patch_head=true",
              "optim.accumulate=2", "optim.batch_size=2")


@pytest.mark.parametrize("centering", ["ema", "sinkhorn_knopp"])
def test_every_term_trains_logs_and_resumes_exactly(repo: Path, images: Path, tmp_path: Path, centering: str) -> None:
    """DINO + iBOT (separate patch head) + KoLeo + KDE with accumulation: the logged total is the sum of the
    weighted terms, the checkpoint holds each objective's state (the two EMA centers), and a run stopped after step 3
    and resumed logs the losses of the uninterrupted run."""
    terms = (*EVERY_TERM, f"loss.centering={centering}")
    build_trainer(config(repo, images, *terms), tmp_path / "whole").train()
    rows = logged(tmp_path / "whole")
    names = ("loss_dino", "loss_ibot", "loss_koleo", "loss_kde")
    for row in rows:
        assert row["loss"] == pytest.approx(sum(row[name] for name in names), rel=1e-5, abs=1e-6)
    assert any(row["loss_ibot"] > 0 for row in rows) and all(row["loss_kde"] <= 0 for row in rows)
    state = torch.load(tmp_path / "whole" / "checkpoint.pth", weights_only=True)
    centers = {"dino.centering.center", "ibot.centering.center"}
    assert (set(state["losses"]) == centers) == (centering == "ema") and (not state["losses"]) == (centering != "ema")
    assert "mask_token" in state["student"] and any(key.startswith("patch_head.") for key in state["student"])
    assert state["config"]["objective"] == "dinov2" and state["config"]["dinov2"]["kde_weight"] == 0.05

    build_trainer(config(repo, images, *terms, "max_steps=3"), tmp_path / "split").train()
    build_trainer(config(repo, images, *terms), tmp_path / "split").train()
    split = logged(tmp_path / "split")
    assert [r["step"] for r in split] == [r["step"] for r in rows] == list(range(1, 7))
    for a, b in zip(split, rows):
        for key in ("loss", *names):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-7), (a["step"], key)
    with pytest.raises(BonyError, match="dinov2.koleo_weight: 0.1 -> 0.2"):
        build_trainer(config(repo, images, *terms, "dinov2.koleo_weight=0.2"), tmp_path / "split").train()


def test_dinov2_without_its_terms_is_dino_bit_for_bit(repo: Path, images: Path, tmp_path: Path) -> None:
    """objective: dinov2 with iBOT and KoLeo at weight 0 draws no masks and builds no mask token: its losses and
    weights are those of objective: dino, to the bit (one trainer, one path)."""
    build_trainer(config(repo, images, "max_steps=3"), tmp_path / "dino").train()
    build_trainer(config(repo, images, "max_steps=3", "objective=dinov2", "dinov2.ibot_weight=0",
                         "dinov2.koleo_weight=0"), tmp_path / "dinov2").train()
    assert [r["loss"] for r in logged(tmp_path / "dino")] == [r["loss"] for r in logged(tmp_path / "dinov2")]
    a, b = (torch.load(tmp_path / run / "checkpoint.pth", weights_only=True)["student"] for run in ("dino", "dinov2"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bad_dinov2_settings_are_one_line_errors(repo: Path, images: Path) -> None:
    for override, message in (("objective=ibot", "objective must be one of dino, dinov2"),
                              ("dinov2.mask_ratio=[0.5,0.1]", "dinov2.mask_ratio must be"),
                              ("dinov2.koleo_weight=-1", "dinov2.koleo_weight must be at least 0"),
                              ("dinov2.dino_weight=0", "dinov2.dino_weight must be above 0"),
                              ("loss.centering=swav", "loss.centering must be one of ema, sinkhorn_knopp")):
        with pytest.raises(ConfigError, match=message):
            config(repo, images, override)
