"""DINO multi-crop with histology augmentations.

:class:`MultiCropTransform` turns one tile into the crops of a DINO step, following the reference
``DataAugmentationDINO`` (facebookresearch/dino): ``global_crops`` large views (the teacher sees
only these) and ``local_crops`` small ones, each a random resized crop (bicubic) with its own
augmentations. ImageNet's colour jitter and grayscale are replaced by what varies between
histology scans:

* horizontal and vertical flips and 90° rotations (tissue has no up or left);
* stain jitter in haematoxylin-eosin-DAB space (:class:`HEDJitter`, Tellez et al. 2018/2019);
* mild brightness, contrast and saturation changes;
* Gaussian blur (out-of-focus scanning): p = 1.0 on the first global crop, 0.1 on the others and
  0.5 on local crops, as in DINO; solarisation of the second and later global crops only when
  ``solarize_p`` is set (DINO uses 0.2).

With one global crop only the first recipe is used. Crops are cut and resized on uint8 tensors,
then every colour step runs on all crops of one size at once (vectorised float32 in torch).

All randomness comes from torch's global generator (one ``torch.rand`` call per image), never
from Python's ``random`` or NumPy, so seeding torch (and the DataLoader's per-worker seeds)
reproduces the crops exactly, which exact resume relies on.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter, ImageOps

from bonylib.config import check_fractions, option
from bonylib.errors import ConfigError
from bonylib.models.encoders import IMAGENET_MEAN, IMAGENET_STD

RGB_FROM_HED = np.array([[0.65, 0.70, 0.29],   # haematoxylin
                         [0.07, 0.99, 0.11],   # eosin
                         [0.27, 0.57, 0.78]])  # DAB
"""Ruifrok & Johnston's stain optical-density vectors (rows), as in ``skimage.color.rgb_from_hed``."""
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED)
OD_UNIT = math.log(10.0)
"""Stain concentrations are in optical-density units (absorbance, ``-log10`` of the transmitted
intensity): ``-ln(rgb) / OD_UNIT @ HED_FROM_RGB``, which is 6 x ``skimage.color.rgb2hed``
(skimage divides the natural logarithm by ln(1e6) instead)."""
EPS = 1e-6
"""Smallest intensity before taking the logarithm (skimage's choice)."""
GRAY = (0.2989, 0.587, 0.114)
"""Luma weights of torchvision's ``rgb_to_grayscale`` (contrast and saturation use them)."""


PIPELINES = ("histology", "dino")


