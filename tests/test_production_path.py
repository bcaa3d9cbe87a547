"""What the cluster runs, on a smoke run: XCiT (BatchNorm), bf16 autocast, DataLoader workers, gradient accumulation,
the frozen last layer and gradient clipping, each checked for its effect rather than for running."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bonylib import runtime
from bonylib.compose.pretrain import PretrainConfig, build_trainer
from bonylib.config import load_config
from bonylib.ssl.trainer import Trainer

CLUSTER = ("model.backbone=xcit_nano_12_p16_224", "optim.precision=auto", "optim.accumulate=2", "optim.batch_size=2",
           "optim.freeze_last_layer=1", "optim.clip_grad=0.05", "max_steps=2")


def trainer(repo: Path, smoke_data: Path, out: Path, *overrides: str) -> Trainer:
    cfg = load_config(PretrainConfig, repo / "configs" / "pretrain" / "smoke.yaml",
                      [f"data.images={smoke_data / 'deepgleason' / 'tiles'}", *CLUSTER, *overrides])
    return build_trainer(cfg, out)


@pytest.fixture(scope="module")
def production(repo: Path, smoke_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Two optimisation steps of the cluster's path (bf16 as on a GPU or a native-bf16 CPU), watched from inside."""
    patch = pytest.MonkeyPatch()
    patch.setattr(runtime, "cpu_flags", lambda: frozenset({"amx_bf16"}))
    patch.setattr(runtime, "bf16_speedup", lambda: 4.0)
    patch.setattr(torch.cuda, "is_available", lambda: False)
    try:
        run = trainer(repo, smoke_data, tmp_path_factory.mktemp("prod") / "run", "data.workers=2")
        seen: dict = {"dtypes": set(), "grad_norms": [], "last_layer": []}
        run.model.student_network.backbone.blocks[0].attn.qkv.register_forward_hook(
            lambda module, inputs, output: seen["dtypes"].add(output.dtype))
        step = run.scaler.step

        def watched_step(optimizer, *args, **kwargs):  # the gradients as the optimizer receives them
            seen["grad_norms"] += [float(p.grad.norm()) for p in run.model.student_network.parameters() if p.grad is not None]
            seen["last_layer_grads"] = [p.grad for p in run.model.student_network.head.last_layer.parameters()]
            return step(optimizer, *args, **kwargs)

        run.scaler.step = watched_step
        before = {k: v.clone() for k, v in run.model.student_network.head.last_layer.state_dict().items()}
        bn_before = run.model.teacher.backbone.patch_embed.proj[0][1].running_mean.clone()
        run.train()
        seen.update(run=run, last_layer_before=before, bn_before=bn_before)
    finally:
        patch.undo()
    return seen


def test_autocast_runs_in_bf16(production: dict) -> None:
    assert production["run"].precision.name == "bf16" and production["dtypes"] == {torch.bfloat16}


def test_every_gradient_is_clipped_to_clip_grad(production: dict) -> None:
    norms = production["grad_norms"]
    assert norms and max(norms) <= 0.05 * (1 + 1e-3)
    assert sum(n > 0.04 for n in norms) > len(norms) // 4, "clipping was active, not vacuous: many were at the cap"


def test_the_last_layer_is_frozen_in_the_first_epoch(production: dict) -> None:
    run = production["run"]
    assert all(g is None for g in production["last_layer_grads"])
    for name, value in run.model.student_network.head.last_layer.state_dict().items():
        torch.testing.assert_close(value, production["last_layer_before"][name], rtol=0, atol=0, msg=name)
    changed = [name for name, p in run.model.student_network.backbone.named_parameters()
               if not torch.equal(p, run.model.teacher.backbone.state_dict()[name])]
    assert changed, "the rest of the student trained (and the teacher follows it only by EMA)"


def test_xcit_batchnorm_statistics_move_with_the_teacher(production: dict) -> None:
    after = production["run"].model.teacher.backbone.patch_embed.proj[0][1].running_mean
    assert not torch.equal(after, production["bn_before"]), "the teacher's BatchNorm saw the crops"


def test_data_workers_do_not_change_the_run(production: dict, repo: Path, smoke_data: Path, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Views are seeded per sample, so loading in 2 workers gives the losses of loading in the trainer."""
    monkeypatch.setattr(runtime, "cpu_flags", lambda: frozenset({"amx_bf16"}))
    monkeypatch.setattr(runtime, "bf16_speedup", lambda: 4.0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    inline_run = trainer(repo, smoke_data, tmp_path / "inline", "data.workers=0")
    torch.set_num_threads(production["run"].threads.torch_threads)  # the same reduction order in the model's ops
    inline = inline_run.train()
    losses = [[r["loss"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "loss" in r]
              for out in (production["run"].out, inline)]
    assert len(losses[0]) == 2 and losses[0] == losses[1]
