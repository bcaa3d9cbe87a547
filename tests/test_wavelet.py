"""The wavelet experiment: the Haar stem against PyWavelets, the stemmed backbone's tokens, training and export
with the stem, and the scattering baseline against kymatio and on constructed images."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import pywt
import timm
import torch
from kymatio.scattering2d.frontend.torch_frontend import ScatteringTorch2D

from bonylib.compose.pretrain import PretrainConfig, build_trainer
from bonylib.config import load_config, to_dict
from bonylib.errors import BonyError, ConfigError
from bonylib.models.backbones import StemmedBackbone, backbone_stem, create_backbone, timm_model
from bonylib.models.encoders import from_backbone
from bonylib.models.loaders import from_export, scattering, scattering_dim
from bonylib.models.stems import create_stem, haar_dwt2

# ---- the Haar transform ------------------------------------------------------------------------


def test_haar_bands_equal_pywavelets() -> None:
    x = torch.from_numpy(np.random.default_rng(0).normal(size=(2, 3, 12, 18)))
    approx, details = haar_dwt2(x)
    expected_approx, expected_details = pywt.dwt2(x.numpy(), "haar")  # over the last two axes
    np.testing.assert_allclose(approx.numpy(), expected_approx, atol=1e-12)
    for got, expected in zip(details, expected_details, strict=True):
        np.testing.assert_allclose(got.numpy(), expected, atol=1e-12)


def test_the_bands_hold_the_whole_image() -> None:
    """The four bands lose nothing: PyWavelets' inverse of them gives the 8-bit pixels back (what the all-bands stem
    relies on to see the same information as the plain model)."""
    pixels = torch.randint(0, 256, (2, 3, 32, 48), generator=torch.Generator().manual_seed(1)).float()
    approx, details = haar_dwt2(pixels)
    restored = pywt.idwt2((approx.numpy(), tuple(band.numpy() for band in details)), "haar")
    np.testing.assert_allclose(restored, pixels.numpy(), rtol=0, atol=1e-4)


def test_odd_sides_are_refused() -> None:
    with pytest.raises(ValueError, match="even image sides, got 31x32"):
        haar_dwt2(torch.zeros(1, 3, 31, 32))


def test_stems_keep_the_approximation_or_all_bands_band_major() -> None:
    x = torch.rand(2, 3, 16, 16)
    approx, (horizontal, vertical, diagonal) = haar_dwt2(x)
    assert torch.equal(create_stem("haar_approx")(x), approx)
    assert torch.equal(create_stem("haar_bands")(x), torch.cat([approx, horizontal, vertical, diagonal], dim=1))
    assert create_stem("none") is None
    with pytest.raises(ConfigError, match="model.stem 'haar' is not one of none, haar_approx, haar_bands"):
        create_stem("haar")


# ---- the stemmed backbone ----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "xcit_nano_12_p16_224"])
@pytest.mark.parametrize("stem, channels", [("haar_approx", 3), ("haar_bands", 12)])
def test_stemmed_backbone_sees_the_tile_as_the_plain_one_does(name: str, stem: str, channels: int) -> None:
    """Same patch grid and tokens at every crop size, same width, the patch size in image pixels, and
    weights that plain timm loads into the model built for the stem's output."""
    plain, stemmed = create_backbone(name, seed=0), create_backbone(name, seed=0, stem=stem)
    assert isinstance(stemmed, StemmedBackbone) and backbone_stem(stemmed) == stem and backbone_stem(plain) == "none"
    assert stemmed.num_features == plain.num_features
    plain_encoder = from_backbone(plain, "plain", 224, (0.5,) * 3, (0.25,) * 3, {})
    stemmed_encoder = from_backbone(stemmed, "stemmed", 224, (0.5,) * 3, (0.25,) * 3, {})
    assert stemmed_encoder.patch_size == plain_encoder.patch_size == 16
    for side in (32, 96):
        batch = torch.randn(2, 3, side, side)
        assert stemmed.stem(batch).shape == (2, channels, side // 2, side // 2)
        cls, patches = stemmed_encoder.tokens(batch)
        plain_cls, plain_patches = plain_encoder.tokens(batch)
        assert patches.shape == plain_patches.shape == (2, (side // 16) ** 2, plain.num_features)
        assert cls.shape == plain_cls.shape
    inner = timm_model(stemmed)
    assert inner.patch_embed.patch_size in (8, (8, 8))
    assert stemmed.state_dict().keys() == {f"model.{k}" for k in inner.state_dict()}
    extra = {"dynamic_img_size": True} if name.startswith("vit_") else {}
    fresh = timm.create_model(name, pretrained=False, num_classes=0, in_chans=channels, patch_size=8, img_size=112,
                              **extra)
    fresh.load_state_dict(inner.state_dict())


def test_unknown_stem_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="model.stem"):
        create_backbone("vit_tiny_patch16_224", stem="db4")


# ---- training and export with the stem ---------------------------------------------------------


def test_the_wavelet_demo_is_the_demo_with_the_stem(repo: Path) -> None:
    """Same steps, batch, crops and schedules: the with/without comparison runs at the same budget, with the report's
    stem (its §9.2.4: "une seule échelle de décomposition et en considérant l'"Approximation" de l'image")."""
    demo = to_dict(load_config(PretrainConfig, repo / "configs" / "pretrain" / "demo.yaml"))
    wavelet = to_dict(load_config(PretrainConfig, repo / "configs" / "pretrain" / "demo_wavelet.yaml"))
    assert demo["model"].pop("stem") == "none" and wavelet["model"].pop("stem") == "haar_approx"
    assert wavelet == demo


def test_the_stem_trains_in_the_smoke_recipe_and_survives_export(repo: Path, smoke_data: Path, tmp_path: Path) -> None:
    images = smoke_data / "deepgleason" / "tiles"
    cfg = load_config(PretrainConfig, repo / "configs" / "pretrain" / "smoke.yaml",
                      [f"data.images={images}", "model.stem=haar_bands", "max_steps=3"])
    trainer = build_trainer(cfg, tmp_path / "run")
    backbone = trainer.model.student_network.backbone
    assert isinstance(backbone, StemmedBackbone) and isinstance(trainer.model.teacher.backbone, StemmedBackbone)
    stem_shapes, grids = [], []
    backbone.stem.register_forward_hook(lambda module, args, out: stem_shapes.append(tuple(out.shape)))
    timm_model(backbone).patch_embed.register_forward_hook(lambda module, args, out: grids.append(tuple(out.shape)))
    out = trainer.train()

    batch, n_global, n_local = cfg.optim.batch_size, cfg.crops.global_crops, cfg.crops.local_crops
    global_half, local_half = cfg.crops.global_size // 2, cfg.crops.local_size // 2
    assert set(stem_shapes) == {(batch * n_global, 12, global_half, global_half),
                                (batch * n_local, 12, local_half, local_half)}
    plain = create_backbone(cfg.model.backbone)  # the grid the plain model gives the same crops
    expected_grids = {tuple(plain.patch_embed(torch.zeros(1, 3, side, side)).shape[1:-1])
                      for side in (cfg.crops.global_size, cfg.crops.local_size)}
    assert {grid[1:-1] for grid in grids} == expected_grids == {(2, 2), (1, 1)}
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in records)

    meta = json.loads((out / "teacher_backbone.json").read_text())
    assert meta["stem"] == "haar_bands"
    encoder = from_export(out)
    assert encoder.identity["stem"] == "haar_bands" and encoder.patch_size == 16
    assert backbone_stem(encoder.module) == "haar_bands"
    crops = torch.randn(3, 3, cfg.crops.global_size, cfg.crops.global_size)
    teacher = trainer.model.teacher.backbone.eval()
    with torch.inference_mode():
        cls, patches = encoder.tokens(crops)
        torch.testing.assert_close(cls, teacher(crops))
        torch.testing.assert_close(patches, teacher.forward_features(crops)[:, 1:])


# ---- the scattering baseline -------------------------------------------------------------------

MEAN, STD = (0.7, 0.55, 0.7), (0.2, 0.25, 0.2)


def _stripes(side: int, period: float, angle: float, offset: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """A (3, side, side) RGB grating in [0.1, 0.9] with per-channel contrast, optionally translated."""
    yy, xx = torch.meshgrid(torch.arange(side, dtype=torch.float32) + offset[0],
                            torch.arange(side, dtype=torch.float32) + offset[1], indexing="ij")
    wave = torch.cos(2 * math.pi * (xx * math.cos(angle) + yy * math.sin(angle)) / period)
    return torch.stack([0.5 + 0.4 * wave, 0.5 + 0.2 * wave, 0.6 - 0.3 * wave])


def _normalised(rgb: torch.Tensor) -> torch.Tensor:
    return (rgb - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)


@pytest.fixture(scope="module")
def scatter() -> object:
    return scattering(input_size=64, J=2, L=8, mean=MEAN, std=STD)


def test_scattering_features_are_kymatios_spatial_means(scatter) -> None:
    rgb = torch.stack([_stripes(64, 5.0, 0.4), torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0))])
    features = scatter.embed(_normalised(rgb))
    reference = ScatteringTorch2D(J=2, shape=(64, 64), L=8)(rgb.contiguous()).mean(dim=(-2, -1)).flatten(1)
    assert features.shape == (2, scatter.embed_dim) == (2, scattering_dim(2, 8)) == (2, 3 * 81)
    torch.testing.assert_close(features, reference, atol=1e-5, rtol=1e-4)
    grey = scattering(input_size=64, J=2, L=8, channels="grey", mean=MEAN, std=STD)
    assert grey.embed(_normalised(rgb)).shape == (2, scattering_dim(2, 8, "grey")) == (2, 81)
    assert scatter.identity == {"kind": "scattering", "library": scatter.identity["library"], "J": 2, "L": 8,
                                "max_order": 2, "channels": "rgb", "pooling": "spatial mean"}
    assert scatter.identity["library"].startswith("kymatio ")


