"""DINO multi-crop and histology augmentations.

Checked against pictures the test builds (tiles whose pixels encode their coordinates, H&E images
synthesised from known stain concentrations) and independent computations (NumPy colour
deconvolution with ``np.linalg.pinv``, scikit-image's ``rgb2hed``, SciPy's Gaussian filter, the 8
dihedral transforms in NumPy).
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage as ndi
from skimage.color import rgb2hed

from bonylib.config import load_config
from bonylib.errors import ConfigError
from bonylib.ssl.augment import (
    HED_FROM_RGB,
    RGB_FROM_HED,
    CropConfig,
    DINOTransform,
    HEDJitter,
    MultiCropTransform,
    crop_box,
    hed_to_rgb,
    rgb_to_hed,
    views_transform,
)
from bonylib.ssl.data import collate_views

# Ruifrok & Johnston's stain optical densities (R, G, B), to two decimals as in scikit-image.
H = np.array([0.65, 0.70, 0.29])
E = np.array([0.07, 0.99, 0.11])
D = np.array([0.27, 0.57, 0.78])
STAINS = np.stack([H, E, D])

# Every augmentation off: crops are plain resized cuts, de-normalised by *255.
PLAIN = dict(flip_p=0.0, rotate90=False, hed_p=0.0, color_p=0.0, blur_p_global1=0.0, blur_p_global2=0.0,
             blur_p_local=0.0, solarize_p=0.0, mean=[0.0, 0.0, 0.0], std=[1.0, 1.0, 1.0])


def one_crop_config(**options: object) -> CropConfig:
    """Two 40 px global crops of a 40 px image, whole and unflipped, with only ``options`` on."""
    return CropConfig(**{**PLAIN, "global_crops": 2, "local_crops": 0, "global_size": 40,
                         "global_scale": [1.0, 1.0], "ratio": [1.0, 1.0], **options})


def random_image(h: int, w: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def denormalise(crop: torch.Tensor, cfg: CropConfig) -> np.ndarray:
    mean = torch.tensor(cfg.mean).view(3, 1, 1)
    std = torch.tensor(cfg.std).view(3, 1, 1)
    return (crop * std + mean).numpy()


def he_image(c_h: np.ndarray, c_e: np.ndarray) -> np.ndarray:
    """RGB (H, W, 3) in (0, 1] of haematoxylin and eosin optical densities ``c_h``, ``c_e`` (-log10)."""
    od = c_h[..., None] * H + c_e[..., None] * E
    return 10.0 ** -od


def deconvolve(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) RGB -> (H, W, 3) H, E, DAB concentrations in -log10 optical density."""
    return -np.log10(rgb) @ np.linalg.pinv(STAINS)


# ------------------------------------------------------------------------------------ config


def test_config_defaults_follow_dino_and_overrides_load() -> None:
    cfg = CropConfig()
    assert (cfg.global_crops, cfg.global_size, cfg.global_scale) == (2, 224, [0.4, 1.0])
    assert (cfg.local_crops, cfg.local_size, cfg.local_scale) == (8, 96, [0.05, 0.4])
    assert (cfg.blur_p_global1, cfg.blur_p_global2, cfg.blur_p_local, cfg.solarize_p) == (1.0, 0.1, 0.5, 0.0)
    seed = load_config(CropConfig, overrides=["global_crops=1", "local_crops=5", "hed_shift=0.01"])
    assert (seed.global_crops, seed.local_crops, seed.hed_shift, seed.n_crops) == (1, 5, 0.01, 6)


