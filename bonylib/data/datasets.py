"""Torch datasets over a tile manifest: tiles from tar shards, or straight from the slides.

Shards (``bony tile ... shards=true``) hold each kept tile as a JPEG at a byte range recorded in
the manifest: one seek and one small decode per tile, the fast path for training. Without
shards the same manifest is read from the slides by coordinates, which needs no extra disk and
works on any manifest. Either way a tile comes out at ``tile_px`` pixels (tiles read at a finer
level than the target resolution are resized).
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image

from bonylib.data.labels import LABEL_NAMES
from bonylib.data.slides import Slide, open_slide
from bonylib.errors import BonyError, one_line
from bonylib.files import path_inside


def _check_shards_inside(shards: pd.Series, root: Path) -> None:
    """Refuse a manifest whose shard paths leave the tiling folder (``../``, absolute): a manifest is input we did
    not write ourselves until it is checked, and reading it must not open arbitrary files."""
    for shard in shards.unique():
        if path_inside(root, shard) is None:
            raise BonyError(f"{root}: manifest shard path {shard!r} is outside the tiling folder; refusing to read it")


class TileDataset(torch.utils.data.Dataset):
    """Tiles of a manifest as ``(image, target)``.

    ``open_slides`` bounds the slides kept open when reading from slides.

    ``image`` is a PIL RGB image of ``tile_px`` pixels passed through ``transform``; ``target`` is
    the index of ``label_name`` in ``classes``, or -1 for tiles without a label (or a label not in
    ``classes``). ``root`` is the tiling output folder that shard paths are relative to.
    """

    def __init__(
        self,
        manifest: pd.DataFrame | Path,
        root: Path | None = None,
        source: str = "auto",
        tile_px: int = 224,
        transform: Callable[[Image.Image], Any] | None = None,
        classes: Sequence[str] = LABEL_NAMES,
        slide_mpp: float | None = None,
        open_slides: int = 16,
    ) -> None:
        if not isinstance(manifest, pd.DataFrame):
            path = Path(manifest)
            root = root if root is not None else path.parent
            manifest = pd.read_parquet(path)
        self.frame = manifest.reset_index(drop=True)
        has_shards = "shard" in self.frame and bool((self.frame["shard"] != "").all())
        if source == "auto":
            source = "shards" if has_shards else "slides"
        if source not in ("shards", "slides"):
            raise BonyError(f"source must be auto, shards or slides, got '{source}'")
        if source == "shards" and (not has_shards or root is None):
            raise BonyError("this manifest has no shards for every tile (tile with shards=true), or root is not given")
        if source == "shards":
            _check_shards_inside(self.frame["shard"], Path(root))
        self.source, self.root, self.tile_px = source, root, tile_px
        self.transform, self.classes, self.slide_mpp, self.open_slides = transform, list(classes), slide_mpp, open_slides
        lookup = {name: i for i, name in enumerate(self.classes)}
        self.targets = np.array([lookup.get(name, -1) for name in self.frame["label_name"]], np.int64)
        self._slides: dict[str, Slide] = {}

    def __len__(self) -> int:
        return len(self.frame)

    def read(self, index: int) -> Image.Image:
        """Tile ``index`` as an RGB image of ``tile_px`` pixels, before the transform. A tile that cannot be read (a
        missing or damaged shard, a slide region the reader refuses) raises :class:`BonyError` naming the file and row."""
        row = self.frame.iloc[index]
        if self.source == "shards":
            assert self.root is not None
            shard = self.root / row["shard"]
            try:
                with open(shard, "rb") as handle:
                    handle.seek(int(row["shard_offset"]))
                    image = Image.open(io.BytesIO(handle.read(int(row["shard_length"])))).convert("RGB")
            except (OSError, ValueError, Image.DecompressionBombError) as exc:
                raise BonyError(f"{shard}: tile of manifest row {index} unreadable ({one_line(exc, 200)})") from None
        else:
            slide = self._slide(row["path"])
            size = int(row["size"])
            try:
                pixels = slide.read_region((int(row["x"]), int(row["y"])), int(row["level"]), (size, size))
            except (OSError, ValueError, RuntimeError, IndexError) as exc:  # a decoder's error on a damaged slide
                raise BonyError(f"{row['path']}: tile of manifest row {index} unreadable ({one_line(exc, 200)})") \
                    from None
            image = Image.fromarray(pixels)
        if image.size != (self.tile_px, self.tile_px):
            image = image.resize((self.tile_px, self.tile_px), Image.Resampling.BILINEAR)
        return image

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = self.read(index)
        return (self.transform(image) if self.transform else image), int(self.targets[index])

    def _slide(self, path: str) -> Slide:
        """An open slide from a small per-process cache (DataLoader workers each keep their own).

        Only ``open_slides`` stay open, least recently used closed first, so an epoch over ten
        thousand slides does not run out of file handles or memory.
        """
        slide = self._slides.pop(path, None)
        if slide is None:
            slide = open_slide(Path(path), self.slide_mpp)
            while len(self._slides) >= self.open_slides:
                self._slides.pop(next(iter(self._slides))).close()
        self._slides[path] = slide  # (re)inserted last: most recently used
        return slide

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_slides"] = {}  # open file handles do not cross into worker processes
        return state


def _raised_message(exc: BaseException) -> str:
    """The message a DataLoader worker's exception was raised with: torch re-raises it in the main process with the
    worker's whole traceback as its message ("Caught BonyError in DataLoader worker process 0. Original Traceback
    ..."), whose last line is ``<module>.<class>: <message>``."""
    text = str(exc)
    if "Original Traceback" not in text:
        return text
    kind = type(exc)
    for line in reversed(text.splitlines()):
        for prefix in (f"{kind.__module__}.{kind.__qualname__}: ", f"{kind.__qualname__}: "):
            if line.startswith(prefix):
                return line[len(prefix):]
    return one_line(text)


def read_batches(loader: Iterable[Any]) -> Iterator[Any]:
    """The batches of a DataLoader over tiles, a tile that cannot be read failing in the one line its reader gave
    (:class:`BonyError`), whether it was read in a worker process or in this one."""
    try:
        yield from loader
    except BonyError as exc:
        raise type(exc)(_raised_message(exc)) from None
