"""bony pretrain against what users and clusters do to it: changed configs on resume, stop signals to the whole
process group, kills between checkpoints, damaged checkpoints and exports, a full disk."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bonylib.compose.pretrain import PretrainConfig, build_trainer
from bonylib.config import load_config
from bonylib.errors import BonyError
from bonylib.files import DiskFullError
from bonylib.models.export import load_backbone
from bonylib.ssl import checkpoints
from tests.test_pretrain import config


def logged_steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines() if '"loss"' in line]


@pytest.fixture(scope="module")
def four_steps(repo: Path, images: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run stopped after 4 of 6 steps, checkpoints at 2, 3 (epoch end) and 4; copied by each test that damages it."""
    out = tmp_path_factory.mktemp("four") / "run"
    build_trainer(config(repo, images, "max_steps=4", "checkpoint_every=2"), out).train()
    return out


def copy_run(run: Path, dest: Path) -> Path:
    subprocess.run(["cp", "-a", str(run), str(dest)], check=True)
    return dest


# ---- 2. a resume with a changed config ---------------------------------------------------------


def test_resume_refuses_a_changed_recipe_and_leaves_the_record_alone(repo, images, four_steps, tmp_path) -> None:
    out = copy_run(four_steps, tmp_path / "run")
    record = (out / "config.yaml").read_bytes()
    with pytest.raises(BonyError, match=r"optim\.lr: 0\.0005 -> 0\.01.*resume\.allow_changes=\[optim\.lr\]") as caught:
        build_trainer(config(repo, images, "optim.lr=0.01"), out).train()
    assert "\n" not in str(caught.value)
    with pytest.raises(BonyError, match=r"model\.backbone: 'vit_tiny_patch16_224' -> 'vit_small_patch16_224'"):
        build_trainer(config(repo, images, "model.backbone=vit_small_patch16_224"), out).train()
    assert (out / "config.yaml").read_bytes() == record, "a refused resume must not rewrite the run's config"
    assert not (out / "config_changes.jsonl").exists()
    assert logged_steps(out) == [1, 2, 3, 4]


def test_resume_accepts_run_only_and_allowed_changes_and_records_them(repo, images, four_steps, tmp_path) -> None:
    out = copy_run(four_steps, tmp_path / "run")
    build_trainer(config(repo, images, "optim.lr=0.01", "log_every=2", "resume.allow_changes=[optim.lr]"), out).train()
    changes = [json.loads(line) for line in (out / "config_changes.jsonl").read_text().splitlines()]
    assert changes == [{"step": 4, "changes": {"log_every": [1, 2], "optim.lr": [0.0005, 0.01],
                                               "max_steps": [4, 0], "resume.allow_changes": [[], ["optim.lr"]]}}]
    assert "lr: 0.01" in (out / "config.yaml").read_text()


def test_resuming_with_the_saved_config_yaml_or_auto_is_the_same_run(repo, images, four_steps, tmp_path,
                                                                    monkeypatch) -> None:
    from bonylib import runtime

    monkeypatch.setattr(runtime, "cpu_flags", lambda: frozenset({"avx2"}))  # auto means fp32, as on the machine it ran on
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = copy_run(four_steps, tmp_path / "run")
    saved = out / "config.yaml"
    assert "precision: fp32" in saved.read_text()
    build_trainer(load_config(PretrainConfig, saved, ["max_steps=5"]), out).train()  # the record as a config
    build_trainer(config(repo, images, "optim.precision=auto", "data.workers=auto"), out).train()
    assert not (out / "config_changes.jsonl").read_text().count("precision")
    assert logged_steps(out) == [1, 2, 3, 4, 5, 6]


