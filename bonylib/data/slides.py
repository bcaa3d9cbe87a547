"""Slide readers: one interface over OpenSlide, tifffile and plain images.

Tiling, labelling and the training Dataset read regions through :func:`open_slide`, which picks
OpenSlide for every format it knows (SVS, generic/pyramidal TIFF, NDPI, MRXS, ...), falls back
to tifffile for TIFF pyramids OpenSlide refuses (it decodes only the tiles a region touches),
and treats JPEG/PNG/plain TIFF images as single-level slides. Coordinates are always level-0
pixels, as in OpenSlide and the tile manifest.
"""

from __future__ import annotations

import math
import threading
from abc import ABC, abstractmethod
from collections import OrderedDict
from pathlib import Path
from types import TracebackType
from typing import Any

import imagecodecs
import numpy as np
import openslide
import tifffile
from PIL import Image

from bonylib.errors import BonyError, one_line
from bonylib.memory import check_fits

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png"})
TIFF_SUFFIXES = frozenset({".tif", ".tiff", ".svs"})
TILE_IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".tif", ".tiff"})
"""The files a folder of tile images is read for (``bony pretrain data.images=``, ``bony attention`` on a folder)."""


def tile_images(folder: Path) -> list[Path]:
    """The tile images directly in ``folder`` (not its subfolders), sorted by name; none is an error naming the
    folder, since every caller (attention maps, patch-token colours) needs at least one."""
    images = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in TILE_IMAGE_SUFFIXES)
    if not images:
        raise BonyError(f"{folder}: no tile images ({', '.join(sorted(TILE_IMAGE_SUFFIXES))}) in this folder")
    return images


class SlideError(BonyError):
    """A slide (or mask) that cannot be used; the message names the file."""


class Slide(ABC):
    """A multi-resolution image read by regions.

    ``mpp`` is level 0's µm per pixel, from the file's metadata or given by the caller for files
    that have none (plain images, TIFFs without resolution tags); ``None`` when unknown.
    """

    def __init__(self, path: Path, mpp: float | None) -> None:
        self.path = Path(path)
        self.mpp = mpp

    level_dimensions: list[tuple[int, int]]
    """(width, height) of each level, finest first."""

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    @property
    def level_downsamples(self) -> list[float]:
        """Downsample of each level relative to level 0 (mean of the width and height ratios)."""
        w0, h0 = self.level_dimensions[0]
        return [(w0 / w + h0 / h) / 2 for w, h in self.level_dimensions]

    def level_mpp(self, level: int) -> float | None:
        """µm per pixel at ``level``."""
        return None if self.mpp is None else self.mpp * self.level_downsamples[level]

    @abstractmethod
    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int],
                    cells: np.ndarray | None = None) -> np.ndarray:
        """RGB uint8 array (h, w, 3) of ``size`` (w, h) pixels at ``level``, top-left ``location`` in level-0 pixels.

        Parts outside the image, and transparent pixels, read as white (glass). ``cells``, a (rows, cols) bool
        array that divides the region into equal cells, says which cells the caller will look at: only those are
        sure to hold the image, and a reader that decodes the file tile by tile skips the tiles that touch none
        (tiling reads a block of grid tiles at once, and tissue seldom fills a block's bounding box).
        """

    def read_codes(self, location: tuple[int, int], level: int, size: tuple[int, int],
                   cells: np.ndarray | None = None) -> np.ndarray:
        """The red channel of a region as (h, w) uint8: a label mask's codes (PANDA and DeepGleason keep them there).
        Readers that can paste one channel do so, a third of the copying of :meth:`read_region` (tiling reads a
        mask block for every image block). ``cells`` as in :meth:`read_region`."""
        return np.ascontiguousarray(self.read_region(location, level, size, cells)[..., 0])

    def read_level(self, level: int) -> np.ndarray:
        """A whole level as RGB (for low-resolution levels: thumbnails, tissue detection, masks)."""
        return self.read_region((0, 0), level, self.level_dimensions[level])

    def close(self) -> None:
        """Release the file (readers that hold no open handle have nothing to do)."""

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: tuple[type[BaseException] | None, BaseException | None, TracebackType | None]) -> None:
        self.close()


