"""What an encoder's patch tokens separate: the first three principal components of the tokens of a few tiles as
colours, DINOv2's feature visualisation (Oquab et al. 2023, fig. 1).

The PCA is fitted on the tokens of all the tiles together, so a colour means the same direction in feature space
on every tile: a learned encoder gives glands, lumen and stroma their own colours across tiles, an untrained one
mostly follows colour and position.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bonylib.data.heatmaps import pca_colours
from bonylib.data.slides import tile_images
from bonylib.errors import BonyError
from bonylib.models.registry import load_encoder


@dataclass(frozen=True)
class TokenColours:
    """Tiles as the encoder saw them and the PCA colours of their patch tokens."""

    names: list[str]
    tiles: list[np.ndarray]
    """(input_size, input_size, 3) uint8"""
    colours: np.ndarray
    """(tiles, grid, grid, 3) in [0, 1]: each token's first three components, min-max scaled over all the tokens"""


def token_colours(reference: str, folder: Path, input_size: int) -> TokenColours:
    """The PCA colours of the patch tokens of every image in ``folder`` (sorted by name), each resized to
    ``input_size`` as the encoder's eval transform does, for the encoder ``reference`` (a spec or a run folder)."""
    paths = tile_images(Path(folder))
    encoder = dataclasses.replace(load_encoder(reference), input_size=input_size)
    if encoder.patch_size is None:
        raise BonyError(f"{reference}: the encoder has no patch tokens to colour")
    tiles = []
    for path in paths:
        with Image.open(path) as image:
            tiles.append(np.asarray(image.convert("RGB").resize((input_size, input_size), Image.Resampling.BILINEAR)))
    batch = torch.stack([encoder.transform(Image.fromarray(tile)) for tile in tiles])
    tokens = encoder.embed(batch, "patch").numpy()  # (tiles, grid * grid, D)
    grid = input_size // encoder.patch_size
    colours = pca_colours(tokens.reshape(-1, tokens.shape[-1])).reshape(len(tiles), grid, grid, 3)
    return TokenColours([p.stem for p in paths], tiles, colours)
