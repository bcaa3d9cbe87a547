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

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

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


def backbone_tokens(backbone: nn.Module, x: torch.Tensor, masks: torch.Tensor | None = None,
                    mask_token: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(pooled, patch tokens)`` of a timm ViT or XCiT (or a stemmed one) through timm's ``forward_features``:
    the pooled feature timm's own head would see (``forward_head(pre_logits=True)``: ViT's CLS after its final
    norm, XCiT's CLS after the class-attention blocks), and the patch tokens after the final norm with the class
    and register tokens dropped. The pooled feature is exactly what ``backbone(x)`` returns with
    ``num_classes=0``; the tokens come from the same pass.

    With ``masks`` (``(B, rows, columns)`` bool, the patch grid) the patch embeddings of masked patches are
    replaced by ``mask_token`` (``(D,)``) before the position embedding and the blocks (:func:`mask_embeddings`):
    what a masked patch's pixels can still reach is said there, and :func:`hide_patches` removes it.

    A model whose features are not a token sequence (B, N, D), such as a CNN's (B, C, H, W) feature map, has no
    patch tokens: None, rather than channels read as tokens."""
    with mask_embeddings(backbone, masks, mask_token):
        features = backbone.forward_features(x)
    pooled = backbone.forward_head(features, pre_logits=True)
    if features.ndim != 3:
        return pooled, None
    prefix = int(getattr(backbone, "num_prefix_tokens", 1))
    return pooled, features[:, prefix:]


def patch_pixels(backbone: nn.Module) -> int:
    """The side in input pixels of the patch one token covers (the stem's downsampling included)."""
    patch = backbone.patch_embed.patch_size
    return int(patch if isinstance(patch, int) else patch[0])


@contextlib.contextmanager
def mask_embeddings(backbone: nn.Module, masks: torch.Tensor | None, mask_token: torch.Tensor | None) -> Iterator[None]:
    """Inside the block, the backbone's patch embedding puts ``mask_token`` in place of the patches ``masks`` marks
    (a forward hook on timm's ``patch_embed``, so timm's own ``forward_features`` runs on): iBOT's masked image,
    as DINOv2 builds it, before the position embedding, which the masked tokens keep. Nothing happens without
    ``masks``.

    What of a masked patch's pixels still reaches the network through this replacement alone:

    - ViT: nothing. Its patch embedding is one convolution whose stride is its kernel, so a token is computed from
      its own patch's pixels only, and there is no BatchNorm.
    - XCiT: its convolutional patch stem (four 3x3 convolutions of stride 2, BatchNorm after each) gives a token a
      receptive field of 31 x 31 pixels, its own 16 x 16 patch and the 15 pixels before it (left, above). So the
      unmasked patch right of, below, or diagonally below-right of a masked one carries 15 of the masked patch's 16
      pixel columns (rows) in its embedding, and the blocks (XCA, the LPI's 3x3 depthwise convolutions over the
      token grid) carry that to the masked token. Only masked patches on the right or bottom edge of a masked block
      leak so; inside a block, every neighbour that sees their pixels is masked too. In training mode the stem's
      BatchNorm also normalises with batch statistics of every pixel position, masked ones included: each masked
      pixel moves every token a little. The LPI's BatchNorm sees masked tokens only as they are (mask token, position,
      what the blocks mixed in), never their pixels.

    :func:`hide_patches` closes both XCiT paths: the student's masked patches are blanked in the image before the
    stem, so no convolution or batch statistic sees their pixels (tested in ``tests/test_masking.py``: the
    student's every output is unchanged, bit for bit, when a masked patch's pixels change, for ViT and XCiT).
    """
    if masks is None:
        yield
        return
    if mask_token is None:
        raise ValueError("mask_embeddings: masks given without a mask token")

    def replace(module: nn.Module, inputs: tuple, output: Any) -> Any:
        embeddings = output[0] if isinstance(output, tuple) else output  # XCiT: (tokens, (rows, columns))
        where = masks.reshape(*embeddings.shape[:-1], 1)  # (B, N, 1) for XCiT and flat ViT, (B, H, W, 1) for NHWC
        replaced = torch.where(where, mask_token.to(embeddings.dtype), embeddings)
        return (replaced, *output[1:]) if isinstance(output, tuple) else replaced

    handle = timm_model(backbone).patch_embed.register_forward_hook(replace)
    try:
        yield
    finally:
        handle.remove()


def hide_patches(images: torch.Tensor, masks: torch.Tensor, patch: int) -> torch.Tensor:
    """``images`` (B, 3, H, W) with the pixels of every masked patch (``masks`` (B, H / patch, W / patch)) set to 0,
    the normalised images' mean colour, so that no overlapping convolution or batch statistic of the patch stem sees
    them (:func:`mask_embeddings` says why XCiT needs it; for ViT it changes nothing)."""
    pixels = masks.repeat_interleave(patch, dim=1).repeat_interleave(patch, dim=2)
    return images.masked_fill(pixels[:, None], 0.0)


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