def test_scattering_of_a_flat_image_is_its_value_with_no_detail(scatter) -> None:
    """The low-pass keeps the mean (order 0) and every wavelet has zero mean (orders 1 and 2 vanish)."""
    rgb = torch.tensor([0.2, 0.5, 0.8]).view(1, 3, 1, 1).expand(1, 3, 64, 64)
    features = scatter.embed(_normalised(rgb[0])[None]).view(3, 81)
    torch.testing.assert_close(features[:, 0], torch.tensor([0.2, 0.5, 0.8]), atol=1e-4, rtol=0)
    assert features[:, 1:].abs().max() < 1e-4


def test_scattering_is_stable_to_shifts_and_not_to_rotations(scatter) -> None:
    """A grating moved by a few pixels keeps its features; turned by 90 degrees its first-order energy moves
    L/2 orientations round (and a grating of another period is as far away)."""
    image = _stripes(64, 5.0, 0.4)
    shifted = _stripes(64, 5.0, 0.4, offset=(2, 3))
    turned = torch.rot90(image, 1, dims=(-2, -1))
    finer = _stripes(64, 3.0, 0.4)
    a, b, c, d = scatter.embed(_normalised(torch.stack([image, shifted, turned, finer])))
    shift, rotation, texture = (b - a).norm() / a.norm(), (c - a).norm() / a.norm(), (d - a).norm() / a.norm()
    assert shift < 0.02 and rotation > 10 * shift and texture > 10 * shift
    assert int(_orientation_energy(c).argmax()) == (int(_orientation_energy(a).argmax()) + 4) % 8


def _orientation_energy(features: torch.Tensor) -> torch.Tensor:
    """The red channel's first-order coefficients (J=2 scales x L=8 orientations) summed over scales."""
    return features.view(3, 81)[0, 1:17].view(2, 8).sum(dim=0)


def test_a_scattering_encoder_resized_for_a_benchmark_scatters_at_the_new_side(scatter) -> None:
    """An evaluation entry's input_size replaces the encoder's: kymatio's filters are built for one shape, so the
    encoder builds them for each side it is given (it failed on the shape before)."""
    rgb = torch.stack([_stripes(32, 4.0, 0.3), _stripes(32, 6.0, 1.2)])
    resized = dataclasses.replace(scatter, input_size=32)
    fresh = scattering(input_size=32, J=2, L=8, mean=MEAN, std=STD)
    torch.testing.assert_close(resized.embed(_normalised(rgb)), fresh.embed(_normalised(rgb)))
    with pytest.raises(BonyError, match="multiple of 2\\^J = 4"):
        scatter.embed(torch.zeros(1, 3, 30, 30))
