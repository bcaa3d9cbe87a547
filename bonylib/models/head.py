"""DINO projection head and the multi-crop wrapper (one backbone pass per crop resolution, named outputs)."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from bonylib.models.backbones import backbone_tokens, hide_patches, patch_pixels


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


class CropOutputs(NamedTuple):
    """What the multi-crop wrapper gives for a list of crops, each part in the crops' order (crop by crop):

    - ``cls``: the pooled feature timm's own head would read, (n_crops * B, D), before the projection head;
    - ``patch``: the patch tokens after the final norm, one (n_crops_of_that_size * B, N, D) tensor per crop size
      (global crops first), prefix tokens dropped;
    - ``head``: the DINO head's logits, (n_crops * B, out_dim);
    - ``masked``: with masks, the patch head's logits of the masked patches of the global crops, (masked patches,
      patch out_dim), in the order of ``masks.nonzero()``; None without masks.

    A named tuple, so that DDP and torch's pytree see the tensors inside.
    """

    cls: torch.Tensor
    patch: list[torch.Tensor]
    head: torch.Tensor
    masked: torch.Tensor | None = None


class MultiCropWrapper(nn.Module):
    """Backbone + DINO head over a list of crops: crops of the same size go through the backbone together.

    DINO feeds 2 global and 8 local crops; running each resolution once as one batch (rather than
    each crop separately) is what makes a training step cheap. The backbone's outputs are read as named parts
    (:func:`bonylib.models.backbones.backbone_tokens`), so an objective can use the pooled feature, the patch
    tokens or the head's logits (:class:`CropOutputs`; the logits in the layout
    :class:`bonylib.ssl.losses.dino.DINOLoss` expects).

    For masked-image modelling (iBOT) the wrapper also holds a learned ``mask_token`` (``(D,)``, zeros at first as in
    DINOv2) and the head that scores patch tokens: ``patch_head``, a second DINO head, or the DINO head itself when
    shared. A DINO-only network has neither, so its state dict is what it always was.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, masked_modelling: bool = False,
                 patch_head: nn.Module | None = None) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head
        if masked_modelling:
            self.mask_token = nn.Parameter(torch.zeros(int(backbone.num_features)))
            if patch_head is not None:
                self.patch_head = patch_head
        elif patch_head is not None:
            raise ValueError("a patch head scores masked patches: it needs masked_modelling")

    def forward(self, crops: list[torch.Tensor] | torch.Tensor, masks: torch.Tensor | None = None,
                hide: bool = True) -> CropOutputs:
        """Outputs of ``crops``. ``masks`` (global crops * B, rows, columns) marks patches of the first crop size
        (the global crops): with ``hide`` (the student) their pixels are blanked (:func:`hide_patches`) and their
        embeddings replaced by the mask token; without (the teacher) the crops are seen whole. Either way the patch
        head scores the tokens at the masked places (``CropOutputs.masked``)."""
        if isinstance(crops, torch.Tensor):
            crops = [crops]
        sizes = torch.tensor([c.shape[-1] for c in crops])
        ends = torch.cumsum(torch.unique_consecutive(sizes, return_counts=True)[1], 0).tolist()
        pooled, patches, start = [], [], 0
        for end in ends:
            images = torch.cat(crops[start:end])
            if masks is not None and start == 0 and hide:
                images = hide_patches(images, masks, patch_pixels(self.backbone))
                cls, patch = backbone_tokens(self.backbone, images, masks, self.mask_token)
            else:
                cls, patch = backbone_tokens(self.backbone, images)
            pooled.append(cls)
            patches.append(patch)
            start = end
        cls = torch.cat(pooled)
        masked = None if masks is None else self.score_patches(patches[0][masks.flatten(1)])
        return CropOutputs(cls=cls, patch=patches, head=self.head(cls), masked=masked)

    @property
    def heads(self) -> list[nn.Module]:
        """The projection heads: the DINO head, and the patch head when it is a head of its own."""
        return [self.head, *([self.patch_head] if hasattr(self, "patch_head") else [])]

    def score_patches(self, tokens: torch.Tensor) -> torch.Tensor:
        """The patch head's logits of patch tokens (N, D): the separate patch head, or the DINO head when shared."""
        return getattr(self, "patch_head", self.head)(tokens)