def test_cli_refusal_is_one_line(repo, images, four_steps, tmp_path) -> None:
    out = copy_run(four_steps, tmp_path / "run")
    done = subprocess.run([sys.executable, "-m", "bonylib", "pretrain", "--out", str(out), "--config",
                           str(repo / "configs/pretrain/smoke.yaml"), f"data.images={images}",
                           "model.backbone=vit_small_patch16_224"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and "model.backbone" in errors[0] and "Traceback" not in done.stderr


# ---- 3. SIGTERM to the whole process group, DataLoader workers included ------------------------


def test_sigterm_to_the_process_group_with_workers_checkpoints_and_exits_143(repo, images, tmp_path) -> None:
    out = tmp_path / "run"
    command = [sys.executable, "-m", "bonylib", "pretrain", "--out", str(out), "--config",
               str(repo / "configs/pretrain/smoke.yaml"), f"data.images={images}", "optim.epochs=200",
               "checkpoint_every=100000", "data.workers=2"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 180
    while not (out / "log.jsonl").is_file() and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGTERM)  # what SLURM and `kill -- -PGID` do: the workers get it too
    _, stderr = process.communicate(timeout=180)
    assert process.returncode == 143, stderr
    assert "SIGTERM" in stderr and "Traceback" not in stderr
    state = torch.load(out / "checkpoint.pth", weights_only=True)
    assert state["step"] == max(logged_steps(out)) >= 1


# ---- 4. the log after a kill between checkpoints -----------------------------------------------


def test_log_is_trimmed_to_the_checkpoint_on_resume(repo, images, four_steps, tmp_path) -> None:
    out = copy_run(four_steps, tmp_path / "run")
    for step in (3, 4):  # as if killed (kill -9) after logging step 4 with only step 2's checkpoint written
        (out / f"checkpoint-{step:08d}.pth").unlink()
    (out / "checkpoint.pth").unlink()
    with open(out / "log.jsonl", "a") as handle:
        handle.write('{"step": 5, "loss": 1.')  # torn by the kill
    build_trainer(config(repo, images), out).train()
    assert logged_steps(out) == [1, 2, 3, 4, 5, 6]


def test_no_usable_checkpoint_refuses_instead_of_restarting_silently(repo, images, four_steps, tmp_path) -> None:
    out = copy_run(four_steps, tmp_path / "run")
    for path in out.glob("checkpoint*.pth"):
        path.write_bytes(b"garbage")
    before = (out / "log.jsonl").read_bytes()
    with pytest.raises(BonyError, match=r"no usable checkpoint to resume from \(checkpoint-00000004\.pth: .*checkpoint\.pth: "):
        build_trainer(config(repo, images), out).train()
    assert (out / "log.jsonl").read_bytes() == before


# ---- 5. damaged checkpoints and exports ----------------------------------------------------------


def flip_tensor_bytes(path: Path) -> None:
    """Flip 64 bytes inside the largest tensor's data, where torch.load cannot notice."""
    import zipfile

    with zipfile.ZipFile(path) as archive:
        biggest = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
        start = biggest.header_offset + 30 + len(biggest.filename.encode()) + len(biggest.extra)
    data = bytearray(path.read_bytes())
    middle = start + biggest.file_size // 2
    data[middle : middle + 64] = bytes(b ^ 0xFF for b in data[middle : middle + 64])
    path.write_bytes(bytes(data))


def test_flipped_bytes_are_caught_by_the_checksum(repo, images, four_steps, tmp_path, caplog) -> None:
    out = copy_run(four_steps, tmp_path / "run")
    flip_tensor_bytes(out / "checkpoint.pth")
    torch.load(out / "checkpoint.pth", weights_only=True)  # loads: torch alone would train on the damage
    flip_tensor_bytes(out / "checkpoint-00000004.pth")
    trainer = build_trainer(config(repo, images), out)
    assert trainer.resume() and trainer.step == 3
    assert "do not match the checksum" in caplog.text


def test_the_newest_sound_checkpoint_wins(repo, images, four_steps, tmp_path) -> None:
    out = copy_run(four_steps, tmp_path / "run")
    for suffix in ("", ".sha256"):  # killed after writing checkpoint-4 but before copying it to checkpoint.pth
        (out / f"checkpoint.pth{suffix}").write_bytes((out / f"checkpoint-00000003.pth{suffix}").read_bytes())
    trainer = build_trainer(config(repo, images), out)
    assert trainer.resume() and trainer.step == 4


def test_a_foreign_torch_file_is_skipped(repo, images, four_steps, tmp_path, caplog) -> None:
    out = copy_run(four_steps, tmp_path / "run")
    for path in (out / "checkpoint.pth", out / "checkpoint-00000004.pth"):
        torch.save({"model": torch.zeros(2)}, path)
        (out / f"{path.name}.sha256").write_text(checkpoints.sha256_file(path))
    trainer = build_trainer(config(repo, images), out)
    assert trainer.resume() and trainer.step == 3
    assert "not a bony pretrain checkpoint (no step, student" in caplog.text


@pytest.mark.parametrize(("damage", "message"), [
    (lambda run: (run / "teacher_backbone.json").write_text("{not json"), "not valid JSON"),
    (lambda run: (run / "teacher_backbone.json").write_text("[1, 2]"), "unknown format 'list'"),
    (lambda run: (run / "teacher_backbone.safetensors").write_bytes(b"\x00" * 64), "do not match the sha256"),
])
def test_damaged_exports_give_one_clear_line(repo, images, four_steps, tmp_path, damage, message) -> None:
    out = copy_run(four_steps, tmp_path / "run")
    damage(out)
    with pytest.raises(BonyError, match=message) as caught:
        load_backbone(out)
    assert "\n" not in str(caught.value)


def test_garbage_weights_without_a_checksum_give_one_clear_line(repo, images, four_steps, tmp_path) -> None:
    out = copy_run(four_steps, tmp_path / "run")
    meta = json.loads((out / "teacher_backbone.json").read_text())
    del meta["sha256"]  # an export written before checksums
    (out / "teacher_backbone.json").write_text(json.dumps(meta))
    (out / "teacher_backbone.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(BonyError, match="weights do not fit vit_tiny_patch16_224"):
        load_backbone(out)


# ---- 8. a full disk ----------------------------------------------------------------------------


def test_full_disk_while_checkpointing_names_the_folder_and_resumes(repo, images, four_steps, tmp_path,
                                                                    monkeypatch) -> None:
    out = copy_run(four_steps, tmp_path / "run")
    real_open = open

    class FullFile:
        """A file on a disk that fills up after the first kilobytes, as torch.save's writer meets it."""

        def __init__(self, handle) -> None:
            self.handle, self.written = handle, 0

        def write(self, data) -> int:
            self.written += len(data)
            if self.written > 4096:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.handle.write(data)

        def __getattr__(self, name):
            return getattr(self.handle, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc) -> None:
            self.handle.close()

    def full_open(path, mode="r", *args, **kwargs):
        handle = real_open(path, mode, *args, **kwargs)
        return FullFile(handle) if "w" in mode and str(path).endswith(".pth") else handle

    monkeypatch.setattr(checkpoints, "open", full_open, raising=False)
    with pytest.raises(DiskFullError, match=rf"{out}: the output disk is full"):
        build_trainer(config(repo, images), out).train()
    assert not list(out.glob(".*tmp*")), "no half-written file is left"
    monkeypatch.undo()
    build_trainer(config(repo, images), out).train()
    assert logged_steps(out) == [1, 2, 3, 4, 5, 6]


def test_an_option_added_after_a_checkpoint_counts_at_its_default() -> None:
    """A run trained before model.stem existed resumes with the default stem, and only with it."""
    from bonylib.ssl.checkpoints import config_changes

    saved = {"model": {"backbone": "xcit_nano_12_p16_224"}}
    defaults = {"model": {"backbone": "vit_small_patch16_224", "stem": "none"}}
    assert config_changes(saved, {"model": {"backbone": "xcit_nano_12_p16_224", "stem": "none"}}, defaults) == {}
    assert config_changes(saved, {"model": {"backbone": "xcit_nano_12_p16_224", "stem": "haar_bands"}}, defaults) == {
        "model.stem": ("none", "haar_bands")}
