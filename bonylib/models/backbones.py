"""Backbones from timm, created without downloading anything.

XCiT (the seed's choice, cross-covariance attention: cost linear in the number of patches, so
96-px local crops and large tiles are cheap) and ViT. XCiT takes any input size as it is; timm's
ViT needs ``dynamic_img_size`` to interpolate its position embeddings for local crops.

With a wavelet stem (``model.stem``, :mod:`bonylib.models.stems`) the timm model is built for the stem's
output (4x the channels for all Haar bands, half the image side, half the patch size) and wrapped in
:class:`StemmedBackbone`, which behaves as the timm model does for the rest of Bony (pooled features,
``forward_features``/``forward_head``, ``num_features``, the patch size in image pixels).
"""

from __future__ import annotations

from dataclasses import dataclass

import timm
import torch
from torch import nn

from bonylib.errors import ConfigError
from bonylib.models.stems import HaarStem, create_stem, stem_name

BACKBONES: tuple[str, ...] = (
    "xcit_nano_12_p16_224", "xcit_tiny_12_p16_224", "xcit_tiny_24_p16_224", "xcit_small_12_p16_224",
    "xcit_small_24_p16_224", "xcit_medium_24_p16_224", "xcit_small_12_p8_224", "xcit_medium_24_p8_224",
    "vit_tiny_patch16_224", "vit_small_patch16_224", "vit_base_patch16_224", "vit_small_patch8_224",
    "vit_base_patch8_224",
)
"""The backbones Bony trains and loads: XCiT and ViT, every architecture facebookresearch/dino released among them
(ViT-S/B at patch 16 and 8, XCiT-S12 and M24 at patch 16 and 8)."""


@dataclass(frozen=True)
class EffectivePatch:
    """The patch a stemmed backbone's token covers in the input image (the timm model's patch times the
    stem's downsampling): what ``patch_embed.patch_size`` tells encoders and attention maps."""

    patch_size: tuple[int, int]


class StemmedBackbone(nn.Module):
    """A fixed input stem followed by a timm backbone, seen from outside as the timm backbone on images.

    The stem has no weights, so :func:`timm_model` gives a plain timm model whose state dict is the
    whole of this module's (what the export writes, and what timm alone loads).
    """

    def __init__(self, stem: HaarStem, model: nn.Module) -> None:
        super().__init__()
        self.stem, self.model = stem, model

    @property
    def num_features(self) -> int:
        return int(self.model.num_features)

    @property
    def num_prefix_tokens(self) -> int:
        return int(getattr(self.model, "num_prefix_tokens", 1))

    @property
    def patch_embed(self) -> EffectivePatch:
        patch = self.model.patch_embed.patch_size
        height, width = (patch, patch) if isinstance(patch, int) else patch
        return EffectivePatch((2 * height, 2 * width))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(self.stem(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.model.forward_head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.stem(x))


def create_backbone(name: str, drop_path_rate: float = 0.0, seed: int | None = None, stem: str = "none") -> nn.Module:
    """A randomly initialised backbone that returns pooled features (``num_features`` wide).

    With ``seed`` the weights come from that seed without touching torch's global generator, so
    random-initialisation baselines can be drawn repeatably in the middle of a run.

    With a ``stem`` other than ``none``, the timm model takes the stem's channels at half the image
    side with half the patch size (``img_size`` halved too, so ViT's position embeddings are learned
    for the same patch grid as the plain model's, not interpolated from a grid twice as fine): a tile
    then gives exactly the tokens it gives the plain model.
    """
    if name not in BACKBONES:
        raise ConfigError(f"model.backbone '{name}' is not supported (choose from {', '.join(BACKBONES)})")
    stem_module = create_stem(stem)
    extra = {"dynamic_img_size": True} if name.startswith("vit_") else {}
    if stem_module is not None:
        with torch.device("meta"):  # the plain model's patch and image size, without initialising weights
            plain = timm.create_model(name, pretrained=False, num_classes=0).patch_embed
        patch = plain.patch_size if isinstance(plain.patch_size, int) else plain.patch_size[0]
        extra |= {"in_chans": 3 * stem_module.channel_factor, "img_size": plain.img_size[0] // 2,
                  "patch_size": patch // 2}
    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        model = timm.create_model(name, pretrained=False, num_classes=0, drop_path_rate=drop_path_rate, **extra)
    return model if stem_module is None else StemmedBackbone(stem_module, model)


def timm_model(backbone: nn.Module) -> nn.Module:
    """The timm model of a backbone from :func:`create_backbone`: the model inside a :class:`StemmedBackbone`,
    else the backbone itself. Its state dict is what an export writes and loads."""
    return backbone.model if isinstance(backbone, StemmedBackbone) else backbone


def backbone_stem(backbone: nn.Module) -> str:
    """The ``model.stem`` a backbone from :func:`create_backbone` was built with (read off the module, so an
    export records what the weights were trained behind)."""
    return stem_name(backbone.stem if isinstance(backbone, StemmedBackbone) else None)


def backbone_tokens(backbone: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pooled, patch tokens)`` of a timm ViT or XCiT (or a stemmed one) through timm's ``forward_features``:
    the pooled feature timm's own head would see (``forward_head(pre_logits=True)``: ViT's CLS after its final
    norm, XCiT's CLS after the class-attention blocks), and the patch tokens after the final norm with the class
    and register tokens dropped. The pooled feature is exactly what ``backbone(x)`` returns with
    ``num_classes=0``; the tokens come from the same pass."""
    features = backbone.forward_features(x)
    prefix = int(getattr(backbone, "num_prefix_tokens", 1))
    return backbone.forward_head(features, pre_logits=True), features[:, prefix:]


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