@pytest.mark.parametrize("override, key", [
    (dict(global_crops=0), "crops.global_crops"),
    (dict(local_crops=-1), "crops.local_crops"),
    (dict(local_size=4), "crops.local_size"),
    (dict(local_scale=[0.5, 0.2]), "crops.local_scale"),
    (dict(global_scale=[0.4, 1.5]), "crops.global_scale"),
    (dict(global_scale=[0.4]), "crops.global_scale"),
    (dict(ratio=[0.0, 1.0]), "crops.ratio"),
    (dict(blur_sigma=[2.0, 0.1]), "crops.blur_sigma"),
    (dict(flip_p=1.5), "crops.flip_p"),
    (dict(solarize_p=-0.1), "crops.solarize_p"),
    (dict(hed_jitter=1.0), "crops.hed_jitter"),
    (dict(hed_shift=-0.1), "crops.hed_shift"),
    (dict(brightness=-0.2), "crops.brightness"),
    (dict(std=[0.2, 0.0, 0.2]), "crops.std"),
    (dict(mean=[0.5, 0.5]), "crops.mean"),
])
def test_config_rejects_bad_values_naming_the_key(override: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        CropConfig(**override)


# ------------------------------------------------------------------------------------ crops


@pytest.mark.parametrize("n_global, n_local", [(2, 8), (1, 5)])
def test_crop_count_shapes_dtype_and_range(n_global: int, n_local: int) -> None:
    cfg = CropConfig(global_crops=n_global, local_crops=n_local)
    transform = MultiCropTransform(cfg)
    torch.manual_seed(0)
    for image in (random_image(224, 224), random_image(180, 300, seed=1).convert("RGBA")):
        crops = transform(image)
        assert len(crops) == n_global + n_local
        for i, crop in enumerate(crops):
            size = cfg.global_size if i < n_global else cfg.local_size
            assert crop.shape == (3, size, size) and crop.dtype == torch.float32 and crop.is_contiguous()
            pixels = denormalise(crop, cfg)
            assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
            assert pixels.std() > 0.01  # not a constant image


def test_same_seed_same_crops_and_only_torch_rng_is_used() -> None:
    transform = MultiCropTransform(CropConfig(solarize_p=0.5))
    image = random_image(200, 200)

    def draw(seed: int, other_seed: int) -> list[torch.Tensor]:
        random.seed(other_seed)
        np.random.seed(other_seed)
        python_state, numpy_state = random.getstate(), np.random.get_state()
        torch.manual_seed(seed)
        crops = transform(image)
        assert random.getstate() == python_state  # Python's and NumPy's generators are not touched
        assert all(np.array_equal(a, b) for a, b in zip(np.random.get_state()[1:3], numpy_state[1:3]))
        return crops

    first, again, other = draw(7, 1), draw(7, 2), draw(8, 1)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert all(not torch.equal(a, b) for a, b in zip(first, other))


def test_dataloader_workers_reproduce_crops_from_the_loader_seed() -> None:
    images = [random_image(64, 64, seed=i) for i in range(6)]
    transform = MultiCropTransform(CropConfig(global_size=32, local_size=16))
    dataset = [(image, i) for i, image in enumerate(images)]

    class Views(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(dataset)

        def __getitem__(self, index: int) -> tuple[list[torch.Tensor], int]:
            image, target = dataset[index]
            return transform(image), target

    def run(seed: int) -> list[torch.Tensor]:
        loader = torch.utils.data.DataLoader(Views(), batch_size=3, num_workers=2, collate_fn=collate_views,
                                             generator=torch.Generator().manual_seed(seed))
        return [crop for batch in loader for crop in batch.crops]

    first, again, other = run(0), run(0), run(1)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))


def test_flips_and_rotations_are_the_eight_dihedral_transforms() -> None:
    source = np.random.default_rng(3).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    dihedral = [np.rot90(flipped, k) for flipped in (source, source[:, ::-1]) for k in range(4)]
    cfg = CropConfig(**{**PLAIN, "flip_p": 0.5, "rotate90": True}, global_crops=1, local_crops=0, global_size=40,
                     global_scale=[1.0, 1.0], ratio=[1.0, 1.0])
    transform = MultiCropTransform(cfg)
    seen = set()
    torch.manual_seed(0)
    for _ in range(64):
        (crop,) = transform(Image.fromarray(source))
        out = np.round(crop.permute(1, 2, 0).numpy() * 255).astype(np.uint8)
        matches = [k for k, t in enumerate(dihedral) if np.array_equal(out, t)]
        assert len(matches) == 1
        seen.add(matches[0])
    assert seen == set(range(8))
    plain = MultiCropTransform(CropConfig(**{**PLAIN, "global_crops": 1, "local_crops": 0, "global_size": 40,
                                    "global_scale": [1.0, 1.0], "ratio": [1.0, 1.0]}))
    (crop,) = plain(Image.fromarray(source))
    assert np.array_equal(np.round(crop.permute(1, 2, 0).numpy() * 255).astype(np.uint8), source)


