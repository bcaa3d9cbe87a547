"""``bony attention``: the attention maps of an encoder over images, or heatmaps over one slide.

An **image** (JPEG, PNG, a plain TIFF tile: what :func:`~bonylib.data.slides.open_slide` reads as a plain
image) is one tile, resized to the encoder's input as its eval transform does; a **folder** maps each of its
images so, with the encoder loaded once. Written to OUT for each image::

    <name>.cls.npy / .png        CLS attention over the patches, (blocks, heads, gh, gw); the PNG shows the
                                 chosen block's heads and their mean over the tile (ViT: its blocks;
                                 XCiT: its class-attention blocks)
    <name>.token_norms.npy / .png        XCiT: per XCA block and head, each token's output norm (the seed's map)
    <name>.channel_attention.npy / .png  XCiT: per XCA block and head, the d x d cross-covariance attention
    <name>.json                  what was computed: encoder, architecture, grid, block, threshold, files

(``figures=false`` writes the arrays and the JSON only: for maps of many images, drawn elsewhere.)

A **slide** (anything else, or any file with ``--manifest``) is tiled with the tiling engine into OUT/tiles
(or read at the tiles of ``--manifest`` whose ``path`` is this file) and streamed tile by tile::

    <id>.attention.npy / .png    each tile's mean-over-heads CLS map (x patches: 1 = uniform attention) over the
                                 thumbnail, NaN off the tiles; with --threshold only the top attention mass
    <id>.pca.npy / .png          the first 3 PCA components of the tile embeddings as RGB over the thumbnail
    <id>.tiles.cls.npy           every tile's per-head CLS maps of the chosen block (tiles, heads, gh, gw)
    <id>.tiles.embeddings.npy    every tile's pooled embedding (tiles, D)
    <id>.tiles.parquet           the tiles those rows belong to (slide_id, x, y, level, size)
    <id>.json

File names come only from checked names (the image's file name, the manifest's slide id; see
:func:`bonylib.data.sources.id_problem`), never from arbitrary input text.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
from PIL import Image
from torch.utils.data import DataLoader
from tqdm import tqdm

from bonylib.attention.maps import (
    BLOCK_NAMES,
    TileMaps,
    check_threshold,
    cls_attention_modules,
    encode,
    select_block,
    top_mass_mask,
)
from bonylib.config import option, section
from bonylib.data.datasets import TileDataset
from bonylib.data.heatmaps import Heatmap, pca_colours, read_thumbnail, thumbnail_size
from bonylib.data.manifest import row_ids
from bonylib.data.slides import ImageSlide, open_slide, tile_images
from bonylib.data.sources import id_problem
from bonylib.data.tiling import TileConfig, tile
from bonylib.errors import BonyError, ConfigError
from bonylib.files import atomic_path, ensure_writable_dir, read_json, write_text_atomic
from bonylib.models.encoders import Encoder
from bonylib.models.registry import load_encoder
from bonylib.runtime import resolve_device

TILE_COLUMNS = ("slide_id", "x", "y", "level", "size", "path")
log = logging.getLogger(__name__)


@dataclass
class AttentionConfig:
    """How ``bony attention`` runs (what it maps is set by EXPORT, IMAGE_OR_SLIDE, --block, --threshold, --manifest)."""

    batch_size: int = option(32, "tiles per forward pass over a slide")
    device: str = option("auto", "auto (the first GPU if there is one, else the CPU), cpu, cuda or cuda:N")
    input_size: int = option(0, "side (px) each tile is resized to for the encoder; 0: the encoder's own input (the "
                             "demo's: its 96-px training crops); a larger side gives finer maps (patch 16: 224 px, "
                             "14 x 14 patches), as DINO draws its maps on images larger than its crops")
    figures: bool = option(True, "write the PNGs beside the arrays (false: arrays and JSON only, for many images)")
    thumbnail_px: int = option(2048, "longest side of the slide thumbnail the heatmaps are drawn on; memory is "
                               "bounded by it, whatever the slide's size")
    tile: TileConfig = section(TileConfig, "how a slide is tiled when no --manifest is given (into OUT/tiles)")

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.thumbnail_px < 16:
            raise ConfigError("batch_size must be at least 1 and thumbnail_px at least 16")
        if self.input_size and self.input_size < 16:
            raise ConfigError("input_size must be 0 (the encoder's own) or at least 16")


def attention(reference: str, source: Path, out: Path, cfg: AttentionConfig, block: int = -1,
              threshold: float | None = None, manifest: Path | None = None) -> list[Path]:
    """Write the maps of ``source`` (an image, a folder of images, or a slide) under ``out``; return the files
    written.

    ``block`` picks the blocks whose CLS maps are drawn (negative from the end); ``threshold`` keeps each map's
    top attention mass as DINO's visualisation does (0.6: the fewest patches holding 60 % of it).
    """
    if threshold is not None:
        check_threshold(threshold)
    out, source, device = ensure_writable_dir(Path(out)), Path(source), resolve_device(cfg.device)
    if source.is_dir():
        if manifest is not None:
            raise ConfigError(f"{source}: --manifest maps the tiles of one slide; give that slide, not a folder")
        return _folder(reference, source, out, cfg, block, threshold, device)
    with open_slide(source) as slide:  # an unreadable input fails before the encoder is loaded
        encoder, block = _prepared(reference, cfg, block, device)
        if isinstance(slide, ImageSlide) and manifest is None:
            return _image(encoder, source, slide, out, block, threshold, device, cfg.figures)
    slide_id, rows = _slide_tiles(source, out, cfg, manifest)
    return _slide(encoder, source, slide_id, rows, out, cfg, block, threshold, device)


def _prepared(reference: str, cfg: AttentionConfig, block: int, device: torch.device) -> tuple[Encoder, int]:
    """The encoder on ``device`` at the configured input size, and ``block`` as an index into its CLS blocks."""
    encoder = load_encoder(reference).to(device)
    if cfg.input_size:
        encoder = dataclasses.replace(encoder, input_size=cfg.input_size)
    architecture, modules = cls_attention_modules(encoder.module)
    return encoder, select_block(len(modules), block, BLOCK_NAMES[architecture])


def _folder(reference: str, folder: Path, out: Path, cfg: AttentionConfig, block: int, threshold: float | None,
            device: torch.device) -> list[Path]:
    """Every tile image in ``folder`` (not its subfolders), as one image each, with the encoder loaded once. A
    file that cannot be mapped (unreadable, a whole slide, an unsafe name) is logged and the others go on; the
    call then fails naming how many did not, so a script sees it."""
    if out.resolve() == folder.resolve():
        raise ConfigError(f"{folder}: --out is the folder of images: its PNGs would be mapped as tiles next time; "
                          f"write the maps elsewhere")
    images = tile_images(folder)
    stems: dict[str, list[Path]] = {}
    for path in images:
        stems.setdefault(path.stem, []).append(path)
    clash = next((paths for paths in stems.values() if len(paths) > 1), None)
    if clash:
        raise BonyError(f"{folder}: {clash[0].name} and {clash[1].name} would write the same maps "
                        f"({clash[0].stem}.*); rename one")
    encoder, block = _prepared(reference, cfg, block, device)
    written: list[Path] = []
    failed: list[str] = []
    for path in tqdm(images, desc=f"attention {folder.name}", unit="tile"):
        try:
            with open_slide(path) as slide:
                if not isinstance(slide, ImageSlide):
                    raise BonyError(f"{path}: a whole slide, not a tile image (give it on its own for its heatmaps)")
                written += _image(encoder, path, slide, out, block, threshold, device, cfg.figures)
        except BonyError as exc:
            log.error("%s", exc)
            failed.append(str(exc))
    if failed:
        raise BonyError(f"{folder}: {len(failed)} of {len(images)} images not mapped (the others are in {out}); "
                        f"first: {failed[0]}")
    return written


def tile_maps(reference: str, folder: Path, out: Path, cfg: AttentionConfig, block: int = -1) -> TileMaps:
    """Map every image of ``folder`` into ``out`` (arrays only, as :func:`attention` writes them) and read back
    each image's mean-over-heads CLS map of ``block``, for figures that set many tiles side by side."""
    written = attention(reference, folder, out, dataclasses.replace(cfg, figures=False), block=block)
    names, tiles, maps = [], [], []
    for meta_path in (p for p in written if p.suffix == ".json"):
        meta = read_json(meta_path)
        source, size = Path(meta["source"]), int(meta["input_size"])
        with open_slide(source) as slide:
            tiles.append(np.asarray(_view(slide, size)))
        names.append(source.stem)
        maps.append(np.load(meta_path.with_name(f"{source.stem}.cls.npy"))[meta["block"]].mean(axis=0))
    return TileMaps(names, tiles, maps)


