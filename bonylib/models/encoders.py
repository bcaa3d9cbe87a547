"""The encoder contract of the frozen-encoder benchmarks: a model and everything needed to use it.

A benchmark never sees a bare ``nn.Module``: it sees an :class:`Encoder`, which carries the eval
transform (input size, mean, std), the output width, the patch size and the precision the
features are computed in, and an ``identity`` that names exactly which weights these are. The
embedding store keys its cache on :meth:`Encoder.fingerprint`, so embeddings computed by another
encoder (other weights, another output, another input size) are never mixed with these.

The builders (Bony exports, random init, timm files, Hibou, HistoEncoder, the handcrafted baseline)
are in :mod:`bonylib.models.loaders`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import nn

from bonylib.errors import ConfigError
from bonylib.models.backbones import backbone_tokens
from bonylib.runtime import Precision

OUTPUTS: tuple[str, ...] = ("cls", "cls+mean", "patch")
"""What :meth:`Encoder.embed` returns: the pooled (CLS) feature, CLS concatenated with the mean
patch token (timm/DINOv2's linear-probe input), or the patch tokens (B, N, D) for the decoders."""

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class Encoder:
    """A frozen feature extractor: ``tokens`` maps a normalised batch (B, 3, S, S) to
    ``(cls (B, D), patches (B, N, D) or None)``; everything else says how to feed and name it.

    ``identity`` is a JSON-able dict of what determines the features (kind, architecture, the
    weights' SHA-256 or the random seed, output, input size, mean, std). Two encoders with the same
    identity give the same features; the embedding store relies on it.
    """

    name: str
    tokens: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    embed_dim: int
    patch_size: int | None
    identity: dict[str, Any]
    precision: Precision = field(default_factory=lambda: Precision("fp32", "fp32", "the default"))
    module: nn.Module | None = None
    """The underlying network (eval mode), for device moves and attention maps; None for handcrafted features."""

    def transform(self, image: Any) -> torch.Tensor:
        """A PIL image -> the normalised (3, S, S) float tensor this encoder expects (no augmentation)."""
        if image.size != (self.input_size, self.input_size):
            image = image.resize((self.input_size, self.input_size))
        pixels = torch.from_numpy(np.asarray(image.convert("RGB"), np.float32) / 255.0).permute(2, 0, 1)
        return (pixels - torch.tensor(self.mean).view(3, 1, 1)) / torch.tensor(self.std).view(3, 1, 1)

    def dim(self, output: str = "cls") -> int:
        """Width of one embedding of ``output`` (per token for ``patch``)."""
        check_output(output)
        return 2 * self.embed_dim if output == "cls+mean" else self.embed_dim

    @torch.inference_mode()
    def embed(self, batch: torch.Tensor, output: str = "cls") -> torch.Tensor:
        """Features of a normalised batch as float32 on the batch's device: (B, D), or (B, N, D) for ``patch``."""
        check_output(output)
        device = batch.device
        with self.precision.autocast(device):
            cls, patches = self.tokens(batch)
        if output == "cls":
            return cls.float()
        if patches is None:
            raise ConfigError(f"encoder {self.name} has no patch tokens; use output 'cls'")
        if output == "patch":
            return patches.float()
        return torch.cat([cls.float(), patches.float().mean(dim=1)], dim=1)

    def fingerprint(self, output: str = "cls") -> str:
        """SHA-256 of the identity and ``output``: the key of this encoder's embeddings on disk."""
        check_output(output)
        payload = json.dumps({**self.identity, "output": output, "input_size": self.input_size,
                              "mean": list(self.mean), "std": list(self.std)}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()

    def to(self, device: torch.device | str) -> Encoder:
        """Move the network (if any) to ``device``; returns self."""
        if self.module is not None:
            self.module.to(device)
        return self


def check_output(output: str) -> None:
    """Refuse an unknown output name with the choices."""
    if output not in OUTPUTS:
        raise ConfigError(f"embedding output '{output}' is not one of {', '.join(OUTPUTS)}")


def from_backbone(module: nn.Module, name: str, input_size: int, mean: tuple[float, float, float],
                  std: tuple[float, float, float], identity: dict[str, Any],
                  precision: Precision | None = None) -> Encoder:
    """An :class:`Encoder` around a timm backbone already in memory (an export, a random init, the
    trainer's teacher during k-NN monitoring). The module is put in eval mode."""
    module.eval()
    patch = getattr(getattr(module, "patch_embed", None), "patch_size", None)
    patch_size = int(patch[0] if isinstance(patch, (tuple, list)) else patch) if patch is not None else None
    return Encoder(name=name, tokens=partial(backbone_tokens, module), input_size=input_size, mean=tuple(mean), std=tuple(std),
                   embed_dim=int(module.num_features), patch_size=patch_size, identity=identity,
                   precision=precision or Precision("fp32", "fp32", "the default"), module=module)