def test_crops_cover_the_configured_area_fractions() -> None:
    side = 256
    y, x = np.mgrid[0:side, 0:side]
    coords = Image.fromarray(np.stack([x, y, np.full_like(x, 128)], axis=-1).astype(np.uint8))
    cfg = CropConfig(**{**PLAIN, "flip_p": 0.5, "rotate90": True})
    transform = MultiCropTransform(cfg)
    torch.manual_seed(0)
    fractions: dict[str, list[float]] = {"global": [], "local": []}
    for _ in range(25):
        for i, crop in enumerate(transform(coords)):
            pixels = np.round(denormalise(crop, cfg) * 255)
            width = pixels[0].max() - pixels[0].min() + 1  # x range (any orientation)
            height = pixels[1].max() - pixels[1].min() + 1  # y range
            kind = "global" if i < cfg.global_crops else "local"
            fractions[kind].append(width * height / side**2)
            aspect = width / height
            assert 0.75 / 1.1 <= aspect <= 4 / 3 * 1.1
    for kind, (lo, hi) in (("global", cfg.global_scale), ("local", cfg.local_scale)):
        got = np.array(fractions[kind])
        assert got.min() >= lo * 0.9 and got.max() <= min(hi * 1.1, 1.0), kind
        assert got.min() < lo + 0.25 * (hi - lo) and got.max() > hi - 0.25 * (hi - lo), kind  # spans the range
    assert np.mean(fractions["local"]) < np.mean(fractions["global"]) / 2


def test_crop_box_matches_torchvision_algorithm_bounds() -> None:
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        u = torch.rand(22, generator=g).tolist()
        top, left, h, w = crop_box(u[0:10], u[10:20], u[20], u[21], 120, 200, (0.05, 0.4), (0.75, 4 / 3))
        assert 0 <= top <= 120 - h and 0 <= left <= 200 - w
        assert 0.05 * 0.95 <= h * w / (120 * 200) <= 0.4 * 1.05
    # no box fits a 1:10 strip at full scale with ratio near 1: centre crop with the ratio clamped
    assert crop_box([0.5] * 10, [0.5] * 10, 0.0, 0.0, 10, 100, (1.0, 1.0), (0.9, 1.1)) == (0, 44, 10, 11)


# ------------------------------------------------------------------------------------ stains


def test_stain_matrix_and_deconvolution_match_scikit_image() -> None:
    assert np.allclose(RGB_FROM_HED, STAINS) and np.allclose(HED_FROM_RGB @ STAINS, np.eye(3))
    rgb = np.random.default_rng(0).uniform(0.05, 1.0, (16, 16, 3))
    ours = rgb_to_hed(torch.from_numpy(rgb).permute(2, 0, 1)).permute(1, 2, 0).numpy()
    assert np.allclose(np.maximum(ours / 6.0, 0), rgb2hed(rgb), atol=1e-9)  # skimage: OD / ln(1e6), clipped at 0
    back = hed_to_rgb(torch.from_numpy(ours).permute(2, 0, 1)).permute(1, 2, 0).numpy()
    assert np.allclose(back, rgb, atol=1e-9)


def test_hed_jitter_with_strength_zero_is_identity() -> None:
    rgb = torch.from_numpy(np.array(random_image(32, 48))).permute(2, 0, 1).float() / 255
    torch.manual_seed(0)
    out = HEDJitter(strength=0.0, shift=0.0, p=1.0)(rgb)
    assert out.shape == rgb.shape and (out - rgb).abs().max() < 1 / 255
    cfg = CropConfig(**{**PLAIN, "hed_p": 1.0, "hed_jitter": 0.0}, global_crops=1, local_crops=0, global_size=48,
                     global_scale=[1.0, 1.0], ratio=[1.0, 1.0])
    image = random_image(48, 48)
    (crop,) = MultiCropTransform(cfg)(image)
    assert np.abs(crop.permute(1, 2, 0).numpy() - np.asarray(image) / 255).max() < 1 / 255