def _checked_name(name: str, where: Path) -> str:
    """``name`` when it can name output files, else a :class:`BonyError` naming ``where``."""
    problem = id_problem(name)
    if problem:
        raise BonyError(f"{where}: {problem}; rename the file or give a manifest with a safe slide_id")
    return name


def _save_array(dest: Path, array: np.ndarray) -> Path:
    with atomic_path(dest) as tmp:
        np.save(tmp, array)
    return dest


def _view(slide: ImageSlide, size: int) -> Image.Image:
    """An image tile as the encoder sees it: resized to its input side (its eval transform would do the same)."""
    return Image.fromarray(slide.read_level(0)).resize((size, size), Image.Resampling.BILINEAR)


def _image(encoder: Encoder, source: Path, slide: ImageSlide, out: Path, block: int, threshold: float | None,
           device: torch.device, figures: bool) -> list[Path]:
    """One tile: the maps of every block and head as arrays, and (``figures``) figures over the tile as the
    encoder saw it."""
    name = _checked_name(source.stem, source)
    size = encoder.input_size
    view = _view(slide, size)
    _, maps = encode(encoder, encoder.transform(view)[None].to(device))
    heads, mass = maps.cls[0, block], maps.cls_patch_mass[0, block]
    arrays = {"cls": maps.cls[0]}
    if maps.token_norms is not None and maps.channel_attention is not None:  # XCiT
        arrays.update(token_norms=maps.token_norms[0], channel_attention=maps.channel_attention[0])
    written = [_save_array(out / f"{name}.{view_name}.npy", array) for view_name, array in arrays.items()]
    if figures:
        from bonylib.attention.figures import image_figures  # matplotlib: only when figures are drawn

        written += image_figures(np.asarray(view), arrays, block, BLOCK_NAMES[maps.architecture][:-1], mass,
                                  threshold, out / name)
    meta = {"source": str(source), "kind": "image", "encoder": encoder.name, "architecture": maps.architecture,
            "input_size": size, "grid": list(heads.shape[-2:]), "block": block, "threshold": threshold,
            "cls_patch_mass": [float(m) for m in mass], "files": [p.name for p in written]}
    write_text_atomic(out / f"{name}.json", json.dumps(meta, indent=1) + "\n")
    return [*written, out / f"{name}.json"]


