"""Input stems that run before a backbone: the one-level 2-D Haar wavelet transform (the seed's §9.2 idea).

The transform is the orthonormal Haar DWT exactly as ``pywt.dwt2(x, "haar")`` computes it, in torch so it
runs on the batch's device inside the model (PyWavelets works on NumPy arrays only, one image at a time,
and would take the transform out of autocast and the GPU). On each 2x2 block ``[[a, b], [c, d]]``::

    cA = (a + b + c + d) / 2    approximation (the block's mean, times 2)
    cH = (a + b - c - d) / 2    horizontal detail (top row minus bottom row)
    cV = (a - b + c - d) / 2    vertical detail (left column minus right column)
    cD = (a - b - c + d) / 2    diagonal detail

The four rows are an orthonormal basis of the block, so the inverse is the transpose, and for images
of integers (uint8 pixels) both directions are exact in float32 (only sums and halvings).

A stem halves the resolution; the backbone's patch size is halved with it (see
:func:`bonylib.models.backbones.create_backbone`), so a tile gives the same patch grid, the same number
of tokens and so about the same attention cost as without the stem.
"""

from __future__ import annotations

import torch
from torch import nn

from bonylib.errors import ConfigError

STEMS: tuple[str, ...] = ("none", "haar_approx", "haar_bands")
"""``model.stem`` choices: no stem; the Haar approximation band (3 channels at half resolution: twice the
2x2 mean-pooled image, the high frequencies dropped); all four Haar bands as 12 channels (nothing dropped:
the detail bands keep the edges and texture that the approximation loses)."""

HaarBands = tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
"""``(cA, (cH, cV, cD))``: the layout ``pywt.dwt2`` returns and ``pywt.idwt2`` takes."""


def haar_dwt2(x: torch.Tensor) -> HaarBands:
    """One level of the orthonormal 2-D Haar transform over the last two dimensions of ``x`` (even sizes),
    as ``pywt.dwt2(x, "haar")``: ``(cA, (cH, cV, cD))``, each at half the height and width.

    Odd sizes are refused rather than padded: PyWavelets pads them (mode ``symmetric``), which would put a
    mirrored row into the last band row that no pixel of the tile produced.
    """
    height, width = x.shape[-2:]
    if height % 2 or width % 2:
        raise ValueError(f"the Haar stem needs even image sides, got {height}x{width} (resize or crop to an even size)")
    a, b = x[..., 0::2, 0::2], x[..., 0::2, 1::2]
    c, d = x[..., 1::2, 0::2], x[..., 1::2, 1::2]
    top_sum, bottom_sum, top_diff, bottom_diff = a + b, c + d, a - b, c - d
    return ((top_sum + bottom_sum) / 2,
            ((top_sum - bottom_sum) / 2, (top_diff + bottom_diff) / 2, (top_diff - bottom_diff) / 2))


class HaarStem(nn.Module):
    """The Haar DWT of each input channel, as the backbone's input: ``keep="approx"`` gives the
    approximation band (C channels), ``keep="bands"`` the four bands band-major (cA, cH, cV, cD; 4C channels),
    both at half the height and width. No parameters: the transform is fixed, so a stemmed backbone's
    weights are the plain timm model's."""

    def __init__(self, keep: str) -> None:
        super().__init__()
        if keep not in ("approx", "bands"):
            raise ValueError(f"HaarStem keeps 'approx' or 'bands', not {keep!r}")
        self.keep = keep

    @property
    def channel_factor(self) -> int:
        """Output channels per input channel."""
        return 1 if self.keep == "approx" else 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        approx, details = haar_dwt2(x)
        return approx if self.keep == "approx" else torch.cat([approx, *details], dim=-3)

    def extra_repr(self) -> str:
        return f"keep={self.keep!r}"


def create_stem(name: str) -> HaarStem | None:
    """The stem ``model.stem`` names (one of :data:`STEMS`), or None for ``none``."""
    if name not in STEMS:
        raise ConfigError(f"model.stem '{name}' is not one of {', '.join(STEMS)}")
    return None if name == "none" else HaarStem(name.removeprefix("haar_"))


def stem_name(stem: HaarStem | None) -> str:
    """The :data:`STEMS` name of ``stem`` (inverse of :func:`create_stem`): what an export records."""
    return "none" if stem is None else f"haar_{stem.keep}"
