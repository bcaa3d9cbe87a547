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
from typing import Any, Protocol

import torch
from torch import nn
from torch.utils.data import DataLoader

from bonylib.config import save_config, to_dict
from bonylib.errors import BonyError
from bonylib.files import append_line, ensure_writable_dir, write_text_atomic
from bonylib.models.backbones import parameter_groups, patch_pixels
from bonylib.models.export import export_encoder
from bonylib.runtime import CpuLoad, Precision, busy_cpus, machine_record, plan_threads, resolve_precision
from bonylib.signals import catch_stop_signals, ignore_stop_signals, release_stop_signals, stop_received
from bonylib.ssl import checkpoints
from bonylib.ssl.augment import views_transform
from bonylib.ssl.config import TrainConfig
from bonylib.ssl.data import (Batch, EpochSampler, SeededViews, balance_weights, collate_views, images_from,
                              manifest_column)
from bonylib.ssl.distributed import World, all_reduce_max, all_reduce_mean, barrier, init_distributed
from bonylib.ssl.masking import BlockMasking
from bonylib.ssl.model import SelfDistillation
from bonylib.ssl.runs import RunLog
from bonylib.ssl.schedules import cosine_schedule

log = logging.getLogger(__name__)


STOPPED = "preempted.json"
"""Written into the run folder, after the checkpoint, when a signal stopped training, and removed when the
run starts again: how a batch script tells a stop to resume (requeue) from a crash (fail), whatever exit
status its launcher reports (torchrun turns the workers' 143 into 1)."""


class Preempted(BonyError):
    """SIGTERM or SIGUSR1 arrived: a checkpoint was written and training stopped, to be resumed."""


class Monitor(Protocol):
    """An evaluation of the teacher during training (the k-NN monitor, given by :mod:`bonylib.compose.pretrain`):
    it runs at the end of every ``every_epochs``-th epoch and of the run, and its scores are logged. It must leave
    training as it was (RNG, train/eval mode), since it runs between steps."""

    every_epochs: int

    def __call__(self, backbone: nn.Module, precision: Precision) -> dict[str, float]: ...