def _slide_tiles(source: Path, out: Path, cfg: AttentionConfig, manifest: Path | None) -> tuple[str, pd.DataFrame]:
    """The slide id and tiles of ``source``: from ``manifest`` (its rows whose ``path`` is this file, checked as
    ``bony embed`` checks manifests), or from tiling it into ``out/tiles`` (resumable like ``bony tile``)."""
    if manifest is None:
        result = tile("slides", [source], out / "tiles", cfg.tile)
        if len(result.failures):
            raise BonyError(str(result.failures["error"].iloc[0]))
        assert result.manifest is not None
        manifest = result.manifest
    try:
        frame = pd.read_parquet(manifest, columns=list(TILE_COLUMNS))
    except (OSError, ValueError, KeyError, pa.ArrowException) as exc:
        raise BonyError(f"{manifest}: not a readable tile manifest with columns {', '.join(TILE_COLUMNS)} "
                        f"({' '.join(str(exc).split())[:200]})") from None
    target = source.resolve()
    same = {p: Path(str(p)).resolve() == target for p in frame["path"].unique()}
    rows = frame[frame["path"].map(same)].reset_index(drop=True)
    if rows.empty:
        raise BonyError(f"{manifest}: no tiles of {source} (no row's path is this file)")
    row_ids(rows, manifest)
    slide_ids = rows["slide_id"].unique()
    if len(slide_ids) != 1:
        raise BonyError(f"{manifest}: the tiles of {source} carry {len(slide_ids)} slide ids; expected one")
    return _checked_name(str(slide_ids[0]), manifest), rows