def test_hed_jitter_scales_and_shifts_known_stain_concentrations() -> None:
    rng = np.random.default_rng(0)
    c_h, c_e = rng.uniform(0.05, 0.8, (2, 24, 24))
    rgb = he_image(c_h, c_e)
    assert np.allclose(deconvolve(rgb), np.stack([c_h, c_e, np.zeros_like(c_h)], axis=-1), atol=1e-9)
    a = np.array([[0.1, -0.05, 0.2]])
    b = np.array([[0.02, -0.03, 0.01]])
    x = torch.from_numpy(rgb).permute(2, 0, 1)[None].float()
    out = HEDJitter.apply(x, torch.from_numpy(a), torch.from_numpy(b))[0].permute(1, 2, 0).double().numpy()
    got = deconvolve(out)
    assert np.allclose(got[..., 0], c_h * 1.1 + 0.02, atol=2e-5)
    assert np.allclose(got[..., 1], c_e * 0.95 - 0.03, atol=2e-5)
    assert np.allclose(got[..., 2], 0.01, atol=2e-5)  # no DAB: only the shift


def test_random_hed_jitter_draws_within_its_strength() -> None:
    rng = np.random.default_rng(1)
    c_h, c_e = rng.uniform(0.1, 0.8, (2, 16, 16))
    x = torch.from_numpy(he_image(c_h, c_e)).permute(2, 0, 1).float()
    batch = x[None].repeat(200, 1, 1, 1)
    torch.manual_seed(0)
    out = HEDJitter(strength=0.05, shift=0.02, p=0.5)(batch).permute(0, 2, 3, 1).double().numpy()
    fits = []
    for image in out:
        got = deconvolve(image)
        slope_h, icpt_h = np.polyfit(c_h.ravel(), got[..., 0].ravel(), 1)
        slope_e, icpt_e = np.polyfit(c_e.ravel(), got[..., 1].ravel(), 1)
        fits.append((slope_h - 1, slope_e - 1, icpt_h, icpt_e, got[..., 2].mean()))
    fits = np.array(fits)
    assert np.abs(fits[:, :2]).max() <= 0.05 + 1e-4 and np.abs(fits[:, 2:]).max() <= 0.02 + 1e-4
    untouched = np.abs(fits).max(axis=1) < 1e-4
    assert 70 <= untouched.sum() <= 130  # p = 0.5
    jittered = fits[~untouched]
    assert np.abs(jittered[:, :2]).max() > 0.04 and np.abs(jittered[:, 2:]).max() > 0.015  # the range is used
    assert abs(jittered[:, 0].mean()) < 0.01  # symmetric around 1


def test_multicrop_draws_its_own_stain_jitter_per_crop_within_strength() -> None:
    rng = np.random.default_rng(2)
    c_h, c_e = rng.uniform(0.1, 0.8, (2, 40, 40))
    image = Image.fromarray(np.round(he_image(c_h, c_e) * 255).astype(np.uint8))
    source = deconvolve(np.asarray(image) / 255)  # the uint8 image's own concentrations
    cfg = one_crop_config(hed_p=1.0, hed_jitter=0.05, hed_shift=0.02)
    transform = MultiCropTransform(cfg)
    torch.manual_seed(0)
    fits = []
    for _ in range(30):
        for crop in transform(image):
            got = deconvolve(crop.permute(1, 2, 0).double().numpy())
            fits.append([np.polyfit(source[..., s].ravel(), got[..., s].ravel(), 1) for s in (0, 1)])
    fits = np.array(fits)  # (crops, stain, [slope, intercept])
    scales, shifts = np.abs(fits[..., 0] - 1), np.abs(fits[..., 1])
    assert scales.max() <= 0.05 + 1e-3 and shifts.max() <= 0.02 + 1e-3
    assert scales.max() > 0.04 and shifts.max() > 0.015
    assert not np.allclose(fits[0::2], fits[1::2], atol=1e-3)  # the two crops of an image differ