class Trainer:
    """One self-distillation run: data, models and objectives, optimiser, schedules, checkpoints and the loop."""

    def __init__(self, cfg: TrainConfig, out: Path, world: World | None = None, monitor: Monitor | None = None) -> None:
        self.cfg, self.out, self.monitor = cfg, ensure_writable_dir(Path(out)), monitor
        self.world = world or init_distributed()
        self.device = torch.device(f"cuda:{self.world.local_rank}" if torch.cuda.is_available() else "cpu")
        self.precision = resolve_precision(cfg.optim.precision, self.device)
        on_cpu = self.device.type == "cpu"
        self.threads = plan_threads(cfg.data.workers, gpu=not on_cpu, busy=busy_cpus() if on_cpu else 0.0)
        self.threads.apply()
        self._load = CpuLoad() if on_cpu else None  # read again at every logged step: the load changes during a run
        log.info("precision %s (asked: %s; %s); %d torch threads (%s) and %d data workers on %d usable CPUs",
                 self.precision.name, self.precision.requested, self.precision.reason, self.threads.torch_threads,
                 self.threads.reason, self.threads.workers, self.threads.cpus)
        torch.manual_seed(cfg.seed)
        images = images_from(cfg.data.manifest, cfg.data.images, cfg.data.tile_px)
        weights = balance_weights(manifest_column(images, cfg.data.balance_by, cfg.data.manifest)) \
            if cfg.data.balance_by else None
        self.sampler = EpochSampler(len(images), cfg.optim.batch_size, self.world.rank, self.world.size, cfg.seed,
                                    weights)
        self.steps_per_epoch = self.sampler.batches_per_epoch // cfg.optim.accumulate
        if self.steps_per_epoch == 0:
            raise BonyError(f"an epoch has {self.sampler.batches_per_epoch} batches, fewer than optim.accumulate")
        self.model = SelfDistillation(cfg, self.device, self._memory_format, distributed=self.world.size > 1)
        self.views = SeededViews(images, views_transform(cfg.crops), cfg.seed, self._masking(), cfg.crops.global_crops)
        self.optimizer = torch.optim.AdamW(parameter_groups(self.model.student_network), lr=0.0, foreach=True)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision.name == "fp16")
        total_batch = cfg.optim.batch_size * cfg.optim.accumulate * self.world.size
        total_steps = cfg.optim.epochs * self.steps_per_epoch
        self.lr = cosine_schedule(cfg.optim.lr * total_batch / 256, cfg.optim.min_lr, cfg.optim.epochs,
                                  self.steps_per_epoch, cfg.optim.warmup_epochs)
        self.wd = cosine_schedule(cfg.optim.weight_decay, cfg.optim.weight_decay_end, cfg.optim.epochs, self.steps_per_epoch)
        self.momentum = cosine_schedule(cfg.optim.momentum_teacher, 1.0, cfg.optim.epochs, self.steps_per_epoch)
        self.total_steps = min(total_steps, cfg.max_steps) if cfg.max_steps else total_steps
        self.step = 0
        self._step_start: tuple[dict[str, torch.Tensor], torch.Tensor] | None = None  # objectives' state and RNG
        self.log = RunLog(self.out, cfg.tensorboard)

    @property
    def resolved_config(self) -> TrainConfig:
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

    def _masking(self) -> BlockMasking | None:
        """iBOT's block masks for the patch grid of a global crop (None when the run does not mask)."""
        if not self.cfg.masked_modelling:
            return None
        side = self.cfg.crops.global_size // patch_pixels(self.model.student_network.backbone)
        low, high = self.cfg.dinov2.mask_ratio
        return BlockMasking((side, side), self.cfg.dinov2.mask_probability, low, high)

    @property
    def _memory_format(self) -> torch.memory_format:
        """Layout of weights and crops, from ``model.channels_last``."""
        return torch.channels_last if self.cfg.model.channels_last else torch.contiguous_format

    # ---- checkpoints -------------------------------------------------------------------------

    def _objectives_state(self) -> dict[str, torch.Tensor]:
        """A copy of every objective's state (DINO's center), on the CPU."""
        return {key: value.detach().cpu().clone() for key, value in self.model.objectives.state_dict().items()}

    def state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "student": self.model.student_network.state_dict(),
            "teacher": self.model.teacher.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "losses": self._objectives_state(),
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
        self.model.student_network.load_state_dict(state["student"])
        self.model.teacher.load_state_dict(state["teacher"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.model.objectives.load_state_dict(checkpoints.objectives_state(state))
        torch.set_rng_state(state["rng_cpu"])
        if torch.cuda.is_available() and state["rng_cuda"]:
            torch.cuda.set_rng_state_all(state["rng_cuda"])
        self.step = int(state["step"])
        log.info("resumed from %s at step %d", path, self.step)
        return True

    def _accept_config(self, saved: dict[str, Any], path: Path, step: int) -> None:
        """Refuse a resume whose config differs from the checkpoint's in keys that change what is trained
        (one line naming them); record the changes that are accepted in ``config_changes.jsonl``."""
        changes = checkpoints.config_changes(saved, to_dict(self.resolved_config), to_dict(type(self.cfg)()))
        refused = checkpoints.refused_changes(changes, self.cfg.resume.allow_changes, to_dict(TrainConfig()))
        if refused:
            listed = ", ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in refused.items())
            raise BonyError(f"{path}: was trained with another config ({listed}); rerun with its values "
                            f"(see {self.out / 'config.yaml'}), use a new --out, or allow the change with "
                            f"resume.allow_changes=[{','.join(refused)}]")
        if changes and self.world.is_main:
            append_line(self.out / "config_changes.jsonl",
                        json.dumps({"step": step, "changes": {k: list(v) for k, v in changes.items()}}))
            log.info("resuming with changed config: %s", ", ".join(changes))

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
                          num_workers=self.threads.workers, collate_fn=collate_views, drop_last=True,
                          worker_init_fn=ignore_stop_signals,
                          pin_memory=self.device.type == "cuda")

    def _forward_backward(self, batch: Batch, epoch: int, sync: bool, metrics: list[dict[str, float]] | None
                          ) -> dict[str, torch.Tensor]:
        """One micro-batch: its named losses (detached); the objectives' metrics are appended to ``metrics`` when
        given (logged steps). Under DDP the gradients are all-reduced only when ``sync`` (the last of an
        accumulation)."""
        batch = Batch([c.to(self.device, non_blocking=True, memory_format=self._memory_format) for c in batch.crops],
                      None if batch.masks is None else batch.masks.to(self.device, non_blocking=True))
        # DDP would all-reduce after every backward; the forward and backward of a non-final micro-batch run
        # under no_sync so only the accumulated gradient crosses the network
        with contextlib.nullcontext() if sync or self.world.size == 1 else self.model.student.no_sync():
            with self.precision.autocast(self.device):
                losses, teacher = self.model(batch, epoch)
                total = sum(losses.values())
            self.scaler.scale(total / self.cfg.optim.accumulate).backward()
        if metrics is not None:
            metrics.append(self.model.metrics(teacher, epoch))
        return {"loss": total.detach(), **{f"loss_{name}": value.detach() for name, value in losses.items()}}

    def _optimizer_step(self, epoch: int) -> None:
        student = self.model.student_network
        self.scaler.unscale_(self.optimizer)
        if self.cfg.optim.clip_grad:
            for p in student.parameters():
                if p.grad is not None:
                    norm = p.grad.norm(2)
                    p.grad.mul_(torch.clamp(self.cfg.optim.clip_grad / (norm + 1e-6), max=1.0))
        if epoch < self.cfg.optim.freeze_last_layer:
            for head in student.heads:
                for p in head.last_layer.parameters():
                    p.grad = None
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.model.update_teacher(float(self.momentum[self.step]))

    def train(self) -> Path:
        """Train until ``total_steps`` (resuming if a checkpoint exists); export the teacher; return the folder."""
        self.resume()
        if self.world.is_main:  # only once the resume checks passed: a refused rerun leaves the run's record as it was
            (self.out / STOPPED).unlink(missing_ok=True)
            self._record_runtime()
            self.log.open(self.step)
        catch_stop_signals()  # already done at process start by `python -m bonylib pretrain`
        try:
            self._train_steps()
            # a signal now, after the last step, is too late to stop anything: the export is finished, not lost
            if self.world.is_main:
                teacher = self.model.teacher
                export_encoder(teacher.backbone, teacher.head, self.cfg.model.backbone, self.cfg.crops.global_size,
                               self.cfg.crops.mean, self.cfg.crops.std, self.out, self.step)
        finally:
            release_stop_signals()
            self.log.close()
        return self.out

    def _train_steps(self) -> None:
        """The loop: optimisation steps until ``total_steps``, with logs, the monitor, checkpoints and signals."""
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
        """Optimisation steps until ``total_steps``, with logs, the monitor, checkpoints, and a stop at a signal."""
        accumulate = self.cfg.optim.accumulate
        while self.step < self.total_steps:
            epoch, step_in_epoch = divmod(self.step, self.steps_per_epoch)
            started, images = time.perf_counter(), 0
            losses: list[dict[str, torch.Tensor]] = []
            metrics: list[dict[str, float]] = []
            for batch_index, batch in enumerate(self._loader(epoch, step_in_epoch * accumulate)):
                if batch_index % accumulate == 0:  # what a stop in the middle of this step must restore
                    self._step_start = (self._objectives_state(), torch.get_rng_state())
                self._set_schedules(self.step)
                logged = self._logs(self.step + 1)  # metrics (the entropy: a softmax over K) only for logged steps
                losses.append(self._forward_backward(batch, epoch, (batch_index + 1) % accumulate == 0,
                                                     metrics if logged else None))
                images += batch.crops[0].shape[0] * self.world.size
                if (batch_index + 1) % accumulate:
                    continue
                names = list(losses[0])
                means = all_reduce_mean(torch.stack([torch.stack([l[n] for l in losses]).mean() for n in names]))
                step_losses = dict(zip(names, means.tolist()))
                if not math.isfinite(step_losses["loss"]):
                    raise BonyError(f"loss is {step_losses['loss']} at step {self.step}: training stopped; the last "
                                    f"good checkpoint is {self.out / 'checkpoint.pth'} (lower optim.lr or use fp32)")
                self._optimizer_step(epoch)
                self.step += 1
                self._step_start = None
                if logged:
                    self._log(epoch, step_losses, _mean_metrics(metrics), images, started)
                    self._follow_load()
                losses, metrics = [], []
                started, images = time.perf_counter(), 0
                end_of_epoch = self.step % self.steps_per_epoch == 0
                if self.monitor is not None and (end_of_epoch and (epoch + 1) % self.monitor.every_epochs == 0
                                                 or self.step == self.total_steps):
                    monitor_started = time.perf_counter()
                    self._log_monitor(epoch)
                    self._progress.paused_s += time.perf_counter() - monitor_started
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
        """Checkpoint the last finished step and raise :class:`Preempted`. Stopped inside a step, the objectives'
        state and the RNG that its forward passes moved are first put back, so the resumed run repeats the step
        exactly (the weights and the optimizer change only at the step's end)."""
        if self._step_start is not None:
            objectives, rng = self._step_start
            self.model.objectives.load_state_dict(objectives)
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

    def _log_monitor(self, epoch: int) -> None:
        if not self.world.is_main:
            return
        assert self.monitor is not None
        scores = self.monitor(self.model.teacher.backbone, self.precision)
        self.log.write({"step": self.step, "epoch": epoch, **scores})
        log.info("step %d: %s", self.step, ", ".join(f"{key} {value:.3f}" for key, value in scores.items()))

    def _follow_load(self) -> None:
        """On a CPU, give torch the threads that the load since the last logged step leaves free (a job that
        started on the machine meanwhile, or left it): each process of a run on its own, since threads do not
        change what processes exchange. OMP_NUM_THREADS pins the count (:func:`~bonylib.runtime.plan_threads`)."""
        if self._load is None:
            return
        plan = plan_threads(self.cfg.data.workers, busy=self._load.busy())
        if plan.torch_threads != self.threads.torch_threads:
            log.info("torch threads %d -> %d at step %d: %s", self.threads.torch_threads, plan.torch_threads,
                     self.step, plan.reason)
            plan.apply()
            self.threads = plan

    def _logs(self, step: int) -> bool:
        """Whether optimisation step ``step`` (counted from 1) writes a log.jsonl line."""
        return step % self.cfg.log_every == 0 or step == self.total_steps

    def _log(self, epoch: int, losses: dict[str, float], metrics: dict[str, float], images: int, started: float) -> None:
        if not self.world.is_main:
            return
        seconds = time.perf_counter() - started
        record = {
            "step": self.step, "epoch": epoch, **losses, "lr": float(self.lr[self.step - 1]),
            "wd": float(self.wd[self.step - 1]), "momentum": float(self.momentum[self.step - 1]), **metrics,
            "images_per_s": images / max(seconds, 1e-9),
            "peak_memory_mb": (torch.cuda.max_memory_allocated() / 2**20) if self.device.type == "cuda" else _rss_mb(),
        }
        self.log.write(record)
        log.info("step %d/%d (epoch %d/%d): loss %.3f, %.1f images/s, %s left", self.step, self.total_steps, epoch + 1,
                 self.cfg.optim.epochs, losses["loss"], record["images_per_s"],
                 self._progress.left(self.step, self.total_steps))


def _mean_metrics(metrics: list[dict[str, float]]) -> dict[str, float]:
    """Each metric averaged over the micro-batches of a step that have it (iBOT's patch entropies need a masked
    patch)."""
    keys = dict.fromkeys(key for m in metrics for key in m)
    return {key: sum(m[key] for m in metrics if key in m) / sum(key in m for m in metrics) for key in keys}


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


def _rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
