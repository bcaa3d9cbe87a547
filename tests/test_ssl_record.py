"""The DINO losses of fixed-seed runs are those recorded before the SSL core was split (commit 75043ea).

The split (configs, objectives, the model step, the trainer) must not change what is trained: the same seed
gives the same losses, bit for bit, on the machine kind they were recorded on (CPU model, torch's version and CPU
capability, one thread). Elsewhere kernels sum in another order, so the losses are compared to a relative 1e-3
instead: an AMD EPYC with the same AVX512 capability differs from the Intel record in the seventh digit, since the
math libraries pick their kernels by vendor as well as by instruction set.
The cases cover ViT and XCiT, one and two global crops, gradient accumulation and both wavelet stems.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bonylib.compose.pretrain import PretrainConfig, build_trainer
from bonylib.config import load_config
from bonylib.runtime import cpu_capability, cpu_model

RECORD = json.loads((Path(__file__).parent / "data" / "dino_losses_75043ea.json").read_text())


@pytest.fixture
def one_thread(monkeypatch: pytest.MonkeyPatch):
    """One torch thread (the record's), restored afterwards for the other tests."""
    threads = torch.get_num_threads()
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1")
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("case", sorted(RECORD["cases"]))
def test_losses_equal_the_record_from_before_the_split(case: str, repo: Path, smoke_data: Path, tmp_path: Path,
                                                        one_thread: None) -> None:
    recorded = RECORD["cases"][case]
    cfg = load_config(PretrainConfig, repo / "configs" / "pretrain" / "smoke.yaml",
                      [f"data.images={smoke_data / 'deepgleason' / 'tiles'}", *recorded["overrides"]])
    out = build_trainer(cfg, tmp_path / case).train()
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    losses = [row["loss"] for row in rows if "loss" in row]
    assert [row["loss_dino"] for row in rows if "loss" in row] == losses, "the total of one objective is its term"
    if (cpu_model(), cpu_capability(), torch.__version__) == (RECORD["cpu_model"], RECORD["capability"], RECORD["torch"]):
        assert losses == recorded["losses"]
    else:
        assert losses == pytest.approx(recorded["losses"], rel=1e-3)
    assert [row["teacher_entropy"] for row in rows if "loss" in row] == pytest.approx(recorded["entropy"], rel=1e-5)