@dataclass
class CropConfig:
    """Multi-crop and augmentation options (config section ``crops`` of ``bony pretrain``)."""

    pipeline: str = option("histology", "the views' augmentations: histology (stain jitter, flips and 90-degree turns, "
                           "mild colour changes; the keys below) or dino (facebookresearch/dino's DataAugmentationDINO as "
                           "it is: horizontal flip, colour jitter 0.4/0.4/0.2/0.1 at p 0.8, grayscale 0.2, Gaussian blur "
                           "1.0/0.1/0.5, solarisation 0.2 of the second global crop; only the crops' number, sizes, "
                           "scales and normalisation are read from this section)")
    global_crops: int = option(2, "number of global crops (teacher and student); the seed used 1, reference DINO 2")
    global_size: int = option(224, "side of a global crop in pixels")
    global_scale: list[float] = option([0.4, 1.0], "area range of a global crop as a fraction of the tile [min, max]")
    local_crops: int = option(8, "number of local crops (student only); the seed used 5, reference DINO 8")
    local_size: int = option(96, "side of a local crop in pixels")
    local_scale: list[float] = option([0.05, 0.4], "area range of a local crop as a fraction of the tile [min, max]")
    ratio: list[float] = option([0.75, 4 / 3], "aspect-ratio range (width/height) of the cut before resizing to a square")
    flip_p: float = option(0.5, "probability of a horizontal flip, and independently of a vertical flip")
    rotate90: bool = option(True, "rotate each crop by a random multiple of 90 degrees")
    hed_p: float = option(0.8, "probability of stain jitter in HED space per crop")
    hed_jitter: float = option(
        0.05, "HED stain jitter strength s: each stain's concentration c (in optical density, -log10) becomes "
        "c*(1+a) + b with a, b ~ U(-s, s) per stain (Tellez et al.: 0.05 light, 0.2 strong)")
    hed_shift: float | None = option(
        None, "strength of the additive stain shift b ~ U(-hed_shift, hed_shift) in optical density; null: hed_jitter. "
        "The shift also tints white glass (b = 0.05 of haematoxylin darkens it by about 7%), 0 keeps it white")
    color_p: float = option(0.8, "probability of the brightness/contrast/saturation change per crop")
    brightness: float = option(0.2, "brightness factor drawn from [1 - x, 1 + x]")
    contrast: float = option(0.2, "contrast factor drawn from [1 - x, 1 + x]")
    saturation: float = option(0.1, "saturation factor drawn from [1 - x, 1 + x]")
    blur_p_global1: float = option(1.0, "Gaussian blur probability of the first global crop (DINO: 1.0)")
    blur_p_global2: float = option(0.1, "Gaussian blur probability of the second and later global crops (DINO: 0.1)")
    blur_p_local: float = option(0.5, "Gaussian blur probability of a local crop (DINO: 0.5)")
    blur_sigma: list[float] = option([0.1, 2.0], "Gaussian blur sigma range in output pixels [min, max]")
    solarize_p: float = option(0.0, "solarisation probability of the second and later global crops (DINO: 0.2; off "
                               "by default for histology)")
    mean: list[float] = option(list(IMAGENET_MEAN), "per-channel normalisation mean (RGB, in [0, 1])")
    std: list[float] = option(list(IMAGENET_STD), "per-channel normalisation standard deviation (RGB)")

    def __post_init__(self) -> None:
        if self.pipeline not in PIPELINES:
            raise ConfigError(f"crops.pipeline must be one of {', '.join(PIPELINES)}, got '{self.pipeline}'")
        if self.global_crops < 1:
            raise ConfigError(f"crops.global_crops must be at least 1, got {self.global_crops}")
        if self.local_crops < 0:
            raise ConfigError(f"crops.local_crops must be at least 0, got {self.local_crops}")
        for name in ("global_size", "local_size"):
            if getattr(self, name) < 8:
                raise ConfigError(f"crops.{name} must be at least 8 pixels, got {getattr(self, name)}")
        for name in ("global_scale", "local_scale"):
            lo, hi = _pair(self, name)
            if not 0.0 < lo <= hi <= 1.0:
                raise ConfigError(f"crops.{name} must be [min, max] with 0 < min <= max <= 1, got {[lo, hi]}")
        lo, hi = _pair(self, "ratio")
        if not 0.0 < lo <= hi:
            raise ConfigError(f"crops.ratio must be [min, max] with 0 < min <= max, got {[lo, hi]}")
        lo, hi = _pair(self, "blur_sigma")
        if not 0.0 < lo <= hi:
            raise ConfigError(f"crops.blur_sigma must be [min, max] with 0 < min <= max, got {[lo, hi]}")
        check_fractions("crops", self, ("flip_p", "hed_p", "color_p", "blur_p_global1", "blur_p_global2",
                                        "blur_p_local", "solarize_p"))
        for name in ("hed_jitter", "brightness", "contrast", "saturation"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"crops.{name} must be in [0, 1), got {value}")
        if self.hed_shift is not None and not 0.0 <= self.hed_shift <= 1.0:
            raise ConfigError(f"crops.hed_shift must be in [0, 1] or null, got {self.hed_shift}")
        for name in ("mean", "std"):
            if len(getattr(self, name)) != 3:
                raise ConfigError(f"crops.{name} must have 3 values (R, G, B), got {getattr(self, name)}")
        if min(self.std) <= 0:
            raise ConfigError(f"crops.std must be positive, got {self.std}")

    @property
    def n_crops(self) -> int:
        """Crops per image: global ones first, then local ones."""
        return self.global_crops + self.local_crops


def _pair(cfg: CropConfig, name: str) -> tuple[float, float]:
    value = getattr(cfg, name)
    if len(value) != 2:
        raise ConfigError(f"crops.{name} must be a pair [min, max], got {value}")
    return float(value[0]), float(value[1])


# --------------------------------------------------------------------------------------------
# Stain jitter


