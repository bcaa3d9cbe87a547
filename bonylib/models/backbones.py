"""Backbones from timm, created without downloading anything.

XCiT (the seed's choice, cross-covariance attention: cost linear in the number of patches, so
96-px local crops and large tiles are cheap) and ViT. XCiT takes any input size as it is; timm's
ViT needs ``dynamic_img_size`` to interpolate its position embeddings for local crops.
"""

from __future__ import annotations

import timm
import torch
from torch import nn

from bonylib.errors import ConfigError

BACKBONES: tuple[str, ...] = (
    "xcit_nano_12_p16_224", "xcit_tiny_12_p16_224", "xcit_tiny_24_p16_224", "xcit_small_12_p16_224",
    "xcit_small_24_p16_224", "xcit_medium_24_p16_224",
    "vit_tiny_patch16_224", "vit_small_patch16_224", "vit_base_patch16_224",
)


def create_backbone(name: str, drop_path_rate: float = 0.0, seed: int | None = None) -> nn.Module:
    """A randomly initialised backbone that returns pooled features (``num_features`` wide).

    With ``seed`` the weights come from that seed without touching torch's global generator, so
    random-initialisation baselines can be drawn repeatably in the middle of a run.
    """
    if name not in BACKBONES:
        raise ConfigError(f"model.backbone '{name}' is not supported (choose from {', '.join(BACKBONES)})")
    extra = {"dynamic_img_size": True} if name.startswith("vit_") else {}
    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        return timm.create_model(name, pretrained=False, num_classes=0, drop_path_rate=drop_path_rate, **extra)


def no_weight_decay(name: str, parameter: nn.Parameter) -> bool:
    """Parameters left out of weight decay: biases, norm weights, layer-scale gains (all 1-D) and
    XCiT's per-head attention temperature, which weight decay would pull to zero (flat attention)."""
    return parameter.ndim <= 1 or name.endswith(".bias") or name.endswith(".temperature")


def parameter_groups(model: nn.Module) -> list[dict]:
    """Two AdamW groups: decayed weights, and the rest with ``weight_decay=0`` (never scheduled)."""
    decay, keep = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            (keep if no_weight_decay(name, parameter) else decay).append(parameter)
    return [{"params": decay, "apply_weight_decay": True}, {"params": keep, "apply_weight_decay": False, "weight_decay": 0.0}]