def _over_white(rgba: np.ndarray, premultiplied: bool = True) -> np.ndarray:
    """RGB of an RGBA array composited over white (glass).

    OpenSlide returns premultiplied alpha; a TIFF says which it holds in ExtraSamples (1: associated,
    that is premultiplied; 2: unassociated). Inside a scanned area every pixel is opaque: then the
    RGB channels are returned as they are.
    """
    alpha = rgba[..., 3]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgba[..., :3])
    rgb = rgba[..., :3].astype(np.uint16)
    if not premultiplied:
        rgb = (rgb * alpha[..., None] + 127) // 255
    out = rgb + (255 - alpha)[..., None]
    return np.minimum(out, 255).astype(np.uint8)


def _tiff_rgb(pixels: np.ndarray, page: Any) -> np.ndarray:
    """The RGB of decoded TIFF pixels: alpha composited over white (transparent is glass, not black)."""
    if pixels.ndim == 3 and pixels.shape[-1] == 4:
        return _over_white(pixels, premultiplied=tuple(page.extrasamples or (2,))[0] == 1)
    return pixels[..., :3] if pixels.ndim == 3 else pixels[..., None]


class OpenSlideSlide(Slide):
    """Any format OpenSlide reads; level-0 mpp from ``openslide.mpp-x`` when the file has it."""

    def __init__(self, path: Path, mpp: float | None = None) -> None:
        self._slide = openslide.OpenSlide(str(path))
        prop = self._slide.properties.get(openslide.PROPERTY_NAME_MPP_X)
        super().__init__(path, mpp if mpp is not None else (float(prop) if prop else None))
        self.level_dimensions = list(self._slide.level_dimensions)
        self.vendor = self._slide.properties.get(openslide.PROPERTY_NAME_VENDOR, "")

    @property
    def level_downsamples(self) -> list[float]:
        return list(self._slide.level_downsamples)

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int],
                    cells: np.ndarray | None = None) -> np.ndarray:
        try:
            region = self._slide.read_region(location, level, size)
        except openslide.OpenSlideError as exc:
            raise SlideError(f"{self.path}: unreadable region at {location}, level {level} ({one_line(exc, 200)})") \
                from None
        return _over_white(np.asarray(region))

    def close(self) -> None:
        self._slide.close()


_DEFLATE = frozenset({tifffile.COMPRESSION.ADOBE_DEFLATE, tifffile.COMPRESSION.DEFLATE})
"""The compressions of PANDA's and DeepGleason's label masks, which :class:`TiffSlide` inflates itself."""