def rgb_to_hed(rgb: torch.Tensor) -> torch.Tensor:
    """Colour deconvolution of ``(..., 3, H, W)`` RGB in [0, 1] into H, E, DAB concentrations.

    ``skimage.color.rgb2hed`` times 6 (optical density in -log10 units, see :data:`OD_UNIT`),
    without clipping negative concentrations, so that :func:`hed_to_rgb` inverts it exactly.
    """
    od = rgb.clamp(min=EPS).log().neg_().div_(OD_UNIT)
    return torch.einsum("...chw,ck->...khw", od, torch.as_tensor(HED_FROM_RGB, dtype=rgb.dtype))


def hed_to_rgb(hed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`rgb_to_hed`: ``(..., 3, H, W)`` stain concentrations to RGB in [0, 1]."""
    od = torch.einsum("...khw,kc->...chw", hed, torch.as_tensor(RGB_FROM_HED, dtype=hed.dtype))
    return od.mul_(-OD_UNIT).exp_().clamp_(0.0, 1.0)


class HEDJitter:
    """Stain augmentation in haematoxylin-eosin-DAB space (Ruifrok & Johnston colour deconvolution).

    Per image, each stain channel's concentration ``c`` (optical density, :data:`OD_UNIT`) becomes
    ``c * (1 + a) + b`` with ``a ~ U(-strength, strength)`` and ``b ~ U(-shift, shift)`` drawn
    independently per stain (Tellez et al. 2018), and the result goes back to RGB, clipped to
    [0, 1]. Call on a float tensor ``(3, H, W)`` or ``(N, 3, H, W)`` in [0, 1]; it draws from
    torch's global generator. :meth:`apply` does the same with given ``a`` and ``b``.
    """

    def __init__(self, strength: float = 0.05, shift: float | None = None, p: float = 1.0) -> None:
        self.strength = float(strength)
        self.shift = float(strength if shift is None else shift)
        self.p = float(p)

    def __repr__(self) -> str:
        return f"HEDJitter(strength={self.strength}, shift={self.shift}, p={self.p})"

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        batch = image if image.dim() == 4 else image[None]
        out = self.jitter(batch, torch.rand(batch.shape[0], 7))
        return out if image.dim() == 4 else out[0]

    def jitter(self, batch: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
        """``batch`` (N, 3, H, W) jittered with the uniforms ``draws`` (N, 7): columns 0-2 give ``a``, 3-5 ``b`` and
        6 whether the image is jittered at all (below ``p``). The multi-crop transform passes its own per-crop draws,
        so that every random number of a crop comes from one draw (what makes a resumed run see the same crops)."""
        applied = draws[:, 6] < self.p
        if not applied.any():
            return batch
        scale = (2 * draws[:, 0:3] - 1) * self.strength
        shift = (2 * draws[:, 3:6] - 1) * self.shift
        if applied.all():
            return self.apply(batch, scale, shift)
        out = batch.clone()
        out[applied] = self.apply(batch[applied], scale[applied], shift[applied])
        return out

    @staticmethod
    def apply(image: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        """Jitter ``(N, 3, H, W)`` RGB in [0, 1] with per-image ``a = scale`` and ``b = shift`` (N, 3).

        Fused, with ``od = -ln(rgb)`` as row vectors and ``M`` the stain matrix:
        ``od' = od @ inv(M) @ diag(1 + a) @ M + OD_UNIT * b @ M``, then ``rgb' = exp(-od')``.
        """
        dtype = image.dtype
        m = torch.as_tensor(RGB_FROM_HED, dtype=torch.float64)
        m_inv = torch.as_tensor(HED_FROM_RGB, dtype=torch.float64)
        a = scale.to(torch.float64).reshape(-1, 3)
        b = shift.to(torch.float64).reshape(-1, 3)
        transform = (m_inv[None] * (1.0 + a)[:, None, :]) @ m  # (N, 3, 3): od row -> od' row
        offset = (OD_UNIT * b) @ m  # (N, 3)
        log_rgb = image.clamp(min=EPS).log_()  # -od
        out = torch.einsum("nchw,nck->nkhw", log_rgb, transform.to(dtype))
        out.sub_(offset.to(dtype)[:, :, None, None])
        return out.exp_().clamp_(0.0, 1.0)


# --------------------------------------------------------------------------------------------
# Multi-crop

# Columns of the per-crop uniform draws (one torch.rand(n_crops, _N_DRAWS) per image).
_ATTEMPTS = 10  # torchvision's RandomResizedCrop tries 10 boxes before its centre-crop fallback
_SCALE = slice(0, _ATTEMPTS)
_RATIO = slice(_ATTEMPTS, 2 * _ATTEMPTS)
_TOP, _LEFT, _HFLIP, _VFLIP, _ROT = range(2 * _ATTEMPTS, 2 * _ATTEMPTS + 5)
_HED_P = 2 * _ATTEMPTS + 5
_HED_DRAWS = [*range(_HED_P + 1, _HED_P + 7), _HED_P]  # HEDJitter.jitter's columns: a (3), b (3), whether
_COLOR_P, _BRIGHT, _CONTRAST, _SAT, _BLUR_P, _SIGMA, _SOLAR_P = range(_HED_P + 7, _HED_P + 14)
_N_DRAWS = _HED_P + 14


def crop_box(u_scale: Sequence[float], u_ratio: Sequence[float], u_top: float, u_left: float,
             height: int, width: int, scale: Sequence[float], ratio: Sequence[float]) -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` of a random resized crop from uniforms in [0, 1) (torchvision's algorithm).

    Up to 10 tries of an area fraction ~ U(scale) and a log-uniform aspect ratio; the first box
    that fits is placed uniformly. If none fits, the centre crop with the ratio clamped to ``ratio``.
    """
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for us, ur in zip(u_scale, u_ratio):
        target = area * (scale[0] + (scale[1] - scale[0]) * us)
        aspect = math.exp(log_lo + (log_hi - log_lo) * ur)
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = min(int(u_top * (height - h + 1)), height - h)
            left = min(int(u_left * (width - w + 1)), width - w)
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _as_uint8_hwc(image: Image.Image | np.ndarray | torch.Tensor) -> torch.Tensor:
    """An RGB image as a uint8 ``(1, 3, H, W)`` tensor with channels-last strides (a view of HWC)."""
    if isinstance(image, Image.Image):
        if image.mode != "RGB":
            image = image.convert("RGB")
        hwc = torch.from_numpy(np.array(image, dtype=np.uint8, copy=True))
    elif isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an (H, W, 3) uint8 array, got {image.dtype} {image.shape}")
        hwc = torch.from_numpy(np.ascontiguousarray(image))
    elif isinstance(image, torch.Tensor):
        if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"expected a (3, H, W) uint8 tensor, got {image.dtype} {tuple(image.shape)}")
        hwc = image.permute(1, 2, 0)
    else:
        raise TypeError(f"expected a PIL image, got {type(image).__name__}")
    return hwc.permute(2, 0, 1)[None]


def _dihedral(crop: torch.Tensor, hflip: bool, vflip: bool, quarter_turns: int) -> torch.Tensor:
    dims = [d for d, on in ((3, hflip), (2, vflip)) if on]
    if dims:
        crop = crop.flip(dims)
    if quarter_turns:
        crop = crop.rot90(quarter_turns, (2, 3))
    return crop


def _blur_(image: torch.Tensor, sigma: float) -> None:
    """Gaussian blur of a ``(C, H, W)`` float tensor in place: separable, truncated at 3 sigma, reflect border."""
    _, height, width = image.shape
    radius = max(1, min(math.ceil(3.0 * sigma), height - 1, width - 1))
    weights = [math.exp(-0.5 * (k / sigma) ** 2) for k in range(-radius, radius + 1)]
    total = sum(weights)
    weights = [w / total for w in weights]
    padded = F.pad(image[None], (0, 0, radius, radius), mode="reflect")[0]
    rows = padded[:, 0:height] * weights[0]
    for k in range(1, 2 * radius + 1):
        rows.add_(padded[:, k:k + height], alpha=weights[k])
    padded = F.pad(rows[None], (radius, radius, 0, 0), mode="reflect")[0]
    out = padded[:, :, 0:width] * weights[0]
    for k in range(1, 2 * radius + 1):
        out.add_(padded[:, :, k:k + width], alpha=weights[k])
    image.copy_(out)


def _gray(x: torch.Tensor) -> torch.Tensor:
    """``(N, 3, H, W)`` -> ``(N, 1, H, W)`` luma."""
    return (x[:, 0:1] * GRAY[0]).add_(x[:, 1:2], alpha=GRAY[1]).add_(x[:, 2:3], alpha=GRAY[2])


class MultiCropTransform:
    """Callable: PIL image (RGB, any size) -> list of float32 normalised crops.

    Global crops come first, ``(3, global_size, global_size)``, then local crops
    ``(3, local_size, local_size)``. Crops of one size are slices of one tensor.
    """

    def __init__(self, cfg: CropConfig) -> None:
        self.cfg = cfg
        self.hed = HEDJitter(cfg.hed_jitter, cfg.hed_shift, cfg.hed_p)
        self.mean = torch.tensor(cfg.mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(cfg.std, dtype=torch.float32).view(1, 3, 1, 1)
        n_global, n_local = cfg.global_crops, cfg.local_crops
        # Per-crop probabilities: crop 1 is DINO's first global recipe, crops 2.. its second.
        self.blur_p = torch.tensor([cfg.blur_p_global1] + [cfg.blur_p_global2] * (n_global - 1)
                                   + [cfg.blur_p_local] * n_local)
        self.solarize_p = torch.tensor([0.0] + [cfg.solarize_p] * (n_global - 1) + [0.0] * n_local)
        self.groups = [(0, n_global, cfg.global_size, cfg.global_scale)]
        if n_local:
            self.groups.append((n_global, n_global + n_local, cfg.local_size, cfg.local_scale))

    def __repr__(self) -> str:
        return f"MultiCropTransform({self.cfg})"

    def __call__(self, image: Image.Image | np.ndarray | torch.Tensor) -> list[torch.Tensor]:
        """Crops of ``image``: a PIL image (converted to RGB), an (H, W, 3) uint8 array or a (3, H, W) uint8 tensor."""
        source = _as_uint8_hwc(image)
        height, width = source.shape[-2:]
        cfg = self.cfg
        u = torch.rand(cfg.n_crops, _N_DRAWS)
        rows = u.tolist()
        crops: list[torch.Tensor] = []
        for start, stop, size, scale in self.groups:
            batch = torch.empty(stop - start, 3, size, size, dtype=torch.uint8)
            for i, r in enumerate(rows[start:stop]):
                top, left, h, w = crop_box(r[_SCALE], r[_RATIO], r[_TOP], r[_LEFT], height, width, scale, cfg.ratio)
                cut = source[:, :, top:top + h, left:left + w]
                if (h, w) != (size, size):
                    cut = F.interpolate(cut, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
                cut = _dihedral(cut, r[_HFLIP] < cfg.flip_p, r[_VFLIP] < cfg.flip_p,
                                int(r[_ROT] * 4) % 4 if cfg.rotate90 else 0)
                batch[i].copy_(cut[0])
            crops.extend(self._colour(batch, u[start:stop], self.blur_p[start:stop], self.solarize_p[start:stop]))
        return crops

    def _colour(self, batch: torch.Tensor, u: torch.Tensor, blur_p: torch.Tensor,
                solarize_p: torch.Tensor) -> list[torch.Tensor]:
        """uint8 crops of one size -> normalised float crops, with each crop's own draws ``u``."""
        cfg = self.cfg
        x = batch.float().mul_(1.0 / 255.0)
        if self.hed.strength > 0 or self.hed.shift > 0:
            x = self.hed.jitter(x, u[:, _HED_DRAWS])
        color = u[:, _COLOR_P] < cfg.color_p
        if color.any():
            one = torch.ones(())
            factors = (1 + (2 * u[:, [_BRIGHT, _CONTRAST, _SAT]] - 1) * torch.tensor(
                [cfg.brightness, cfg.contrast, cfg.saturation])).where(color[:, None], one)
            factors = factors[:, :, None, None, None]  # (N, 3 factors, 1, 1, 1)
            if cfg.brightness > 0:
                x.mul_(factors[:, 0]).clamp_(0.0, 1.0)
            if cfg.contrast > 0:
                mean = _gray(x).mean(dim=(1, 2, 3), keepdim=True)
                x.sub_(mean).mul_(factors[:, 1]).add_(mean).clamp_(0.0, 1.0)
            if cfg.saturation > 0:
                gray = _gray(x)
                x.sub_(gray).mul_(factors[:, 2]).add_(gray).clamp_(0.0, 1.0)
        blur = (u[:, _BLUR_P] < blur_p).tolist()
        sigmas = (cfg.blur_sigma[0] + (cfg.blur_sigma[1] - cfg.blur_sigma[0]) * u[:, _SIGMA]).tolist()
        for i, (on, sigma) in enumerate(zip(blur, sigmas)):
            if on:
                _blur_(x[i], sigma)
        solarize = u[:, _SOLAR_P] < solarize_p
        if solarize.any():
            part = x[solarize]
            x[solarize] = torch.where(part >= 128 / 255, 1.0 - part, part)
        x.sub_(self.mean).div_(self.std)
        return list(x.unbind(0))


# --------------------------------------------------------------------------------------------
# DINO's own pipeline


class _PILGaussianBlur:
    """DINO's ``utils.GaussianBlur``: with probability ``p`` a PIL Gaussian blur of radius ~ U(0.1, 2.0), both drawn
    from Python's ``random`` (seeded per sample by :class:`bonylib.ssl.data.SeededViews`, as torch is)."""

    def __init__(self, p: float, radius_min: float = 0.1, radius_max: float = 2.0) -> None:
        self.p, self.radius_min, self.radius_max = p, radius_min, radius_max

    def __call__(self, image: Image.Image) -> Image.Image:
        if random.random() > self.p:
            return image
        return image.filter(ImageFilter.GaussianBlur(radius=random.uniform(self.radius_min, self.radius_max)))


class _PILSolarization:
    """DINO's ``utils.Solarization``: with probability ``p``, PIL's solarize (pixels >= 128 inverted)."""

    def __init__(self, p: float) -> None:
        self.p = p

    def __call__(self, image: Image.Image) -> Image.Image:
        return ImageOps.solarize(image) if random.random() < self.p else image


class DINOTransform:
    """facebookresearch/dino's ``DataAugmentationDINO``, built from torchvision's transforms as its code builds it:
    callable PIL image -> list of normalised crops, global ones first (the first with DINO's first global recipe,
    the others with its second), then the local ones.

    Only the geometry (numbers, sizes, scales of the crops) and the normalisation come from the config: the
    augmentations are DINO's defaults, what the seed says it kept ("les valeurs par défaut du repository Github
    associé à DINO"). Unlike the histology pipeline it flips horizontally only, jitters hue and makes some crops
    grey, and draws its blur and solarisation from Python's ``random`` as DINO does.
    """

    def __init__(self, cfg: CropConfig) -> None:
        from torchvision import transforms as T

        self.cfg = cfg
        flip_and_color_jitter = T.Compose([
            T.RandomHorizontalFlip(p=0.5),
            T.RandomApply([T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=0.8),
            T.RandomGrayscale(p=0.2),
        ])
        normalize = T.Compose([T.ToTensor(), T.Normalize(tuple(cfg.mean), tuple(cfg.std))])
        bicubic = T.InterpolationMode.BICUBIC
        global_crop = T.RandomResizedCrop(cfg.global_size, scale=tuple(cfg.global_scale), interpolation=bicubic)
        self.global1 = T.Compose([global_crop, flip_and_color_jitter, _PILGaussianBlur(1.0), normalize])
        self.global2 = T.Compose([global_crop, flip_and_color_jitter, _PILGaussianBlur(0.1), _PILSolarization(0.2),
                                  normalize])
        self.local = T.Compose([T.RandomResizedCrop(cfg.local_size, scale=tuple(cfg.local_scale), interpolation=bicubic),
                                flip_and_color_jitter, _PILGaussianBlur(p=0.5), normalize])

    def __repr__(self) -> str:
        return f"DINOTransform({self.cfg})"

    def __call__(self, image: Image.Image) -> list[torch.Tensor]:
        image = image.convert("RGB") if image.mode != "RGB" else image
        crops = [self.global1(image)] + [self.global2(image) for _ in range(self.cfg.global_crops - 1)]
        return crops + [self.local(image) for _ in range(self.cfg.local_crops)]


def views_transform(cfg: CropConfig) -> MultiCropTransform | DINOTransform:
    """The multi-crop transform ``crops.pipeline`` names."""
    return DINOTransform(cfg) if cfg.pipeline == "dino" else MultiCropTransform(cfg)
