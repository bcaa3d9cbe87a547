"""``bony pretrain``: DINO self-distillation of a timm backbone on tiles, from one CPU to many GPUs.

The loop follows facebookresearch/dino (multi-crop student, EMA teacher on global crops, centred
and sharpened teacher targets, AdamW with cosine schedules, last layer frozen at first, gradient
clipping) and adds what a shared cluster needs: gradient accumulation, autocast in the precision the
hardware computes fastest (``precision: auto``), threads sized to the CPUs the job may use,
checkpoints that resume exactly (same losses as an uninterrupted run), SIGTERM/SIGUSR1 handling
for pre-emption, and a fall-back to the previous checkpoint when the latest is unreadable.

Output folder::

    config.yaml                      resolved config (precision and workers as they ran)
    runtime.json                     the machine, the precision chosen and why, the thread split
    log.jsonl                        one JSON object per logged step
    tensorboard/                     the same values as TensorBoard scalars (with tensorboard=true)
    checkpoint.pth                   latest full state (also checkpoint-<step>.pth, the last k kept), each with
                                     a .sha256 checksum that is verified before a resume trusts it
    config_changes.jsonl             every config change a resume accepted (run-only keys, resume.allow_changes)
    teacher_backbone.safetensors     the exported teacher backbone ...
    teacher_head.safetensors         ... its DINO head (the seed's decoders read the head's output) ...
    teacher_backbone.json            ... and what is needed to rebuild and feed them, with both files' SHA-256
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import torch
from torch import nn
from torch.utils.data import DataLoader

from bonylib.config import option, save_config, section, to_dict
from bonylib.errors import BonyError, ConfigError
from bonylib.evaluation.knn import KnnConfig, monitor_scores
from bonylib.files import append_line, ensure_writable_dir, write_text_atomic
from bonylib.models.backbones import create_backbone, parameter_groups
from bonylib.models.export import export_encoder
from bonylib.models.head import DINOHead, MultiCrop
from bonylib.runtime import PRECISIONS, machine_record, plan_threads, resolve_precision
from bonylib.signals import catch_stop_signals, ignore_stop_signals, release_stop_signals, stop_received
from bonylib.ssl import checkpoints
from bonylib.ssl.augment import CropConfig, MultiCrop as MultiCropTransform, collate_crops
from bonylib.ssl.data import EpochSampler, SeededViews, images_from
from bonylib.ssl.distributed import World, all_reduce_max, all_reduce_mean, barrier, init_distributed
from bonylib.ssl.ema import update_teacher
from bonylib.ssl.loss import DINOLoss
from bonylib.ssl.schedules import cosine_schedule

log = logging.getLogger(__name__)


@dataclass
class ModelConfig:
    """Backbone and DINO head."""

    backbone: str = option("xcit_nano_12_p16_224", "timm backbone (xcit_* or vit_*), randomly initialised")
    out_dim: int = option(4096, "prototypes of the DINO head (the seed compared 1024-8192 and kept 4096)")
    hidden_dim: int = option(2048, "width of the head's MLP")
    bottleneck_dim: int = option(256, "L2-normalised bottleneck before the last layer")
    norm_last_layer: bool = option(True, "freeze the norm of the last layer's rows at 1 (stabler)")
    drop_path: float = option(0.1, "stochastic depth of the student backbone")
    channels_last: bool = option(True, "convolutions (XCiT's stem and LPI) in channels-last memory format: about 1.07x "
                                 "the step on CPU in bf16 (benchmarks/bench_train_step.py --trials contiguous)")
    stem: str = option("none", "input stem before the backbone: none, haar_approx (the one-level Haar approximation "
                       "band, 3 channels at half resolution) or haar_bands (all four Haar bands, 12 channels); the "
                       "patch size is halved with it, so a crop gives the same tokens as without the stem")


@dataclass
class OptimConfig:
    """Optimiser and schedules (per optimisation step)."""

    epochs: int = option(10, "passes over the data")
    batch_size: int = option(32, "images per process per forward pass")
    accumulate: int = option(1, "forward passes whose gradients make one optimisation step")
    lr: float = option(0.0005, "peak learning rate for a total batch of 256 (scaled linearly with the total batch)")
    min_lr: float = option(1e-6, "learning rate at the end of the cosine")
    warmup_epochs: float = option(1.0, "linear learning-rate warm-up")
    weight_decay: float = option(0.04, "weight decay at the start (cosine to weight_decay_end)")
    weight_decay_end: float = option(0.4, "weight decay at the end")
    momentum_teacher: float = option(0.996, "teacher EMA momentum at the start (cosine to 1)")
    clip_grad: float = option(3.0, "clip each parameter's gradient norm to this (0: no clipping)")
    freeze_last_layer: int = option(1, "epochs during which the head's last layer is not updated")
    precision: str = option("auto", "autocast precision: auto (bf16 where the GPU or CPU computes it natively, fp16 "
                            "on other GPUs, else fp32), bf16, fp16 (GPU, with a gradient scaler) or fp32")

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ConfigError(f"optim.precision must be one of {', '.join(PRECISIONS)}, got '{self.precision}'")
        if min(self.epochs, self.batch_size, self.accumulate) < 1:
            raise ConfigError("optim.epochs, optim.batch_size and optim.accumulate must be at least 1")


@dataclass
class LossConfig:
    """DINO loss temperatures and centering."""

    warmup_teacher_temp: float = option(0.04, "teacher temperature at the start")
    teacher_temp: float = option(0.04, "teacher temperature after the warm-up")
    warmup_teacher_temp_epochs: int = option(0, "epochs of linear teacher-temperature warm-up")
    student_temp: float = option(0.1, "student temperature")
    center_momentum: float = option(0.9, "EMA momentum of the teacher-output center")


@dataclass
class DataConfig:
    """Where the pretraining images come from (one of the two)."""

    manifest: str = option("", "a bony tile manifest.parquet (tiles from its shards, or from the slides)")
    images: str = option("", "a folder of images (any size; crops are taken from each)")
    tile_px: int = option(224, "side of the tiles read from a manifest")
    workers: Union[int, str] = option("auto", "DataLoader worker processes: auto (from the CPUs this process may use: "
                                      "affinity, cgroup quota, SLURM_CPUS_PER_TASK) or a number (0: load in the trainer)")

    def __post_init__(self) -> None:
        if self.workers != "auto" and not (isinstance(self.workers, int) and self.workers >= 0):
            raise ConfigError(f"data.workers must be auto or a number >= 0, got '{self.workers}'")


@dataclass
class ResumeConfig:
    """What a rerun over an existing run folder may change."""

    allow_changes: list[str] = option([], "config keys a resume may change besides the run-only ones (workers, "
                                      "logging, checkpoint cadence, max_steps, knn.*), e.g. [optim.lr]; each change "
                                      "is recorded in config_changes.jsonl")


@dataclass
class PretrainConfig:
    """Options of ``bony pretrain``."""

    seed: int = option(0, "seed of weights, data order and crops")
    model: ModelConfig = section(ModelConfig, "backbone and head")
    crops: CropConfig = section(CropConfig, "multi-crop views and histology augmentations")
    optim: OptimConfig = section(OptimConfig, "optimiser and schedules")
    loss: LossConfig = section(LossConfig, "DINO loss")
    data: DataConfig = section(DataConfig, "pretraining images")
    knn: KnnConfig = section(KnnConfig, "k-NN monitoring")
    log_every: int = option(10, "optimisation steps between log.jsonl lines")
    tensorboard: bool = option(False, "also write every log.jsonl value as a TensorBoard scalar under tensorboard/")
    checkpoint_every: int = option(100, "optimisation steps between checkpoints (and one at every epoch end)")
    keep_checkpoints: int = option(3, "numbered checkpoints kept besides checkpoint.pth")
    max_steps: int = option(0, "stop after this many optimisation steps (0: train all epochs); for tests and timing")
    resume: ResumeConfig = section(ResumeConfig, "resuming a run")


STOPPED = "preempted.json"
"""Written into the run folder, after the checkpoint, when a signal stopped training, and removed when the
run starts again: how a batch script tells a stop to resume (requeue) from a crash (fail), whatever exit
status its launcher reports (torchrun turns the workers' 143 into 1)."""


class Preempted(BonyError):
    """SIGTERM or SIGUSR1 arrived: a checkpoint was written and training stopped, to be resumed."""


class Trainer:
    """One DINO run: models, optimiser, schedules, data, checkpoints and the loop."""

    def __init__(self, cfg: PretrainConfig, out: Path, world: World | None = None) -> None:
        self.cfg, self.out = cfg, ensure_writable_dir(Path(out))
        self.world = world or init_distributed()
        self.device = torch.device(f"cuda:{self.world.local_rank}" if torch.cuda.is_available() else "cpu")
        self.precision = resolve_precision(cfg.optim.precision, self.device)
        self.threads = plan_threads(cfg.data.workers, gpu=self.device.type == "cuda")
        self.threads.apply()
        log.info("precision %s (asked: %s; %s); %d torch threads and %d data workers on %d usable CPUs",
                 self.precision.name, self.precision.requested, self.precision.reason, self.threads.torch_threads,
                 self.threads.workers, self.threads.cpus)
        torch.manual_seed(cfg.seed)
        images = images_from(cfg.data.manifest, cfg.data.images, cfg.data.tile_px)
        self.views = SeededViews(images, MultiCropTransform(cfg.crops), cfg.seed)
        self.sampler = EpochSampler(len(self.views), cfg.optim.batch_size, self.world.rank, self.world.size, cfg.seed)
        self.steps_per_epoch = self.sampler.batches_per_epoch // cfg.optim.accumulate
        if self.steps_per_epoch == 0:
            raise BonyError(f"an epoch has {self.sampler.batches_per_epoch} batches, fewer than optim.accumulate")
        self.student, self.teacher = self._models()
        self.groups = parameter_groups(self.student)
        self.optimizer = torch.optim.AdamW(self.groups, lr=0.0, foreach=True)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision.name == "fp16")
        n_crops = cfg.crops.global_crops + cfg.crops.local_crops
        self.loss = DINOLoss(cfg.model.out_dim, cfg.crops.global_crops, n_crops, cfg.optim.epochs,
                             cfg.loss.warmup_teacher_temp, cfg.loss.teacher_temp, cfg.loss.warmup_teacher_temp_epochs,
                             cfg.loss.student_temp, cfg.loss.center_momentum).to(self.device)
        total_batch = cfg.optim.batch_size * cfg.optim.accumulate * self.world.size
        total_steps = cfg.optim.epochs * self.steps_per_epoch
        self.lr = cosine_schedule(cfg.optim.lr * total_batch / 256, cfg.optim.min_lr, cfg.optim.epochs,
                                  self.steps_per_epoch, cfg.optim.warmup_epochs)
        self.wd = cosine_schedule(cfg.optim.weight_decay, cfg.optim.weight_decay_end, cfg.optim.epochs, self.steps_per_epoch)
        self.momentum = cosine_schedule(cfg.optim.momentum_teacher, 1.0, cfg.optim.epochs, self.steps_per_epoch)
        self.total_steps = min(total_steps, cfg.max_steps) if cfg.max_steps else total_steps
        self.step = 0
        self._step_start: tuple[torch.Tensor, torch.Tensor] | None = None  # center and RNG before the current step
        self._tensorboard: Any = None  # a SummaryWriter while train() runs with cfg.tensorboard

    @property
    def resolved_config(self) -> PretrainConfig:
        """The config as it runs: ``auto`` precision and workers replaced by what this machine resolved.

        This is what ``config.yaml`` and the checkpoints hold and what a resume is compared with, so
        rerunning with the saved ``config.yaml`` resumes, and a resume on a machine where ``auto`` means
        another precision is refused (the numerics would change mid-run) unless allowed."""
        cfg = self.cfg
        return dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, precision=self.precision.name),
                                   data=dataclasses.replace(cfg.data, workers=self.threads.workers))

    def _record_runtime(self) -> None:
        """Save the config as it runs and what machine ran it, and why."""
        save_config(self.resolved_config, self.out / "config.yaml")
        record = {"machine": machine_record(), "precision": dataclasses.asdict(self.precision),
                  "threads": dataclasses.asdict(self.threads), "world_size": self.world.size}
        write_text_atomic(self.out / "runtime.json", json.dumps(record, indent=2) + "\n")

    def _models(self) -> tuple[nn.Module, nn.Module]:
        cfg = self.cfg.model
        backbone = create_backbone(cfg.backbone, drop_path_rate=cfg.drop_path, stem=cfg.stem)
        student = MultiCrop(backbone, DINOHead(backbone.num_features, cfg.out_dim, cfg.hidden_dim, cfg.bottleneck_dim,
                                               norm_last_layer=cfg.norm_last_layer))
        teacher_backbone = create_backbone(cfg.backbone, stem=cfg.stem)
        teacher = MultiCrop(teacher_backbone, DINOHead(backbone.num_features, cfg.out_dim, cfg.hidden_dim,
                                                       cfg.bottleneck_dim, norm_last_layer=cfg.norm_last_layer))
        teacher.load_state_dict(student.state_dict())
        for p in teacher.parameters():
            p.requires_grad = False
        student = student.to(self.device, memory_format=self._memory_format)
        teacher = teacher.to(self.device, memory_format=self._memory_format)
        if self.world.size > 1:
            if self.device.type == "cuda":  # SyncBatchNorm exists only on GPUs (XCiT's stem and LPI)
                student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
                teacher = nn.SyncBatchNorm.convert_sync_batchnorm(teacher)
            student = nn.parallel.DistributedDataParallel(
                student, device_ids=[self.world.local_rank] if self.device.type == "cuda" else None)
        return student, teacher

    @property
    def _memory_format(self) -> torch.memory_format:
        """Layout of weights and crops, from ``model.channels_last``."""
        return torch.channels_last if self.cfg.model.channels_last else torch.contiguous_format

    @property
    def _student_module(self) -> nn.Module:
        return self.student.module if isinstance(self.student, nn.parallel.DistributedDataParallel) else self.student

    # ---- checkpoints -------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "student": self._student_module.state_dict(),
            "teacher": self.teacher.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "center": self.loss.center.detach().cpu(),
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "config": to_dict(self.resolved_config),
        }

    def save_checkpoint(self) -> None:
        """Write ``checkpoint-<step>.pth`` with its checksum and make it ``checkpoint.pth`` (main process only)."""
        if self.world.is_main:
            checkpoints.save(self.state(), self.out, self.step, self.cfg.keep_checkpoints)

    def resume(self) -> bool:
        """Load the newest sound checkpoint (older ones when the latest is corrupt), after checking that the
        config is the one it was trained with; False when the folder has no checkpoint."""
        found = checkpoints.load_latest(self.out)
        if found is None:
            return False
        state, path = found
        self._accept_config(state["config"], path, int(state["step"]))
        self._student_module.load_state_dict(state["student"])
        self.teacher.load_state_dict(state["teacher"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.loss.center.copy_(state["center"].to(self.device))
        torch.set_rng_state(state["rng_cpu"])
        if torch.cuda.is_available() and state["rng_cuda"]:
            torch.cuda.set_rng_state_all(state["rng_cuda"])
        self.step = int(state["step"])
        log.info("resumed from %s at step %d", path, self.step)
        return True

    def _accept_config(self, saved: dict[str, Any], path: Path, step: int) -> None:
        """Refuse a resume whose config differs from the checkpoint's in keys that change what is trained
        (one line naming them); record the changes that are accepted in ``config_changes.jsonl``."""
        changes = checkpoints.config_changes(saved, to_dict(self.resolved_config), to_dict(PretrainConfig()))
        refused = checkpoints.refused_changes(changes, self.cfg.resume.allow_changes)
        if refused:
            listed = ", ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in refused.items())
            raise BonyError(f"{path}: was trained with another config ({listed}); rerun with its values "
                            f"(see {self.out / 'config.yaml'}), use a new --out, or allow the change with "
                            f"resume.allow_changes=[{','.join(refused)}]")
        if changes and self.world.is_main:
            append_line(self.out / "config_changes.jsonl",
                        json.dumps({"step": step, "changes": {k: list(v) for k, v in changes.items()}}))
            log.info("resuming with changed config: %s", ", ".join(changes))

    def _trim_log(self) -> None:
        """Drop log.jsonl lines past the resumed step (logged before an interruption, to be logged again) and a
        line cut short by a kill, so the log has each step once."""
        path = self.out / "log.jsonl"
        if not path.is_file():
            return
        lines = path.read_text().splitlines()
        kept = []
        for line in lines:
            with contextlib.suppress(json.JSONDecodeError):
                if json.loads(line)["step"] <= self.step:
                    kept.append(line)
        if len(kept) < len(lines):
            log.warning("%s: dropping %d line(s) logged after step %d (the step training resumes from)", path,
                        len(lines) - len(kept), self.step)
            write_text_atomic(path, "".join(f"{line}\n" for line in kept))

    # ---- training ----------------------------------------------------------------------------

    def _set_schedules(self, step: int) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = float(self.lr[step])
            if group["apply_weight_decay"]:
                group["weight_decay"] = float(self.wd[step])

    def _loader(self, epoch: int, start_batch: int) -> DataLoader:
        self.views.epoch = epoch
        self.sampler.set_epoch(epoch, start_batch)
        return DataLoader(self.views, batch_size=self.cfg.optim.batch_size, sampler=self.sampler,
                          num_workers=self.threads.workers, collate_fn=collate_crops, drop_last=True,
                          worker_init_fn=ignore_stop_signals,
                          pin_memory=self.device.type == "cuda")

    def _forward_backward(self, crops: list[torch.Tensor], epoch: int, sync: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """One micro-batch; under DDP the gradients are all-reduced only when ``sync`` (the last of an accumulation)."""
        crops = [c.to(self.device, non_blocking=True, memory_format=self._memory_format) for c in crops]
        n_global = self.cfg.crops.global_crops
        # DDP would all-reduce after every backward; the forward and backward of a non-final micro-batch run
        # under no_sync so only the accumulated gradient crosses the network
        with contextlib.nullcontext() if sync or self.world.size == 1 else self.student.no_sync():
            with self.precision.autocast(self.device):
                with torch.no_grad():
                    teacher_out = self.teacher(crops[:n_global])
                student_out = self.student(crops)
                loss = self.loss(student_out, teacher_out, epoch)
            self.scaler.scale(loss / self.cfg.optim.accumulate).backward()
        return loss.detach(), teacher_out.detach()

    def _optimizer_step(self, epoch: int) -> None:
        self.scaler.unscale_(self.optimizer)
        if self.cfg.optim.clip_grad:
            for p in self._student_module.parameters():
                if p.grad is not None:
                    norm = p.grad.norm(2)
                    p.grad.mul_(torch.clamp(self.cfg.optim.clip_grad / (norm + 1e-6), max=1.0))
        if epoch < self.cfg.optim.freeze_last_layer:
            for p in self._student_module.head.last_layer.parameters():
                p.grad = None
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        update_teacher(self._student_module, self.teacher, float(self.momentum[self.step]))

    def train(self) -> Path:
        """Train until ``total_steps`` (resuming if a checkpoint exists); export the teacher; return the folder."""
        self.resume()
        if self.world.is_main:  # only once the resume checks passed: a refused rerun leaves the run's record as it was
            (self.out / STOPPED).unlink(missing_ok=True)
            self._record_runtime()
            self._trim_log()
        if self.cfg.tensorboard and self.world.is_main:
            from torch.utils.tensorboard import SummaryWriter

            # events past the checkpoint (logged before an interruption) are dropped: one event per step
            self._tensorboard = SummaryWriter(str(self.out / "tensorboard"), purge_step=self.step + 1)
        catch_stop_signals()  # already done at process start by `python -m bonylib pretrain`
        try:
            self._train_steps()
            # a signal now, after the last step, is too late to stop anything: the export is finished, not lost
            if self.world.is_main:
                export_encoder(self.teacher.backbone, self.teacher.head, self.cfg.model.backbone,
                               self.cfg.crops.global_size, self.cfg.crops.mean, self.cfg.crops.std, self.out, self.step)
        finally:
            release_stop_signals()
            if self._tensorboard is not None:
                self._tensorboard.close()
                self._tensorboard = None
        return self.out

    def _train_steps(self) -> None:
        """The loop: optimisation steps until ``total_steps``, with logs, k-NN, checkpoints and signals."""
        self._progress = _Progress(time.perf_counter(), self.step)
        try:
            # a signal caught while the run was being set up (imports, data, resume) stops it before its first step
            early = all_reduce_max(stop_received() or 0, self.device)
            if early:
                self._stop(early)
            self._run_steps()
        except RuntimeError:
            # a stop signal sent to the whole process group (SLURM, `kill` of the job) can reach a DataLoader
            # worker before it has set itself to ignore it: the worker dies and torch raises in this process,
            # wherever it is; the run then stops as for the signal itself
            if stop_received() is None:
                raise
            self._stop(stop_received())

    def _run_steps(self) -> None:
        """Optimisation steps until ``total_steps``, with logs, k-NN, checkpoints, and a stop at a received signal."""
        accumulate = self.cfg.optim.accumulate
        while self.step < self.total_steps:
            epoch, step_in_epoch = divmod(self.step, self.steps_per_epoch)
            started, images = time.perf_counter(), 0
            losses, entropies = [], []
            for batch_index, (crops, _) in enumerate(self._loader(epoch, step_in_epoch * accumulate)):
                if batch_index % accumulate == 0:  # what a stop in the middle of this step must restore
                    self._step_start = (self.loss.center.detach().clone(), torch.get_rng_state())
                self._set_schedules(self.step)
                loss, teacher_out = self._forward_backward(crops, epoch, sync=(batch_index + 1) % accumulate == 0)
                losses.append(loss)
                if self._logs(self.step + 1):  # the entropy costs a softmax over K: only for logged steps
                    entropies.append(_entropy(teacher_out, self.loss.center, self.loss.teacher_temperature(epoch)))
                images += crops[0].shape[0] * self.world.size
                if (batch_index + 1) % accumulate:
                    continue
                mean_loss = all_reduce_mean(torch.stack(losses).mean()).item()
                if not math.isfinite(mean_loss):
                    raise BonyError(f"loss is {mean_loss} at step {self.step}: training stopped; the last good "
                                    f"checkpoint is {self.out / 'checkpoint.pth'} (lower optim.lr or use fp32)")
                self._optimizer_step(epoch)
                self.step += 1
                self._step_start = None
                if self._logs(self.step):
                    self._log(epoch, mean_loss, torch.stack(entropies).mean().item(), images, started, teacher_out)
                losses, entropies = [], []
                started, images = time.perf_counter(), 0
                end_of_epoch = self.step % self.steps_per_epoch == 0
                if end_of_epoch and (epoch + 1) % self.cfg.knn.every_epochs == 0 or self.step == self.total_steps:
                    knn_started = time.perf_counter()
                    self._log_knn(epoch)
                    self._progress.paused_s += time.perf_counter() - knn_started
                if self.step % self.cfg.checkpoint_every == 0 or end_of_epoch or self.step == self.total_steps:
                    self.save_checkpoint()
                # SLURM signals one rank, or each at its own moment: all stop after the same step, or the others
                # would wait forever in the next step's all-reduce
                stop = all_reduce_max(stop_received() or 0, self.device)
                if stop:
                    self._stop(stop)
                if self.step >= self.total_steps or end_of_epoch:
                    break

    def _stop(self, signum: int) -> None:
        """Checkpoint the last finished step and raise :class:`Preempted`. Stopped inside a step, the center and
        the RNG that its forward passes moved are first put back, so the resumed run repeats the step exactly
        (the weights and the optimizer change only at the step's end)."""
        if self._step_start is not None:
            center, rng = self._step_start
            self.loss.center.copy_(center)
            torch.set_rng_state(rng)
        self.save_checkpoint()
        if self.world.is_main:
            record = {"step": self.step, "signal": signal.Signals(signum).name, "time": time.time(),
                      "slurm_job_id": os.environ.get("SLURM_JOB_ID"), "slurm_restart_count": os.environ.get("SLURM_RESTART_COUNT")}
            write_text_atomic(self.out / STOPPED, json.dumps(record) + "\n")
        # no rank exits before the checkpoint is on disk: `srun --kill-on-bad-exit` ends the whole step as soon
        # as one task exits non-zero, which would kill the main process in the middle of writing it
        barrier()
        raise Preempted(f"signal {signal.Signals(signum).name} at step {self.step}: checkpoint written to {self.out}, "
                        f"rerun the same command to resume")

    def knn_scores(self, backbone: nn.Module | None = None) -> dict[str, float]:
        """Weighted k-NN accuracy and balanced accuracy of ``backbone`` (default: the teacher's) on the
        monitoring tiles, slides held out: ``knn_*`` on the tiles' labels, ``knn_*_cancer`` on cancer vs benign."""
        return monitor_scores(backbone or self.teacher.backbone, self.cfg.knn, self.cfg.seed, self.cfg.crops.global_size,
                              self.cfg.crops.mean, self.cfg.crops.std, self.precision)

    def _log_knn(self, epoch: int) -> None:
        if not (self.world.is_main and self.cfg.knn.manifest):
            return
        scores = self.knn_scores()
        self._write({"step": self.step, "epoch": epoch, **scores})
        log.info("step %d: k-NN balanced accuracy %.3f (labels), %.3f (cancer vs benign)", self.step,
                 scores["knn_balanced_accuracy"], scores["knn_balanced_accuracy_cancer"])

    def _write(self, record: dict[str, Any]) -> None:
        """Append one record to log.jsonl and, when enabled, its numbers to TensorBoard at its step."""
        append_line(self.out / "log.jsonl", json.dumps(record))
        if self._tensorboard is not None:
            for key, value in record.items():
                if key not in ("step", "epoch"):
                    self._tensorboard.add_scalar(f"pretrain/{key}", value, record["step"])

    def _logs(self, step: int) -> bool:
        """Whether optimisation step ``step`` (counted from 1) writes a log.jsonl line."""
        return step % self.cfg.log_every == 0 or step == self.total_steps

    def _log(self, epoch: int, loss: float, entropy: float, images: int, started: float, teacher_out: torch.Tensor) -> None:
        if not self.world.is_main:
            return
        seconds = time.perf_counter() - started
        record = {
            "step": self.step, "epoch": epoch, "loss": loss, "lr": float(self.lr[self.step - 1]),
            "wd": float(self.wd[self.step - 1]), "momentum": float(self.momentum[self.step - 1]),
            "teacher_temp": self.loss.teacher_temperature(epoch), "teacher_entropy": entropy,
            "collapse_entropy": math.log(self.cfg.model.out_dim),
            "feature_std": float(torch.nn.functional.normalize(teacher_out.float(), dim=-1).std(dim=0).mean()),
            "images_per_s": images / max(seconds, 1e-9),
            "peak_memory_mb": (torch.cuda.max_memory_allocated() / 2**20) if self.device.type == "cuda" else _rss_mb(),
        }
        self._write(record)
        log.info("step %d/%d (epoch %d/%d): loss %.3f, %.1f images/s, %s left", self.step, self.total_steps, epoch + 1,
                 self.cfg.optim.epochs, loss, record["images_per_s"], self._progress.left(self.step, self.total_steps))


@dataclass
class _Progress:
    """This process's pace: when it started training, from which step, and the seconds k-NN took since."""

    started: float
    first_step: int
    paused_s: float = 0.0

    def left(self, step: int, total_steps: int) -> str:
        """Time to ``total_steps`` at the mean pace so far, as ``4m07s``."""
        pace = (time.perf_counter() - self.started - self.paused_s) / max(step - self.first_step, 1)
        minutes, seconds = divmod(int(pace * (total_steps - step)), 60)
        return f"{minutes}m{seconds:02d}s"


def _entropy(teacher_out: torch.Tensor, center: torch.Tensor, temp: float) -> torch.Tensor:
    """Mean entropy of the teacher's target distributions: ln(out_dim) means uniform targets (collapse)."""
    p = torch.softmax((teacher_out.float() - center) / temp, dim=-1)
    return -(p * torch.log(p + 1e-12)).sum(dim=-1).mean()


def _rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