def _slide(encoder: Encoder, source: Path, name: str, rows: pd.DataFrame, out: Path, cfg: AttentionConfig, block: int,
           threshold: float | None, device: torch.device) -> list[Path]:
    """Stream the tiles through the encoder once: per-tile maps and embeddings to memory-mapped ``.npy`` files,
    each tile's mean map onto the attention heatmap; then the PCA colours onto theirs."""
    with open_slide(source) as slide:
        thumbnail = read_thumbnail(slide, cfg.thumbnail_px)
        slide_size, downsamples = slide.level_dimensions[0], np.asarray(slide.level_downsamples)
    levels = rows["level"].to_numpy()
    if levels.min() < 0 or levels.max() >= len(downsamples) or rows["size"].min() < 1:
        raise BonyError(f"{source}: its manifest rows name levels {levels.min()}..{levels.max()} and sizes from "
                        f"{rows['size'].min()}; the slide has levels 0..{len(downsamples) - 1} and a tile is >= 1 px")
    canvas = thumbnail_size(slide_size, cfg.thumbnail_px)
    xs, ys = rows["x"].to_numpy(np.float64), rows["y"].to_numpy(np.float64)
    sides = rows["size"].to_numpy(np.float64) * downsamples[levels]
    heat, colours_map = Heatmap(slide_size, canvas, 1), Heatmap(slide_size, canvas, 3)
    dataset = TileDataset(rows.assign(label_name=""), source="slides", tile_px=encoder.input_size,
                          transform=encoder.transform)
    stores: dict[str, np.ndarray] = {}
    start = 0
    cls_path, embeddings_path = out / f"{name}.tiles.cls.npy", out / f"{name}.tiles.embeddings.npy"
    with atomic_path(cls_path) as cls_tmp, atomic_path(embeddings_path) as embeddings_tmp:
        for batch, _ in tqdm(DataLoader(dataset, batch_size=cfg.batch_size), desc=f"attention {name}", unit="batch"):
            features, maps = encode(encoder, batch.to(device))
            if not stores:
                stores["cls"] = np.lib.format.open_memmap(cls_tmp, "w+", np.float32, (len(rows), *maps.cls.shape[2:]))
                stores["embeddings"] = np.lib.format.open_memmap(embeddings_tmp, "w+", np.float32,
                                                                 (len(rows), features.shape[1]))
            stop = start + len(batch)
            stores["cls"][start:stop] = maps.cls[:, block]
            stores["embeddings"][start:stop] = features.cpu().numpy()
            mean = maps.cls[:, block].mean(axis=1)
            mean = mean * mean[0].size  # relative to uniform attention: comparable across grids
            if threshold is not None:
                mean = np.where(top_mass_mask(mean, threshold), mean, 0.0)
            for i in range(start, stop):
                heat.add(xs[i], ys[i], sides[i], mean[i - start])
            start = stop
        for store in stores.values():
            store.flush()
        stores.clear()
        colours = pca_colours(np.load(embeddings_tmp, mmap_mode="r"))
    for i, colour in enumerate(colours):
        colours_map.add(xs[i], ys[i], sides[i], colour)
    tiles_path = out / f"{name}.tiles.parquet"
    with atomic_path(tiles_path) as tmp:
        rows[["slide_id", "x", "y", "level", "size"]].to_parquet(tmp, index=False)
    written = [_save_array(out / f"{name}.attention.npy", heat.image()[..., 0]),
               _save_array(out / f"{name}.pca.npy", colours_map.image()), cls_path, embeddings_path, tiles_path]
    if cfg.figures:
        from bonylib.attention.figures import slide_figures  # matplotlib: only when figures are drawn

        written += slide_figures(thumbnail, heat.image(), colours_map.image(), name, threshold, out)
    meta: dict[str, Any] = {"source": str(source), "kind": "slide", "slide_id": name, "encoder": encoder.name,
                            "input_size": encoder.input_size, "tiles": len(rows), "block": block,
                            "threshold": threshold, "thumbnail": list(canvas), "files": [p.name for p in written]}
    write_text_atomic(out / f"{name}.json", json.dumps(meta, indent=1) + "\n")
    return [*written, out / f"{name}.json"]
