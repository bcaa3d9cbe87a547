"""Attention maps of timm ViT and XCiT encoders, captured by forward hooks during an ordinary forward pass.

The maps are read where timm computes them, never recomputed by a copy of its forward:

- **ViT** (``timm.models.vision_transformer.VisionTransformer``): every block's softmax attention is the
  output of its ``attn.attn_drop`` (timm's unfused path, the module :class:`timm.utils.AttentionExtract`
  hooks by default); the CLS token's row over the patch tokens is kept, register tokens dropped.
- **XCiT** (``timm.models.xcit.Xcit``), whose XCA attention is channel x channel and has no spatial map:
  (a) the class-attention blocks' CLS row (``ClassAttn.attn_drop``), XCiT's real spatial map;
  (b) the seed's map: per head, the norm of each token's XCA output vector (the input of ``XCA.proj``,
  where the heads are still separate); (c) the d x d matrices
  ``softmax(temperature * normalize(q)^T normalize(k))`` per head (``XCA.attn_drop``).

Fused attention (``scaled_dot_product_attention``) returns no weights, so :func:`unfused_attention`
turns it off for the capture and restores each module's own setting afterwards. ``timm.layers.set_fused_attn``
is no help here: it only sets the default of modules built later. ``AttentionExtract`` is not used either:
its hooks are never removed and keep each block's full N x N matrix, where only the CLS row is needed
(O(N) per block instead of O(N^2), which matters for 1024-px tiles).

Every CLS map is renormalised to sum to 1 over the patches (as DINO's ``visualize_attention`` does before
thresholding), so heads and encoders with and without register tokens compare on one scale; the share of
the CLS attention that went to the patches at all (the rest goes to the CLS token itself and to registers)
is kept beside it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from timm.layers import Attention
from timm.models.cait import ClassAttn
from timm.models.vision_transformer import VisionTransformer
from timm.models.xcit import XCA, Xcit
from torch import nn

from bonylib.errors import ConfigError
from bonylib.models.backbones import timm_model
from bonylib.models.encoders import Encoder


@contextlib.contextmanager
def unfused_attention(module: nn.Module) -> Iterator[None]:
    """Switch every submodule's ``fused_attn`` off inside the block and restore each one's own value after,
    even on error, so a model used for training or embedding afterwards runs exactly as before."""
    saved = [(m, bool(m.fused_attn)) for m in module.modules() if hasattr(m, "fused_attn")]
    try:
        for m, _ in saved:
            m.fused_attn = False
        yield
    finally:
        for m, flag in saved:
            m.fused_attn = flag


@dataclass(frozen=True)
class AttentionMaps:
    """The maps of one batch, float32 arrays on the CPU; ``(gh, gw)`` is the patch grid of the input.

    ``cls`` (B, L, heads, gh, gw): the CLS token's attention over the patches, each map summing to 1; L is
    the ViT's blocks or XCiT's class-attention blocks. ``cls_patch_mass`` (B, L, heads): the share of the CLS
    attention those patches received before renormalising. XCiT only, L = its XCA blocks:
    ``token_norms`` (B, L, heads, gh, gw) and ``channel_attention`` (B, L, heads, d, d).
    """

    architecture: str
    cls: np.ndarray
    cls_patch_mass: np.ndarray
    token_norms: np.ndarray | None = None
    channel_attention: np.ndarray | None = None


BLOCK_NAMES = {"vit": "ViT blocks", "xcit": "class-attention blocks"}
"""What the blocks of each architecture's CLS maps are called in messages and figures."""