class TiffSlide(Slide):
    """A TIFF pyramid read with tifffile, decoding only the tiles that a region touches.

    Used for generic tiled TIFF pyramids (PANDA's format), where it is several times faster than
    OpenSlide: tiles go straight from libjpeg-turbo (imagecodecs) into the region, without
    OpenSlide's ARGB conversion, and recently decoded tiles are kept for the next region
    (``benchmarks/bench_tiling.py``). Also for TIFFs OpenSlide does not accept. Levels are the
    first series' pyramid levels; resolution from the TIFF resolution tags (centimetre or inch).
    """

    cache_bytes = 64 * 2**20

    def __init__(self, path: Path, mpp: float | None = None, require_rgb: bool = True) -> None:
        self._tif = tifffile.TiffFile(path)
        self._lock = threading.Lock()
        # each entry: the tile and the bytes it keeps alive (a channel view holds its whole decoded tile)
        self._cache: OrderedDict[tuple[int, int, int | None], tuple[np.ndarray | None, int]] = OrderedDict()
        self._cached_bytes = 0
        self._scratch = threading.local()  # a thread's buffer a mask tile is inflated in before its codes are copied out
        series = self._tif.series[0]
        self._pages = [level.keyframe for level in series.levels]
        for page in self._pages:
            allowed = (3, 4) if require_rgb else (1, 3, 4)
            if page.samplesperpixel not in allowed or page.dtype != np.uint8:
                raise SlideError(f"{path}: not an 8-bit RGB image (samples per pixel {page.samplesperpixel}, {page.dtype})")
        super().__init__(path, mpp if mpp is not None else _tiff_mpp(self._pages[0]))
        self.level_dimensions = [(p.imagewidth, p.imagelength) for p in self._pages]

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int],
                    cells: np.ndarray | None = None) -> np.ndarray:
        return self._read(location, level, size, None, cells)

    def read_codes(self, location: tuple[int, int], level: int, size: tuple[int, int],
                   cells: np.ndarray | None = None) -> np.ndarray:
        return self._read(location, level, size, 0, cells)

    def _read(self, location: tuple[int, int], level: int, size: tuple[int, int], channel: int | None,
              cells: np.ndarray | None) -> np.ndarray:
        """A region as RGB (``channel`` None) or as one channel, pasted from the file tiles that touch its wanted
        ``cells`` (all of it when None)."""
        page = self._pages[level]
        ds = self.level_downsamples[level]
        x, y = int(round(location[0] / ds)), int(round(location[1] / ds))
        w, h = size
        shape = (h, w, 3) if channel is None else (h, w)
        covered = x >= 0 and y >= 0 and x + w <= page.imagewidth and y + h <= page.imagelength
        # a region inside the image is covered by its tiles: filling it with glass first would be
        # one more write of every pixel
        out = np.empty(shape, np.uint8) if covered and page.is_tiled else np.full(shape, 255, np.uint8)

        if not page.is_tiled:
            with self._lock:
                full = _tiff_rgb(page.asarray(), page)
            _paste(out, full if channel is None else full[..., channel], 0, 0, x, y)
            return out
        tw, th = page.tilewidth, page.tilelength
        across = -(-page.imagewidth // tw)
        rows = range(max(0, y // th), min(-(-page.imagelength // th), -(-(y + h) // th)))
        cols = range(max(0, x // tw), min(across, -(-(x + w) // tw)))
        wanted = _touched(cells, (h, w), (th, tw), (x, y))
        for ty in rows:
            for tx in cols:
                if wanted is not None and (ty, tx) not in wanted:
                    continue
                tile = self._tile(level, ty * across + tx, channel)
                if tile is None:  # a tile that was never written reads as glass
                    _paste(out, np.broadcast_to(np.uint8(255), (th, tw, *shape[2:])), tx * tw, ty * th, x, y)
                    continue
                # edge tiles are padded past the image: only the image part is pasted
                inside = tile[: page.imagelength - ty * th, : page.imagewidth - tx * tw]
                _paste(out, inside, tx * tw, ty * th, x, y)
        return out

    def _tile(self, level: int, index: int, channel: int | None = None) -> np.ndarray | None:
        """Decoded tile ``index`` of ``level`` as RGB, or a view of only its ``channel``, from a small cache:
        neighbouring regions share edge tiles."""
        key = (level, index, channel)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key][0]
            page = self._pages[level]
            fh = self._tif.filehandle
            fh.seek(page.dataoffsets[index])
            count = page.databytecounts[index]
            # a tile never written (byte count 0) is decoded from None, as tifffile's own reader does
            data = fh.read(count) if count else None
        decoded = self._decode(page, level, index, data, scratch=channel is not None)
        tile = None
        if decoded is not None:
            tile = _tiff_rgb(decoded, page)
            if channel is not None:  # copied out: the decoded tile may be the scratch buffer, and a third of it is cached
                tile = decoded = np.ascontiguousarray(tile[..., min(channel, tile.shape[-1] - 1)])
            elif tile.shape[-1] == 1:  # grey pages (label masks) are seen as three equal channels, without a copy
                tile = np.broadcast_to(tile, (*tile.shape[:2], 3))
        held = 0 if decoded is None else decoded.nbytes
        with self._lock:
            self._cache[key] = (tile, held)
            self._cached_bytes += held
            while self._cached_bytes > self.cache_bytes and len(self._cache) > 1:
                self._cached_bytes -= self._cache.popitem(last=False)[1][1]
        return tile

    def _decode(self, page: Any, level: int, index: int, data: bytes | None, scratch: bool = False) -> np.ndarray | None:
        """Decoded tile ``index`` of ``page`` (level ``level``) as (h, w, samples), or None for a tile never written.

        Deflate tiles without a predictor (PANDA's and DeepGleason's label masks) are inflated by zlib-ng: 21 µs
        for a 256-px RGB mask tile where tifffile's path took 67 (Xeon, AVX-512), and tiling inflates a mask tile
        for every image tile it decodes. With ``scratch``, for a caller that copies out what it keeps, they are
        inflated into one buffer per thread that the next call overwrites: a fresh 196 kB buffer per tile is
        mapped anew and faulted in page by page, which with the copy took 107 µs a tile against 69
        (``read_codes``). Everything else, JPEG included, goes through tifffile."""
        if data and page.compression in _DEFLATE and page.predictor == 1 and page.planarconfig == 1 \
                and page.bitspersample == 8 and page.fillorder == 1:
            shape = (page.tilelength, page.tilewidth, page.samplesperpixel)
            size = math.prod(shape)
            where = f"{self.path}: tile {index} of level {level}"
            if scratch and len(getattr(self._scratch, "buffer", b"")) != size:
                self._scratch.buffer = bytearray(size)
            try:
                raw = imagecodecs.zlibng_decode(data, out=self._scratch.buffer if scratch else size)
            except imagecodecs.ZlibngError as exc:
                raise SlideError(f"{where} does not inflate ({one_line(exc, 200)})") from None
            if len(raw) != size:
                raise SlideError(f"{where} inflates to {len(raw)} bytes, not the {size} of a {shape} tile")
            return np.frombuffer(raw, np.uint8).reshape(shape)
        decoded = page.decode(data, index, jpegtables=page.jpegtables)[0]
        return None if decoded is None else decoded[0]

    def close(self) -> None:
        self._tif.close()


def _touched(cells: np.ndarray | None, size: tuple[int, int], tile: tuple[int, int],
             origin: tuple[int, int]) -> set[tuple[int, int]] | None:
    """The file tiles (row, column in the level) that touch a wanted cell of a region of ``size`` (h, w) at
    ``origin`` (x, y) divided into ``cells``; None (all of them) without ``cells``."""
    if cells is None:
        return None
    (h, w), (th, tw), (x, y) = size, tile, origin
    ch, cw = h // cells.shape[0], w // cells.shape[1]
    wanted: set[tuple[int, int]] = set()
    for row, col in zip(*np.nonzero(cells)):
        # a cell may span several file tiles: every one from its first pixel's to its last pixel's
        for ty in range((y + row * ch) // th, (y + (row + 1) * ch - 1) // th + 1):
            for tx in range((x + col * cw) // tw, (x + (col + 1) * cw - 1) // tw + 1):
                wanted.add((int(ty), int(tx)))
    return wanted


def _paste(out: np.ndarray, tile: np.ndarray, tile_x: int, tile_y: int, x: int, y: int) -> None:
    """Copy the part of ``tile`` (at level pixel ``tile_x, tile_y``) that falls in ``out`` (at ``x, y``)."""
    h, w = out.shape[:2]
    x0, y0 = max(tile_x, x), max(tile_y, y)
    x1, y1 = min(tile_x + tile.shape[1], x + w), min(tile_y + tile.shape[0], y + h)
    if x1 > x0 and y1 > y0:
        out[y0 - y : y1 - y, x0 - x : x1 - x] = tile[y0 - tile_y : y1 - tile_y, x0 - tile_x : x1 - tile_x]


def _tiff_mpp(page: tifffile.TiffPage) -> float | None:
    """µm per pixel from XResolution/ResolutionUnit (PANDA: 10000 / XResolution, unit centimetre)."""
    tags = page.tags
    if "XResolution" not in tags or "ResolutionUnit" not in tags:
        return None
    num, den = tags["XResolution"].value
    unit = tags["ResolutionUnit"].value
    if not num or not den:
        return None
    per_unit = {tifffile.RESUNIT.CENTIMETER: 10000.0, tifffile.RESUNIT.INCH: 25400.0}.get(unit)
    return per_unit * den / num if per_unit else None


IMAGE_MODES = frozenset({"RGB", "L", "RGBA", "LA", "P"})
"""PIL modes read as RGB (transparent pixels over white)."""


class ImageSlide(Slide):
    """A plain image (JPEG, PNG, single-page TIFF) as a one-level slide; no resolution unless given.

    Opening reads the header only, and refuses an image whose pixels this machine could not hold; the pixels are
    decoded on the first read. :meth:`view` gives the image at a small side without decoding all of it where the
    format allows (JPEG decodes at 1/2, 1/4 or 1/8 of its size).
    """

    def __init__(self, path: Path, mpp: float | None = None) -> None:
        try:
            with Image.open(path) as image:
                size, mode = image.size, image.mode
        except (OSError, Image.DecompressionBombError) as exc:
            raise SlideError(f"{path}: cannot read image ({exc})") from None
        if mode not in IMAGE_MODES:
            raise SlideError(f"{path}: unsupported image mode {mode} (need RGB)")
        try:
            check_fits(2 * 4 * size[0] * size[1], f"an image of {size[0]} x {size[1]} px")  # decoded, then as RGB
        except BonyError as exc:
            raise SlideError(f"{path}: {exc}") from None
        super().__init__(path, mpp)
        self.level_dimensions = [size]
        self._rgb: np.ndarray | None = None

    def _pixels(self) -> np.ndarray:
        if self._rgb is None:
            try:
                with Image.open(self.path) as image:
                    image.load()
                    self._rgb = np.asarray(_image_rgb(image))
            except (OSError, Image.DecompressionBombError) as exc:
                raise SlideError(f"{self.path}: cannot read image ({exc})") from None
        return self._rgb

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int],
                    cells: np.ndarray | None = None) -> np.ndarray:
        if level != 0:
            raise SlideError(f"{self.path}: a plain image has only level 0")
        out = np.full((size[1], size[0], 3), 255, np.uint8)
        _paste(out, self._pixels(), 0, 0, *location)
        return out

    def view(self, side: int) -> Image.Image:
        """The whole image resized to ``side`` x ``side`` (bilinear), as an encoder's eval transform sees a tile: a JPEG
        is decoded at the smallest scale that still has ``side`` pixels (a 12,000-px JPEG mapped at 96 px decodes
        1,500 px), other formats whole."""
        if self._rgb is not None:
            image = Image.fromarray(self._rgb)
        else:
            try:
                with Image.open(self.path) as source:
                    source.draft(None, (side, side))
                    image = _image_rgb(source)
            except (OSError, Image.DecompressionBombError) as exc:
                raise SlideError(f"{self.path}: cannot read image ({exc})") from None
        return image.resize((side, side), Image.Resampling.BILINEAR)


def _image_rgb(image: Image.Image) -> Image.Image:
    """RGB of any PIL image, transparent pixels over white (tissue-check PNGs are RGBA)."""
    if image.mode in ("RGBA", "LA", "P"):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if image.mode not in ("RGB", "L"):
        raise SlideError(f"{getattr(image, 'filename', 'image')}: unsupported image mode {image.mode} (need RGB)")
    return image.convert("RGB")


def _check_tiff_is_rgb(path: Path) -> None:
    """Refuse TIFFs whose main image is not 8-bit colour (OpenSlide would show a grey scan as if it were RGB)."""
    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages.first
            photometric, samples, dtype = page.photometric, page.samplesperpixel, page.dtype
    except (tifffile.TiffFileError, ValueError, OSError, IndexError) as exc:
        raise SlideError(f"{path}: corrupt or unreadable TIFF ({exc})") from None
    colour = photometric in (tifffile.PHOTOMETRIC.RGB, tifffile.PHOTOMETRIC.YCBCR, tifffile.PHOTOMETRIC.PALETTE)
    if not colour or samples < 3 and photometric != tifffile.PHOTOMETRIC.PALETTE or dtype != np.uint8:
        raise SlideError(f"{path}: not an 8-bit RGB slide ({photometric.name}, {samples} samples, {dtype})")


def open_slide(path: Path, mpp: float | None = None, require_rgb: bool = True) -> Slide:
    """Open ``path`` with the best reader for it; ``mpp`` overrides the level-0 resolution.

    ``require_rgb=False`` accepts single-channel TIFFs too (label masks), read as grey RGB.

    Raises :class:`SlideError` naming the file when no reader can open it.
    """
    path = Path(path)
    if not path.is_file():
        raise SlideError(f"{path}: file not found")
    suffix = path.suffix.lower()
    if suffix in TIFF_SUFFIXES and require_rgb:
        _check_tiff_is_rgb(path)
    if suffix in IMAGE_SUFFIXES:
        return ImageSlide(path, mpp)
    vendor = openslide.OpenSlide.detect_format(str(path))
    if suffix in TIFF_SUFFIXES and vendor in (None, "generic-tiff"):
        # plain TIFF pyramids: tifffile is the faster reader; vendor formats go to OpenSlide
        try:
            with tifffile.TiffFile(path) as tif:
                tiled = len(tif.series) > 0 and tif.series[0].levels[0].keyframe.is_tiled
            if tiled:
                return TiffSlide(path, mpp, require_rgb)
        except (tifffile.TiffFileError, ValueError, OSError, IndexError) as exc:
            raise SlideError(f"{path}: corrupt or unreadable TIFF ({exc})") from None
    if vendor is not None:
        try:
            return OpenSlideSlide(path, mpp)
        except openslide.OpenSlideError as exc:
            raise SlideError(f"{path}: corrupt or unreadable slide ({exc})") from None
    return ImageSlide(path, mpp)
