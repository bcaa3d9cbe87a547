"""The options of a pretraining run, one dataclass per config section (``bony pretrain --help`` lists them).

Kept apart from the trainer so that what a run trains (these schemas) reads in one place, and so that code
which only needs a run's settings (comparisons of runs, the chapters) does not load the training loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from bonylib.config import check_fractions, option, section
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


CENTERINGS = ("ema", "sinkhorn_knopp")
OBJECTIVES = ("dino", "dinov2")


@dataclass
class LossConfig:
    """Temperatures and centering of the self-distillation terms (DINO's, and iBOT's under objective: dinov2)."""

    warmup_teacher_temp: float = option(0.04, "teacher temperature at the start")
    teacher_temp: float = option(0.04, "teacher temperature after the warm-up")
    warmup_teacher_temp_epochs: int = option(0, "epochs of linear teacher-temperature warm-up")
    student_temp: float = option(0.1, "student temperature")
    center_momentum: float = option(0.9, "EMA momentum of the teacher-output center (centering: ema)")
    centering: str = option("ema", "how the teacher's targets are centred: ema (DINO: subtract an EMA of the teacher's "
                            "mean output) or sinkhorn_knopp (DINOv2: equal-partition targets of each global batch)")
    sinkhorn_iterations: int = option(3, "Sinkhorn-Knopp rounds (centering: sinkhorn_knopp; DINOv2: 3)")

    def __post_init__(self) -> None:
        if self.centering not in CENTERINGS:
            raise ConfigError(f"loss.centering must be one of {', '.join(CENTERINGS)}, got '{self.centering}'")
        if self.sinkhorn_iterations < 1:
            raise ConfigError(f"loss.sinkhorn_iterations must be at least 1, got {self.sinkhorn_iterations}")


@dataclass
class DINOv2Config:
    """The terms ``objective: dinov2`` trains beside DINO's, each with its weight (0 leaves a term out), and iBOT's
    masks and patch head (read only under objective: dinov2)."""

    dino_weight: float = option(1.0, "weight of the DINO term (image level: CLS of every crop)")
    ibot_weight: float = option(1.0, "weight of the iBOT term: the student predicts the teacher's patch tokens at "
                                "masked patches of the global crops (DINOv2: 1.0)")
    koleo_weight: float = option(0.1, "weight of the KoLeo regulariser on the student's pre-head CLS of the global "
                                 "crops, summed over the global crops (DINOv2: 0.1)")
    kde_weight: float = option(0.0, "weight of the KDE (von Mises-Fisher kernel) regulariser on the same features, "
                               "Virchow2's and Midnight's replacement for KoLeo")
    kde_concentration: float = option(5.0, "concentration kappa of the KDE's von Mises-Fisher kernel (Virchow2: 5)")
    mask_probability: float = option(0.5, "share of the global crops that are masked (DINOv2: 0.5)")
    mask_ratio: list[float] = option([0.1, 0.5], "range of the share of a masked crop's patches hidden [min, max] "
                                     "(DINOv2: 0.1-0.5), as blocks")
    separate_patch_head: bool = option(False, "score patch tokens with a head of their own (same sizes as the DINO "
                                       "head) rather than with the DINO head (DINOv2's default: shared)")

    def __post_init__(self) -> None:
        for name in ("dino_weight", "ibot_weight", "koleo_weight", "kde_weight"):
            if getattr(self, name) < 0:
                raise ConfigError(f"dinov2.{name} must be at least 0, got {getattr(self, name)}")
        if self.dino_weight == 0:
            raise ConfigError("dinov2.dino_weight must be above 0: the DINO term's teacher entropy is the run's "
                              "collapse signal")
        if self.kde_concentration <= 0:
            raise ConfigError(f"dinov2.kde_concentration must be above 0, got {self.kde_concentration}")
        check_fractions("dinov2", self, ("mask_probability",))
        if len(self.mask_ratio) != 2 or not 0.0 <= self.mask_ratio[0] <= self.mask_ratio[1] <= 1.0:
            raise ConfigError(f"dinov2.mask_ratio must be [min, max] with 0 <= min <= max <= 1, got {self.mask_ratio}")


@dataclass
class DataConfig:
    """Where the pretraining images come from (one of the two)."""

    manifest: str = option("", "a bony tile manifest.parquet (tiles from its shards, or from the slides)")
    images: str = option("", "a folder of images (any size; crops are taken from each)")
    tile_px: int = option(224, "side of the tiles read from a manifest")
    balance_by: str = option("", "a manifest column to balance the tiles drawn by: each epoch draws its tiles (with "
                             "replacement) so that every value of the column is drawn as often, e.g. cluster, the "
                             "column bony curate writes (empty: every tile once per epoch, shuffled)")
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
    objective: str = option("dino", "dino: the DINO loss alone; dinov2: DINO plus the terms of the dinov2 section "
                            "(iBOT masked patches, KoLeo or KDE) at their weights")
    model: ModelConfig = section(ModelConfig, "backbone and head")
    crops: CropConfig = section(CropConfig, "multi-crop views and histology augmentations")
    optim: OptimConfig = section(OptimConfig, "optimiser and schedules")
    loss: LossConfig = section(LossConfig, "self-distillation temperatures and centering")
    dinov2: DINOv2Config = section(DINOv2Config, "the terms objective: dinov2 adds, and iBOT's masks")
    data: DataConfig = section(DataConfig, "pretraining images")
    log_every: int = option(10, "optimisation steps between log.jsonl lines")
    tensorboard: bool = option(False, "also write every log.jsonl value as a TensorBoard scalar under tensorboard/")
    checkpoint_every: int = option(100, "optimisation steps between checkpoints (and one at every epoch end)")
    keep_checkpoints: int = option(3, "numbered checkpoints kept besides checkpoint.pth")
    max_steps: int = option(0, "stop after this many optimisation steps (0: train all epochs); for tests and timing")
    resume: ResumeConfig = section(ResumeConfig, "resuming a run")

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"objective must be one of {', '.join(OBJECTIVES)}, got '{self.objective}'")

    @property
    def masked_modelling(self) -> bool:
        """Whether the run masks the student's global crops (the iBOT term is on)."""
        return self.objective == "dinov2" and self.dinov2.ibot_weight > 0
