"""bony pretrain end to end on a tiny run: exact resume, pre-emption, corrupt checkpoints, NaN, export."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bonylib.compose.pretrain import PretrainConfig, build_trainer
from bonylib.config import load_config
from bonylib.errors import BonyError
from bonylib.models.backbones import create_backbone
from bonylib.ssl.trainer import STOPPED


def config(repo: Path, images: Path, *overrides: str) -> PretrainConfig:
    return load_config(PretrainConfig, repo / "configs" / "pretrain" / "smoke.yaml", [f"data.images={images}", *overrides])


def losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines())}


def test_resumed_run_logs_the_same_losses(repo: Path, images: Path, tmp_path: Path) -> None:
    build_trainer(config(repo, images), tmp_path / "whole").train()
    build_trainer(config(repo, images, "max_steps=4"), tmp_path / "split").train()  # stops mid-epoch 1
    assert max(losses(tmp_path / "split")) == 4
    build_trainer(config(repo, images), tmp_path / "split").train()
    whole, split = losses(tmp_path / "whole"), losses(tmp_path / "split")
    assert sorted(whole) == sorted(split) == list(range(1, 7))
    for step in whole:
        assert split[step] == pytest.approx(whole[step], rel=1e-6, abs=1e-7), step
    a = load_file(str(tmp_path / "whole" / "teacher_backbone.safetensors"))
    b = load_file(str(tmp_path / "split" / "teacher_backbone.safetensors"))
    for name in a:
        torch.testing.assert_close(a[name], b[name])


def test_dinos_own_augmentations_resume_exactly(repo: Path, images: Path, tmp_path: Path) -> None:
    """DINO's pipeline draws its blur and solarisation from Python's random: seeded per sample too, so a resumed run
    sees the crops an uninterrupted one sees."""
    build_trainer(config(repo, images, "crops.pipeline=dino"), tmp_path / "whole").train()
    build_trainer(config(repo, images, "crops.pipeline=dino", "max_steps=3"), tmp_path / "split").train()
    build_trainer(config(repo, images, "crops.pipeline=dino"), tmp_path / "split").train()
    whole, split = losses(tmp_path / "whole"), losses(tmp_path / "split")
    assert sorted(whole) == sorted(split) == list(range(1, 7))
    for step in whole:
        assert split[step] == pytest.approx(whole[step], rel=1e-6, abs=1e-7), step


def test_export_loads_into_a_fresh_backbone(repo: Path, images: Path, tmp_path: Path) -> None:
    out = build_trainer(config(repo, images, "max_steps=1"), tmp_path / "run").train()
    meta = json.loads((out / "teacher_backbone.json").read_text())
    assert meta["backbone"] == "vit_tiny_patch16_224" and meta["embed_dim"] == 192 and meta["step"] == 1
    backbone = create_backbone(meta["backbone"])
    backbone.load_state_dict(load_file(str(out / "teacher_backbone.safetensors")))
    state = torch.load(out / "checkpoint.pth", weights_only=True)
    teacher_backbone = {k.removeprefix("backbone."): v for k, v in state["teacher"].items() if k.startswith("backbone.")}
    for name, value in backbone.state_dict().items():
        torch.testing.assert_close(value, teacher_backbone[name])


def test_corrupt_latest_checkpoint_falls_back(repo: Path, images: Path, tmp_path: Path, caplog) -> None:
    out = tmp_path / "run"
    build_trainer(config(repo, images, "max_steps=4", "checkpoint_every=2"), out).train()
    numbered = sorted(out.glob("checkpoint-*.pth"))
    assert [p.name for p in numbered] == ["checkpoint-00000002.pth", "checkpoint-00000003.pth", "checkpoint-00000004.pth"]
    (out / "checkpoint.pth").write_bytes(b"truncated")
    numbered[-1].write_bytes(numbered[-1].read_bytes()[:100])
    trainer = build_trainer(config(repo, images), out)
    assert trainer.resume() and trainer.step == 3
    assert "unusable checkpoint" in caplog.text


def test_non_finite_loss_stops_with_a_clear_error(repo: Path, images: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "run"
    build_trainer(config(repo, images, "max_steps=2"), out).train()
    before = (out / "checkpoint.pth").read_bytes()
    trainer = build_trainer(config(repo, images), out)
    monkeypatch.setattr(trainer.model.objectives["dino"], "forward",
                        lambda student, teacher, batch, epoch: student.head.sum() * float("nan"))
    with pytest.raises(BonyError, match="loss is nan at step 2"):
        trainer.train()
    assert (out / "checkpoint.pth").read_bytes() == before, "the last good checkpoint is kept"


def _wait_until_caught(pid: int, signum: int, timeout: float = 60.0) -> None:
    """Until process ``pid`` has a handler for ``signum`` (its caught-signal mask in /proc). A fixed sleep was too
    short on a busy machine: the signal came before Python had started, and its default action killed the run."""
    bit = 1 << (signum - 1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = Path(f"/proc/{pid}/status").read_text()
        caught = next(line for line in status.splitlines() if line.startswith("SigCgt:"))
        if int(caught.split()[1], 16) & bit:
            return
        time.sleep(0.005)
    raise AssertionError(f"process {pid} installed no handler for signal {signum} in {timeout} s")


def test_a_warning_during_start_up_stops_before_the_first_step_and_resumes_exactly(repo: Path, images: Path,
                                                                                   tmp_path: Path) -> None:
    """SLURM may send its warning in a job's first seconds, while Python still imports torch, whose default
    for SIGUSR1 is to die: the run must instead stop cleanly, and the rerun train as if nothing happened."""
    out = tmp_path / "run"
    command = [sys.executable, "-m", "bonylib", "pretrain", "--out", str(out), "--config",
               str(repo / "configs/pretrain/smoke.yaml"), f"data.images={images}", "max_steps=4"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_until_caught(process.pid, signal.SIGUSR1)  # past the interpreter's start, inside the imports and the set-up
    os.kill(process.pid, signal.SIGUSR1)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr
    stopped = json.loads((out / STOPPED).read_text())
    assert (stopped["signal"], stopped["step"]) == ("SIGUSR1", 0), "stopped before any step"
    assert torch.load(out / "checkpoint.pth", weights_only=True)["step"] == 0
    build_trainer(config(repo, images, "max_steps=4"), out).train()
    build_trainer(config(repo, images, "max_steps=4"), tmp_path / "straight").train()
    assert losses(out) == losses(tmp_path / "straight")


def test_sigterm_checkpoints_and_exits_for_requeue(repo: Path, images: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    command = [sys.executable, "-m", "bonylib", "pretrain", "--out", str(out), "--config",
               str(repo / "configs/pretrain/smoke.yaml"), f"data.images={images}", "optim.epochs=50", "checkpoint_every=1000"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / "log.jsonl").is_file() and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr
    assert "SIGTERM" in stderr and "resume" in stderr
    state = torch.load(out / "checkpoint.pth", weights_only=True)
    assert state["step"] == max(losses(out)), "the checkpoint is at the last finished step"
    stopped = json.loads((out / STOPPED).read_text())
    assert (stopped["step"], stopped["signal"]) == (state["step"], "SIGTERM"), "the batch script's sign to requeue"
    build_trainer(config(repo, images, "optim.epochs=50", "max_steps=" + str(state["step"] + 1)), out).train()
    assert not (out / STOPPED).exists(), "a resumed run is no longer a stopped one"


def _ddp_worker(rank: int, repo: str, images: str, out: str, port: int, overrides: tuple[str, ...]) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    cfg = config(Path(repo), Path(images), *overrides, "max_steps=3")
    build_trainer(cfg, Path(out)).train()
    torch.distributed.destroy_process_group()


def _ddp_signal_worker(rank: int, repo: str, images: str, out: str, port: int) -> None:
    """Rank 1 alone receives SIGUSR1 during step 2 (as when SLURM signals one task first)."""
    from bonylib.ssl.trainer import Preempted

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    trainer = build_trainer(config(Path(repo), Path(images), "optim.batch_size=2", "checkpoint_every=100"), Path(out))
    if rank == 1:
        step = trainer._optimizer_step

        def signalled_step(epoch: int) -> None:
            if trainer.step == 1:
                os.kill(os.getpid(), signal.SIGUSR1)
            step(epoch)

        trainer._optimizer_step = signalled_step
    try:
        trainer.train()
    except Preempted:
        (Path(out) / f"stopped-{rank}").write_text(str(trainer.step))
    torch.distributed.destroy_process_group()


def test_a_signal_to_one_rank_stops_every_rank_after_the_same_step(repo: Path, images: Path, tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "ddp"
    torch.multiprocessing.spawn(_ddp_signal_worker, args=(str(repo), str(images), str(out), port), nprocs=2)
    assert [(out / f"stopped-{rank}").read_text() for rank in (0, 1)] == ["2", "2"]
    assert json.loads((out / STOPPED).read_text())["step"] == 2, "rank 0 records the stop though rank 1 was signalled"
    assert torch.load(out / "checkpoint.pth", weights_only=True)["step"] == 2


def test_tensorboard_mirrors_log_jsonl_and_drops_events_past_the_resumed_checkpoint(repo: Path, images: Path,
                                                                                     tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    build_trainer(config(repo, images, "tensorboard=true", "max_steps=3"), out).train()  # checkpoints at 2 and 3
    (out / "checkpoint-00000003.pth").unlink()  # as if killed after logging step 3, before its checkpoint
    (out / "checkpoint.pth").write_bytes((out / "checkpoint-00000002.pth").read_bytes())
    first_step3 = losses(out)[3]
    build_trainer(config(repo, images, "tensorboard=true", "loss.student_temp=0.2", "resume.allow_changes=[loss.student_temp]"),
            out).train()  # step 3 again, differently
    assert losses(out)[3] != first_step3, "the rerun of step 3 logged a new value"
    events = EventAccumulator(str(out / "tensorboard")).Reload()
    logged = {e.step: e.value for e in events.Scalars("pretrain/loss")}
    assert sorted(logged) == list(range(1, 7)) and len(events.Scalars("pretrain/loss")) == 6, "no stale step 3"
    for step, value in losses(out).items():
        assert logged[step] == pytest.approx(value, rel=1e-6), step
    assert {"pretrain/lr", "pretrain/teacher_entropy", "pretrain/images_per_s"} <= set(events.Tags()["scalars"])


DINOV2_TERMS = ("objective=dinov2", "crops.global_size=64", "loss.centering=sinkhorn_knopp", "dinov2.kde_weight=0.05",
                "dinov2.mask_probability=1")


@pytest.mark.parametrize(("per_process", "single_process"), [
    (("optim.batch_size=2",), ("optim.batch_size=4",)),
    (("optim.batch_size=1", "optim.accumulate=2"), ("optim.batch_size=2", "optim.accumulate=2")),
    (("optim.batch_size=2", *DINOV2_TERMS), ("optim.batch_size=4", *DINOV2_TERMS)),
], ids=["one-pass", "accumulated", "dinov2"])
def test_two_processes_equal_one_process_on_the_combined_batch(repo: Path, images: Path, tmp_path: Path,
                                                                per_process: tuple[str, ...],
                                                                single_process: tuple[str, ...]) -> None:
    """2 CPU processes (gloo) with n images each == 1 process with the same 2n images: same crops
    (seeded per sample), averaged gradients, all-reduced center. ViT: no BatchNorm to differ. With
    accumulation (the first micro-batch under no_sync) the gradients must still be those of the whole
    batch: syncing on the wrong micro-batch would fail this; skipping no_sync would only be slower. With the
    DINOv2-style terms: the same masks (seeded per sample), Sinkhorn-Knopp over the global batch (all-reduced
    sums), iBOT averaged over crops, KoLeo and KDE over the gathered global batch."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_ddp_worker, args=(str(repo), str(images), str(tmp_path / "ddp"), port, per_process),
                                nprocs=2)
    build_trainer(config(repo, images, *single_process, "max_steps=3"), tmp_path / "single").train()
    ddp = torch.load(tmp_path / "ddp" / "checkpoint.pth", weights_only=True)
    single = torch.load(tmp_path / "single" / "checkpoint.pth", weights_only=True)
    assert ddp["step"] == single["step"] == 3
    torch.testing.assert_close(ddp["losses"], single["losses"], rtol=1e-4, atol=1e-6)
    for part in ("student", "teacher"):
        for name, value in single[part].items():
            torch.testing.assert_close(ddp[part][name], value, rtol=1e-4, atol=1e-5, msg=f"{part}.{name}")
    assert losses(tmp_path / "ddp") == pytest.approx(losses(tmp_path / "single"), rel=1e-4)