# ------------------------------------------------------------------------------------ colour, blur, solarise



def test_blur_is_a_gaussian_on_the_first_global_crop_only() -> None:
    image = random_image(40, 40)
    cfg = one_crop_config(blur_p_global1=1.0, blur_p_global2=0.0, blur_sigma=[1.5, 1.5])
    first, second = MultiCropTransform(cfg)(image)
    source = np.asarray(image) / 255
    expected = np.stack([ndi.gaussian_filter(source[..., c], 1.5, mode="mirror", truncate=3.0) for c in range(3)])
    assert np.abs(first.numpy() - expected).max() < 1e-5
    assert np.abs(second.numpy() - source.transpose(2, 0, 1)).max() < 1e-6


def test_solarisation_only_when_configured_and_only_on_the_second_global_crop() -> None:
    image = random_image(40, 40)
    source = np.asarray(image).transpose(2, 0, 1) / 255
    first, second = MultiCropTransform(one_crop_config(solarize_p=1.0))(image)
    assert np.abs(first.numpy() - source).max() < 1e-6
    assert np.abs(second.numpy() - np.where(source >= 128 / 255, 1 - source, source)).max() < 1e-6
    assert all(np.abs(crop.numpy() - source).max() < 1e-6 for crop in MultiCropTransform(one_crop_config())(image))


def test_brightness_and_contrast_are_bounded_affine_changes() -> None:
    image = Image.fromarray(np.random.default_rng(0).integers(60, 200, (40, 40, 3), dtype=np.uint8))
    source = np.asarray(image).transpose(2, 0, 1) / 255
    torch.manual_seed(0)
    bright = MultiCropTransform(one_crop_config(color_p=1.0, brightness=0.2, contrast=0.0, saturation=0.0))
    contrast = MultiCropTransform(one_crop_config(color_p=1.0, brightness=0.0, contrast=0.2, saturation=0.0))
    factors = []
    for _ in range(20):
        for crop in bright(image):
            ratio = crop.numpy() / source
            assert np.ptp(ratio) < 1e-4
            factors.append(ratio.mean())
        for crop in contrast(image):
            out = crop.numpy()
            slope, _ = np.polyfit(source.ravel(), out.ravel(), 1)
            gray = lambda v: 0.2989 * v[0] + 0.587 * v[1] + 0.114 * v[2]  # noqa: E731
            assert abs(gray(out).mean() - gray(source).mean()) < 1e-5  # mean luma kept
            assert 0.8 - 1e-4 <= slope <= 1.2 + 1e-4
    assert 0.8 <= min(factors) < 0.9 and 1.1 < max(factors) <= 1.2


# ------------------------------------------------------------------------------------ collate


def test_collate_views_stacks_by_crop_index() -> None:
    transform = MultiCropTransform(CropConfig(global_crops=1, local_crops=5, global_size=32, local_size=16))
    torch.manual_seed(0)
    samples = [(transform(random_image(48, 48, seed=i)), i * 10) for i in range(3)]
    crops = collate_views(samples).crops
    assert len(crops) == 6
    assert crops[0].shape == (3, 3, 32, 32) and all(c.shape == (3, 3, 16, 16) for c in crops[1:])
    for i, batch in enumerate(crops):
        for b, (sample, _) in enumerate(samples):
            assert torch.equal(batch[b], sample[i])
    with pytest.raises(ValueError, match="different numbers of crops"):
        collate_views([samples[0], (samples[1][0][:3], 1)])


# ------------------------------------------------------------------------------------ DINO's own pipeline


class ReferenceBlur:
    """facebookresearch/dino's utils.GaussianBlur, restated."""

    def __init__(self, p: float) -> None:
        self.p = p

    def __call__(self, img: Image.Image) -> Image.Image:
        if random.random() > self.p:
            return img
        from PIL import ImageFilter

        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(0.1, 2.0)))


