"""The options of a pretraining run, one dataclass per config section (``bony pretrain --help`` lists them).

Kept apart from the trainer so that what a run trains (these schemas) reads in one place, and so that code
which only needs a run's settings (comparisons of runs, the chapters) does not load the training loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from bonylib.config import option, section
from bonylib.errors import ConfigError
from bonylib.runtime import PRECISIONS
from bonylib.ssl.augment import CropConfig


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
class TrainConfig:
    """What ``bony pretrain`` trains, and how the run is logged and checkpointed (the k-NN monitor is added by
    :class:`bonylib.compose.pretrain.PretrainConfig`: it is an evaluation, which this stage does not import)."""

    seed: int = option(0, "seed of weights, data order and crops")
    model: ModelConfig = section(ModelConfig, "backbone and head")
    crops: CropConfig = section(CropConfig, "multi-crop views and histology augmentations")
    optim: OptimConfig = section(OptimConfig, "optimiser and schedules")
    loss: LossConfig = section(LossConfig, "DINO loss")
    data: DataConfig = section(DataConfig, "pretraining images")
    log_every: int = option(10, "optimisation steps between log.jsonl lines")
    tensorboard: bool = option(False, "also write every log.jsonl value as a TensorBoard scalar under tensorboard/")
    checkpoint_every: int = option(100, "optimisation steps between checkpoints (and one at every epoch end)")
    keep_checkpoints: int = option(3, "numbered checkpoints kept besides checkpoint.pth")
    max_steps: int = option(0, "stop after this many optimisation steps (0: train all epochs); for tests and timing")
    resume: ResumeConfig = section(ResumeConfig, "resuming a run")