def test_knn_monitoring_leaves_the_training_trajectory_unchanged(repo: Path, images: Path, smoke_data: Path,
                                                                  tmp_path: Path) -> None:
    """k-NN runs the teacher on other tiles between steps: it must not move the RNG, the center, any weight or any
    BatchNorm statistic (XCiT has BatchNorm: features taken in train mode would update the teacher's)."""
    from bonylib.config import load_config as load
    from bonylib.data.tiling import TileConfig, tile

    labelled = tile("deepgleason", [smoke_data / "deepgleason"], tmp_path / "tiles", load(TileConfig, None, ["tile_px=128"]))
    xcit = ("model.backbone=xcit_nano_12_p16_224",)
    monitored = build_trainer(config(repo, images, *xcit, f"knn.manifest={labelled.manifest}", "knn.folds=2"),
                        tmp_path / "knn").train()
    plain = build_trainer(config(repo, images, *xcit), tmp_path / "plain").train()
    records = [json.loads(line) for line in (monitored / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "knn_accuracy" in r] == [3, 6], "k-NN ran at each epoch end"
    assert {r["step"]: r["loss"] for r in records if "loss" in r} == losses(plain)
    a, b = (torch.load(run / "checkpoint.pth", weights_only=True) for run in (monitored, plain))
    torch.testing.assert_close(a["losses"], b["losses"], rtol=0, atol=0)
    for part in ("student", "teacher"):
        for name, value in a[part].items():
            torch.testing.assert_close(value, b[part][name], rtol=0, atol=0, msg=f"{part}.{name}")