class ReferenceSolarization:
    """facebookresearch/dino's utils.Solarization, restated."""

    def __init__(self, p: float) -> None:
        self.p = p

    def __call__(self, img: Image.Image) -> Image.Image:
        from PIL import ImageOps

        return ImageOps.solarize(img) if random.random() < self.p else img


def reference_dino_augmentation(global_scale, local_scale, local_crops, global_size=224, local_size=96):
    """DataAugmentationDINO of facebookresearch/dino's main_dino.py, restated from its code with torchvision."""
    from torchvision import transforms

    flip_and_color_jitter = transforms.Compose([
        transforms.RandomHorizontalFlip(p=0.5),
        transforms.RandomApply([transforms.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=0.8),
        transforms.RandomGrayscale(p=0.2),
    ])
    normalize = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    bicubic = transforms.InterpolationMode.BICUBIC
    global1 = transforms.Compose([transforms.RandomResizedCrop(global_size, scale=global_scale, interpolation=bicubic),
                                  flip_and_color_jitter, ReferenceBlur(1.0), normalize])
    global2 = transforms.Compose([transforms.RandomResizedCrop(global_size, scale=global_scale, interpolation=bicubic),
                                  flip_and_color_jitter, ReferenceBlur(0.1), ReferenceSolarization(0.2), normalize])
    local = transforms.Compose([transforms.RandomResizedCrop(local_size, scale=local_scale, interpolation=bicubic),
                                flip_and_color_jitter, ReferenceBlur(p=0.5), normalize])
    return lambda image: [global1(image), global2(image)] + [local(image) for _ in range(local_crops)]


def test_the_dino_pipeline_equals_dinos_own_augmentation_under_the_same_seeds() -> None:
    cfg = CropConfig(pipeline="dino", global_crops=2, local_crops=8, global_size=224, local_size=96)
    ours, reference = views_transform(cfg), reference_dino_augmentation((0.4, 1.0), (0.05, 0.4), 8)
    assert isinstance(ours, DINOTransform)
    for seed in range(6):
        image = random_image(300, 260, seed=seed)
        torch.manual_seed(seed)
        random.seed(seed)
        got = ours(image)
        torch.manual_seed(seed)
        random.seed(seed)
        expected = reference(image)
        assert len(got) == 10 and [c.shape[-1] for c in got] == [224] * 2 + [96] * 8
        for a, b in zip(got, expected, strict=True):
            assert torch.equal(a, b)


def test_the_dino_pipeline_greys_a_fifth_of_the_crops() -> None:
    """On a uniform pink that colour jitter never makes grey nor saturates, a grey crop (three equal channels before
    the normalisation) comes from DINO's grayscale: 20 % of the crops."""
    cfg = CropConfig(pipeline="dino", global_crops=2, local_crops=2, global_size=64, local_size=32)
    transform = views_transform(cfg)
    mean, std = torch.tensor(cfg.mean).view(3, 1, 1), torch.tensor(cfg.std).view(3, 1, 1)
    pink = Image.fromarray(np.tile(np.array([180, 120, 160], np.uint8), (96, 96, 1)))
    grey = []
    for seed in range(400):
        torch.manual_seed(seed)
        random.seed(seed)
        pixels = [c * std + mean for c in transform(pink)]
        grey += [bool((p[0] - p[1]).abs().max() < 1e-5 and (p[1] - p[2]).abs().max() < 1e-5) for p in pixels]
    assert 0.16 < np.mean(grey) < 0.24


def test_seeded_views_seed_pythons_random_per_sample_and_leave_it_as_it_was() -> None:
    from bonylib.ssl.data import SeededViews

    cfg = CropConfig(pipeline="dino", global_crops=1, local_crops=2, global_size=64, local_size=32)
    views = SeededViews([(random_image(80, 80, seed=i), 0) for i in range(3)], views_transform(cfg), seed=5)
    random.seed(123)
    state = random.getstate()
    first = views[1][0]
    assert random.getstate() == state
    random.seed(999)  # whatever the caller's state, the sample's crops are the same
    assert all(torch.equal(a, b) for a, b in zip(first, views[1][0]))