def cls_attention_modules(module: nn.Module) -> tuple[str, list[nn.Module]]:
    """The architecture (``vit`` or ``xcit``) and the attention modules whose CLS row is the map, one per block;
    a :class:`ConfigError` for a model whose attention is not timm's own (its forward is what the hooks rely on).
    A backbone behind a wavelet stem is read through its timm model: its patch grid is the plain model's."""
    module = timm_model(module)
    if isinstance(module, VisionTransformer) and module.cls_token is not None:
        architecture, attentions, kinds = "vit", [block.attn for block in module.blocks], (Attention,)
    elif isinstance(module, Xcit) and module.cls_attn_blocks is not None:
        architecture, attentions, kinds = "xcit", [block.attn for block in module.cls_attn_blocks], (ClassAttn,)
        if not all(isinstance(block.attn, XCA) for block in module.blocks):
            raise ConfigError("this XCiT's blocks do not use timm's XCA, whose forward the hooks read")
    else:
        lacking = " without one" if isinstance(module, (VisionTransformer, Xcit)) else ""
        raise ConfigError(f"attention maps need a timm ViT or XCiT with a class token; this is a "
                          f"{type(module).__name__}{lacking}")
    unknown = {type(a).__name__ for a in attentions if not isinstance(a, kinds)}
    if unknown:
        raise ConfigError(f"attention maps read timm's {kinds[0].__name__}; this model uses {', '.join(unknown)}")
    return architecture, attentions


