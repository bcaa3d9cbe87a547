"""DINO projection head and the multi-crop wrapper (one backbone pass per crop resolution)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm


class DINOHead(nn.Module):
    """MLP (``layers`` linear layers, GELU) to a ``bottleneck`` L2-normalised code, then a weight-normalised
    linear layer to ``out_dim`` prototypes.

    With ``norm_last_layer`` the last layer's norm ``g`` is frozen at 1, so its rows stay unit
    vectors: the reference's choice for stability with ViT-small/base (Caron et al., 2021, A.2).
    """

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 layers: int = 3, norm_last_layer: bool = True) -> None:
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (layers - 1) + [bottleneck_dim]
        blocks: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(dims, dims[1:])):
            blocks.append(nn.Linear(a, b))
            if i < len(dims) - 2:
                blocks.append(nn.GELU())
        self.mlp = nn.Sequential(*blocks)
        self.apply(self._init)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        magnitude = self.last_layer.parametrizations.weight.original0
        magnitude.data.fill_(1.0)
        magnitude.requires_grad = not norm_last_layer

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(F.normalize(self.mlp(x), dim=-1, p=2))


class MultiCrop(nn.Module):
    """Backbone + head over a list of crops: crops of the same size go through the backbone together.

    DINO feeds 2 global and 8 local crops; running each resolution once as one batch (rather than
    each crop separately) is what makes a training step cheap. Outputs are concatenated crop by
    crop, (n_crops * B, out_dim), the layout :class:`bonylib.ssl.loss.DINOLoss` expects.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, crops: list[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        if isinstance(crops, torch.Tensor):
            crops = [crops]
        sizes = torch.tensor([c.shape[-1] for c in crops])
        ends = torch.cumsum(torch.unique_consecutive(sizes, return_counts=True)[1], 0).tolist()
        features, start = [], 0
        for end in ends:
            features.append(self.backbone(torch.cat(crops[start:end])))
            start = end
        return self.head(torch.cat(features))