class AttentionCapture:
    """Forward hooks on a timm ViT or XCiT keeping the maps of the last forward pass (see :func:`capture_attention`)."""

    def __init__(self, module: nn.Module) -> None:
        module = timm_model(module)
        self.architecture, attentions = cls_attention_modules(module)
        self.prefix = int(module.num_prefix_tokens)
        self._grid: tuple[int, int] | None = None
        self._cls: dict[int, torch.Tensor] = {}
        self._norms: dict[int, torch.Tensor] = {}
        self._channels: dict[int, torch.Tensor] = {}
        self._handles = [module.patch_embed.register_forward_hook(self._keep_grid)]
        for index, attention in enumerate(attentions):
            self._handles.append(attention.attn_drop.register_forward_hook(self._keeper(self._cls, index, _cls_row)))
        if self.architecture == "xcit":
            for index, block in enumerate(module.blocks):
                self._handles.append(block.attn.attn_drop.register_forward_hook(
                    self._keeper(self._channels, index, lambda t: t)))
                self._handles.append(block.attn.proj.register_forward_pre_hook(
                    self._keeper(self._norms, index, _head_norms(block.attn.num_heads))))

    def _keep_grid(self, patch_embed: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        """The patch grid of this input: XCiT's stem returns it; timm's ViT stem computes it from the image size."""
        if self.architecture == "xcit":
            self._grid = (int(output[1][0]), int(output[1][1]))
        else:
            self._grid = tuple(int(n) for n in patch_embed.dynamic_feat_size(tuple(args[0].shape[-2:])))

    @staticmethod
    def _keeper(store: dict[int, torch.Tensor], index: int,
                reduce: Callable[[torch.Tensor], torch.Tensor]) -> Callable[..., None]:
        """A hook that keeps ``reduce`` of what the module saw, detached in float32: a forward hook's output,
        or a pre-hook's first input (the hook is called with ``(module, args)`` or ``(module, args, output)``)."""

        def hook(_module: nn.Module, args: tuple[Any, ...], *output: Any) -> None:
            tensor = output[0] if output else args[0]
            store[index] = reduce(tensor.detach().float())

        return hook

    def maps(self) -> AttentionMaps:
        """The maps of the last forward pass; raises if none ran since the hooks were installed."""
        if self._grid is None or not self._cls:
            raise RuntimeError("no forward pass ran inside capture_attention")
        gh, gw = self._grid
        rows = _stacked(self._cls)  # (B, L, heads, tokens)
        patches = rows[..., self.prefix:]
        if patches.shape[-1] != gh * gw:
            raise RuntimeError(f"{patches.shape[-1]} patch tokens do not fill a {gh}x{gw} grid")
        mass = patches.sum(dim=-1)
        cls = (patches / mass[..., None]).unflatten(-1, (gh, gw))
        norms = channels = None
        if self.architecture == "xcit":
            norms = _stacked(self._norms).unflatten(-1, (gh, gw)).cpu().numpy()
            channels = _stacked(self._channels).cpu().numpy()
        return AttentionMaps(self.architecture, cls.cpu().numpy(), mass.cpu().numpy(), norms, channels)

    def remove(self) -> None:
        """Remove every hook this capture installed."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def _stacked(store: dict[int, torch.Tensor]) -> torch.Tensor:
    """The kept tensors of every block, stacked in block order on a new axis 1."""
    return torch.stack([store[i] for i in sorted(store)], dim=1)


def _cls_row(attention: torch.Tensor) -> torch.Tensor:
    """The CLS query's row (B, heads, tokens) of a (B, heads, queries, tokens) attention (class attention has one)."""
    return attention[:, :, 0, :]


def _head_norms(heads: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """From XCA's ``proj`` input (B, N, C), channels grouped by head, each token's norm per head (B, heads, N)."""

    def reduce(x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (heads, x.shape[-1] // heads)).norm(dim=-1).transpose(1, 2)

    return reduce


@contextlib.contextmanager
def capture_attention(module: nn.Module) -> Iterator[AttentionCapture]:
    """Hooks on ``module`` (a timm ViT or XCiT in eval mode) with fused attention off: run any forward pass inside
    the block, then ``capture.maps()``. On leaving, the hooks are removed and ``fused_attn`` restored.

    The model's outputs inside equal its outputs outside up to float rounding (timm's unfused path computes
    the same softmax attention), and are bit-identical again afterwards.
    """
    if module.training:
        raise ConfigError("attention maps are taken in eval mode (dropout and drop-path off); call module.eval()")
    capture = AttentionCapture(module)
    try:
        with unfused_attention(module):
            yield capture
    finally:
        capture.remove()


def encode(encoder: Encoder, batch: torch.Tensor) -> tuple[torch.Tensor, AttentionMaps]:
    """The encoder's pooled features of a normalised batch (:meth:`Encoder.embed`) and the attention maps of the
    same forward pass: one pass gives the slide heatmaps both their maps and their PCA colours."""
    if encoder.module is None:
        raise ConfigError(f"encoder {encoder.name} has no network to take attention maps from")
    with capture_attention(encoder.module) as capture:
        features = encoder.embed(batch)
        return features, capture.maps()


def select_block(count: int, block: int, what: str) -> int:
    """``block`` as an index into ``count`` blocks (negative counts from the end, -1 the last); ``what`` names them."""
    if not -count <= block < count:
        raise ConfigError(f"block {block} does not exist: the model has {count} {what} "
                          f"(0..{count - 1}, or -1 for the last)")
    return block % count


def check_threshold(fraction: float) -> float:
    """``fraction`` if it is a share of attention mass to keep, in (0, 1]; else a :class:`ConfigError`."""
    if not 0.0 < fraction <= 1.0:
        raise ConfigError(f"threshold must be in (0, 1] (0.6 keeps 60 % of the attention mass), got {fraction}")
    return fraction


def top_mass_mask(maps: np.ndarray, fraction: float) -> np.ndarray:
    """Boolean mask over the last two axes of ``maps`` keeping the fewest, largest values whose sum is at least
    ``fraction`` of the map's total: DINO's ``visualize_attention --threshold`` (0.6 keeps 60 % of the mass)."""
    check_threshold(fraction)
    flat = np.asarray(maps, np.float64).reshape(*maps.shape[:-2], -1)
    order = np.argsort(-flat, axis=-1, kind="stable")
    values = np.take_along_axis(flat, order, axis=-1)
    before = np.cumsum(values, axis=-1) - values  # mass of the larger values ranked ahead of each one
    keep_sorted = before < fraction * flat.sum(axis=-1, keepdims=True)
    mask = np.zeros(flat.shape, bool)
    np.put_along_axis(mask, order, keep_sorted, axis=-1)
    return mask.reshape(maps.shape)


@dataclass(frozen=True)
class TileMaps:
    """Images as an encoder saw them and one (gh, gw) map each: what a figure of many tiles draws."""

    names: list[str]
    tiles: list[np.ndarray]
    """(input_size, input_size, 3) uint8: each image resized as the encoder's eval transform resized it"""
    maps: list[np.ndarray]
    """the mean over heads of the chosen block's CLS attention, summing to 1 over the patches"""
