"""Encoder loaders against their reference implementations, on random weights saved in each published format.

Bony exports against the trained teacher and plain timm; Hibou against transformers' DINOv2-with-registers
(the architecture of the authors' Hugging Face code); HistoEncoder against its own feature extraction
(timm XCiT, reproduced here as its source does it); the handcrafted baseline against numpy/scikit-image
on constructed images. Every loader's bad-file error is one line naming the file and where weights come from.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from skimage.color import rgb2hed
from skimage.feature import graycomatrix, graycoprops, local_binary_pattern
from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

from bonylib.compose.pretrain import PretrainConfig, build_trainer
from bonylib.config import load_config
from bonylib.errors import BonyError, ConfigError
from bonylib.files import sha256_file
from bonylib.models import loaders
from bonylib.models.backbones import create_backbone
from bonylib.models.head import DINOHead, MultiCropWrapper
from bonylib.models.loaders import (
    HANDCRAFTED,
    HIBOU_MEAN,
    HIBOU_STD,
    HIBOU_URL,
    HISTOENCODER_URL,
    from_export,
    from_timm,
    handcrafted,
    handcrafted_dim,
    hibou,
    histoencoder,
    random_init,
)
from bonylib.runtime import Precision


def one_line_error(call, *needles: str) -> str:  # noqa: ANN001 - any loader call
    """The BonyError ``call`` raises, checked to be one line that contains every needle."""
    with pytest.raises(BonyError) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, (needle, message)
    return message


def random_model(build: Callable[[], torch.nn.Module], seed: int = 0) -> torch.nn.Module:
    """``build()`` with every parameter and buffer drawn at random: norm scales, layer scales, temperatures and
    variances near 1, the rest near 0. Nothing is left at an init's zeros or ones, which would hide a swapped
    tensor; built on the meta device, so the (slow) init is skipped."""
    with torch.device("meta"):
        module = build()
    module.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(seed)
    near_one = ("running_var", "gamma", "lambda1", "temperature")
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if tensor.is_floating_point():
                one = name.endswith(near_one) or (name.endswith("weight") and tensor.ndim == 1)
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.05 + float(one))
            else:
                tensor.zero_()
    return module.eval()


# ---- Bony exports ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run(repo: Path, smoke_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = load_config(PretrainConfig, repo / "configs" / "pretrain" / "smoke.yaml",
                      [f"data.images={smoke_data / 'deepgleason' / 'tiles'}", "max_steps=1"])
    return build_trainer(cfg, tmp_path_factory.mktemp("pretrain") / "run").train()


def test_export_backbone_and_head_equal_the_trained_teacher(run: Path) -> None:
    cfg = load_config(PretrainConfig, run / "config.yaml").model
    network = create_backbone(cfg.backbone)
    teacher = MultiCropWrapper(network, DINOHead(network.num_features, cfg.out_dim, cfg.hidden_dim, cfg.bottleneck_dim))
    teacher.load_state_dict(torch.load(run / "checkpoint.pth", weights_only=True)["teacher"])
    teacher.eval()
    batch = torch.randn(3, 3, 32, 32)
    backbone, head = from_export(run), from_export(run, "head")
    with torch.no_grad():
        torch.testing.assert_close(backbone.embed(batch), teacher.backbone(batch))
        torch.testing.assert_close(head.embed(batch), teacher(batch).head)
    assert (backbone.input_size, backbone.dim(), backbone.patch_size) == (32, 192, 16)
    assert (head.dim(), head.patch_size) == (cfg.out_dim, None)
    assert backbone.identity["sha256"] == sha256_file(run / "teacher_backbone.safetensors")
    assert head.identity["head_sha256"] == sha256_file(run / "teacher_head.safetensors")
    assert backbone.fingerprint() != head.fingerprint()
    with pytest.raises(ConfigError, match="no patch tokens"):
        head.embed(batch, "patch")


def test_plain_timm_loads_the_export_as_the_readme_says(run: Path) -> None:
    meta = json.loads((run / "teacher_backbone.json").read_text())
    size = meta["input_size"]
    model = timm.create_model(meta["backbone"], pretrained=True, num_classes=0, dynamic_img_size=True,
                              pretrained_cfg_overlay=dict(file=str(run / "teacher_backbone.safetensors"),
                                                          input_size=(3, size, size), crop_pct=1.0,
                                                          mean=tuple(meta["mean"]), std=tuple(meta["std"])))
    transform = timm.data.create_transform(**timm.data.resolve_data_config(model=model))
    encoder = from_export(run)
    tiles = [Image.fromarray(np.random.default_rng(i).integers(0, 256, (48, 48, 3), np.uint8)) for i in range(2)]
    batch = torch.stack([encoder.transform(t) for t in tiles])
    torch.testing.assert_close(torch.stack([transform(t) for t in tiles]), batch, rtol=0, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(batch), encoder.embed(batch))


def test_export_without_a_head_still_serves_its_backbone(run: Path, tmp_path: Path) -> None:
    old = tmp_path / "old"
    old.mkdir()
    meta = json.loads((run / "teacher_backbone.json").read_text())
    del meta["head"]  # as exported before heads were
    (old / "teacher_backbone.json").write_text(json.dumps(meta))
    (old / "teacher_backbone.safetensors").write_bytes((run / "teacher_backbone.safetensors").read_bytes())
    assert from_export(old).identity["sha256"] == meta["sha256"]
    one_line_error(lambda: from_export(old, "head"), "teacher_backbone.json", "no DINO head")


def test_damaged_head_and_unknown_output_give_one_line(run: Path, tmp_path: Path) -> None:
    copy = tmp_path / "run"
    copy.mkdir()
    for name in ("teacher_backbone.json", "teacher_backbone.safetensors", "teacher_head.safetensors"):
        (copy / name).write_bytes((run / name).read_bytes())
    (copy / "teacher_head.safetensors").write_bytes(b"\x00" * 64)
    one_line_error(lambda: from_export(copy, "head"), "teacher_head.safetensors", "do not match the sha256")
    (copy / "teacher_head.safetensors").unlink()
    one_line_error(lambda: from_export(copy, "head"), "teacher_head.safetensors", "missing")
    one_line_error(lambda: from_export(copy, "logits"), "backbone, head")
    one_line_error(lambda: from_export(tmp_path / "nowhere"), "nowhere", "bony pretrain")


def test_random_init_is_repeatable_per_seed() -> None:
    batch = torch.randn(2, 3, 32, 32)
    first, again, other = (random_init("vit_tiny_patch16_224", seed, input_size=32) for seed in (1, 1, 2))
    torch.testing.assert_close(first.embed(batch), again.embed(batch), rtol=0, atol=0)
    assert first.fingerprint() == again.fingerprint() != other.fingerprint()
    assert not torch.allclose(first.embed(batch), other.embed(batch))
    assert first.identity == {"kind": "random-init", "backbone": "vit_tiny_patch16_224", "seed": 1}


# ---- any timm model from a local file --------------------------------------------------------------


def test_from_timm_loads_safetensors_and_classifier_checkpoints(tmp_path: Path) -> None:
    reference = random_model(lambda: timm.create_model("vit_tiny_patch16_224"))  # with its ImageNet classifier
    pth = tmp_path / "classifier.pth"
    torch.save(reference.state_dict(), pth)
    backbone_only = tmp_path / "backbone.safetensors"
    save_file({k: v for k, v in reference.state_dict().items() if not k.startswith("head.")}, str(backbone_only))
    batch = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected = reference.forward_head(reference.forward_features(batch), pre_logits=True)
    for path in (pth, backbone_only):
        encoder = from_timm("vit_tiny_patch16_224", path)
        torch.testing.assert_close(encoder.embed(batch), expected)
        assert encoder.identity["sha256"] == sha256_file(path)
    assert (encoder.input_size, encoder.mean, encoder.dim()) == (224, (0.5, 0.5, 0.5), 192)  # timm's config
    assert from_timm("vit_tiny_patch16_224", pth, {"mean": HIBOU_MEAN}).mean == HIBOU_MEAN


def test_from_timm_refuses_bad_files_in_one_line(tmp_path: Path) -> None:
    vit = tmp_path / "vit.safetensors"
    save_file(timm.create_model("vit_tiny_patch16_224", num_classes=0).state_dict(), str(vit))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint" * 8)
    one_line_error(lambda: from_timm("vit_tiny_patch16_224", tmp_path / "none.pth"), "none.pth", "no such file",
                   "huggingface.co/timm")
    one_line_error(lambda: from_timm("vit_tiny_patch16_224", garbage), "garbage.pth", "not readable")
    one_line_error(lambda: from_timm("xcit_nano_12_p16_224", vit), "vit.safetensors", "do not fit xcit_nano_12_p16_224")
    one_line_error(lambda: from_timm("no_such_net", vit), "no_such_net")


# ---- Hibou-B -----------------------------------------------------------------------------------

HIBOU_B_CONFIG = {  # the published histai/hibou-b config.json (its custom code's Dinov2ModelWithRegisters)
    "apply_layernorm": True, "architectures": ["Dinov2ModelWithRegisters"], "attention_probs_dropout_prob": 0.0,
    "auto_map": {"AutoConfig": "configuration_dinov2.Dinov2Config",
                 "AutoModel": "modeling_dinov2.Dinov2ModelWithRegisters"},
    "drop_path_rate": 0.0, "hidden_act": "gelu", "hidden_dropout_prob": 0.0, "hidden_size": 768, "image_size": 224,
    "initializer_range": 0.02, "layer_norm_eps": 1e-06, "layerscale_value": 1.0, "mlp_ratio": 4,
    "model_type": "dinov2", "num_attention_heads": 12, "num_channels": 3, "num_hidden_layers": 12,
    "num_register_tokens": 4, "patch_size": 14, "qkv_bias": True, "torch_dtype": "float32",
    "use_swiglu_ffn": True,
}
REFERENCE_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "image_size", "patch_size",
                  "num_register_tokens", "use_swiglu_ffn", "mlp_ratio", "layer_norm_eps", "hidden_act", "qkv_bias")


def reference_architecture(config: dict) -> Dinov2WithRegistersModel:
    """transformers' DINOv2-with-registers that ``config`` (a Hugging Face DINOv2 config.json) describes."""
    return Dinov2WithRegistersModel(Dinov2WithRegistersConfig(**{k: config[k] for k in REFERENCE_KEYS}))


def reference_dinov2(config: dict, folder: Path, binary: bool = False) -> Dinov2WithRegistersModel:
    """transformers' DINOv2-with-registers at ``config``, random, saved in the authors' layout under ``folder``."""
    model = random_model(lambda: reference_architecture(config))
    model.save_pretrained(folder)
    if binary:  # the older pytorch_model.bin layout, same keys
        torch.save(load_file(str(folder / "model.safetensors")), folder / "pytorch_model.bin")
        (folder / "model.safetensors").unlink()
    (folder / "config.json").write_text(json.dumps(config))
    return model


@pytest.mark.parametrize(("changes", "binary"), [
    ({}, False),  # Hibou-B's own config, two layers deep: every per-layer conversion at the real width
    ({"use_swiglu_ffn": False, "hidden_size": 64, "num_attention_heads": 4, "image_size": 56}, True),
])
def test_hibou_matches_the_reference_dinov2(tmp_path: Path, changes: dict, binary: bool) -> None:
    config = {**HIBOU_B_CONFIG, "num_hidden_layers": 2, **changes}
    reference = reference_dinov2(config, tmp_path / "hibou", binary)
    encoder = hibou(tmp_path / "hibou")
    batch = torch.randn(2, 3, config["image_size"], config["image_size"])
    with torch.no_grad():
        expected = reference(pixel_values=batch)
    torch.testing.assert_close(encoder.embed(batch), expected.pooler_output, rtol=1e-4, atol=1e-4)
    patches = expected.last_hidden_state[:, 1 + config["num_register_tokens"]:]
    torch.testing.assert_close(encoder.embed(batch, "patch"), patches, rtol=1e-4, atol=1e-4)
    assert (encoder.input_size, encoder.mean, encoder.std, encoder.patch_size) == (config["image_size"], HIBOU_MEAN,
                                                                                    HIBOU_STD, 14)
    weights = tmp_path / "hibou" / ("pytorch_model.bin" if binary else "model.safetensors")
    assert encoder.identity["sha256"] == sha256_file(weights)


def test_hibou_b_full_size_has_the_published_parameter_count() -> None:
    """The full 12-layer model, built without memory: 85.7 M parameters as on the model card, the reference's
    less its mask token and the class token's position slot (folded into timm's class token)."""
    with torch.device("meta"):
        ours = loaders._hibou_vit(HIBOU_B_CONFIG)
        reference = reference_architecture(HIBOU_B_CONFIG)
    count = sum(p.numel() for p in ours.parameters())
    assert count == sum(p.numel() for p in reference.parameters()) - 2 * 768 == 85_739_520


def test_hibou_refuses_bad_folders_in_one_line(tmp_path: Path) -> None:
    folder = tmp_path / "hibou"
    small = {**HIBOU_B_CONFIG, "num_hidden_layers": 1, "hidden_size": 32, "num_attention_heads": 2, "image_size": 28}
    reference_dinov2(small, folder)
    one_line_error(lambda: hibou(tmp_path / "elsewhere"), "config.json", "no such file", HIBOU_URL)
    (folder / "config.json").write_text(json.dumps({**small, "num_hidden_layers": 2}))
    one_line_error(lambda: hibou(folder), "model.safetensors", "do not fit", HIBOU_URL)
    (folder / "config.json").write_text(json.dumps({**small, "hidden_size": 64}))
    one_line_error(lambda: hibou(folder), "model.safetensors", "do not fit", HIBOU_URL)
    (folder / "config.json").write_text(json.dumps({**small, "model_type": "vit"}))
    one_line_error(lambda: hibou(folder), "config.json", "not a DINOv2 config", HIBOU_URL)
    (folder / "config.json").write_text(json.dumps(small))
    (folder / "model.safetensors").write_bytes(b"\x00" * 64)
    one_line_error(lambda: hibou(folder), "model.safetensors", "not readable", HIBOU_URL)
    (folder / "model.safetensors").unlink()
    one_line_error(lambda: hibou(folder), "no model.safetensors or pytorch_model.bin", HIBOU_URL)


# ---- HistoEncoder --------------------------------------------------------------------------------


def histoencoder_features(encoder: torch.nn.Module, images: torch.Tensor, num_blocks: int = 1,
                          avg_pool: bool = False) -> torch.Tensor:
    """HistoEncoder's ``functional.extract_features`` step by step (its source, histoencoder/functional/_features.py):
    XCA blocks on the patch tokens, the class token joined before the class-attention blocks, each of the last
    ``num_blocks`` outputs normed and its class token kept, the final patch tokens' mean appended with ``avg_pool``."""
    batch = images.shape[0]
    x, (rows, cols) = encoder.patch_embed(images)
    x = x + encoder.pos_embed(batch, rows, cols).reshape(batch, -1, x.shape[1]).permute(0, 2, 1)
    outputs = []
    for block in encoder.blocks:
        x = block(x, rows, cols)
        outputs.append(x)
    x = torch.cat((encoder.cls_token.expand(batch, -1, -1), x), dim=1)
    for block in encoder.cls_attn_blocks:
        x = block(x)
        outputs.append(x)
    normed = [encoder.norm(out) for out in outputs[-num_blocks:]]
    features = torch.cat([out[:, 0] for out in normed], dim=-1)
    return torch.cat([features, normed[-1][:, 1:].mean(dim=1)], dim=-1) if avg_pool else features


def test_histoencoder_matches_its_own_feature_extraction(tmp_path: Path) -> None:
    # create_encoder: the timm XCiT with num_classes=0, then load_state_dict of the published .pth
    reference = random_model(lambda: timm.create_model("xcit_small_12_p16_224", num_classes=0))
    path = tmp_path / "prostate_small.pth"
    torch.save(reference.state_dict(), path)
    encoder = histoencoder(path, "prostate_small")
    batch = torch.randn(2, 3, 64, 64)  # XCiT takes any multiple of 16; 64 px keeps the test fast
    with torch.no_grad():
        torch.testing.assert_close(encoder.embed(batch), histoencoder_features(reference, batch))
        torch.testing.assert_close(encoder.embed(batch, "cls+mean"),
                                   histoencoder_features(reference, batch, avg_pool=True))
        torch.testing.assert_close(encoder.embed(batch), reference(batch))
    assert (encoder.dim(), encoder.patch_size, encoder.input_size) == (384, 16, 224)
    assert encoder.identity == {"kind": "histoencoder", "model": "prostate_small", "sha256": sha256_file(path)}


def test_histoencoder_refuses_bad_files_in_one_line(tmp_path: Path) -> None:
    nano = tmp_path / "prostate_small.pth"
    torch.save(timm.create_model("xcit_nano_12_p16_224", num_classes=0).state_dict(), nano)
    one_line_error(lambda: histoencoder(nano), "prostate_small.pth", "do not fit", "xcit_small_12_p16_224",
                   HISTOENCODER_URL)
    wrapped = tmp_path / "checkpoint.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "epoch": 3}, wrapped)
    one_line_error(lambda: histoencoder(wrapped), "checkpoint.pth", "not a state dict of tensors", HISTOENCODER_URL)
    one_line_error(lambda: histoencoder(tmp_path / "missing.pth"), "missing.pth", "no such file", HISTOENCODER_URL)
    one_line_error(lambda: histoencoder(nano, "prostate_large"), "prostate_small, prostate_medium")


# ---- handcrafted baseline ------------------------------------------------------------------------


def numpy_colour(image: np.ndarray) -> np.ndarray:
    """Mean, std and quantiles of RGB and stain densities, by numpy and scikit-image, over the same pixel sample."""
    rgb = image[::HANDCRAFTED["stride"], ::HANDCRAFTED["stride"]] / 255.0
    out = []
    for space in (rgb, rgb2hed(rgb)):
        for channel in np.moveaxis(space, -1, 0):
            out += [channel.mean(), channel.std(), *np.quantile(channel, HANDCRAFTED["quantiles"])]
    return np.array(out)


def features_of(images: list[np.ndarray]) -> np.ndarray:
    """The handcrafted encoder's features of uint8 RGB images, through its own transform (normalise, un-normalise)."""
    encoder = handcrafted()
    batch = torch.stack([encoder.transform(Image.fromarray(image)) for image in images])
    features = encoder.embed(batch).numpy()
    assert features.shape == (len(images), handcrafted_dim())
    return features


def test_handcrafted_colour_and_texture_match_numpy_and_skimage() -> None:
    rng = np.random.default_rng(0)
    image = (rng.random((224, 224, 3)) ** 2 * 255).astype(np.uint8)
    features = features_of([image])[0]
    colour = 6 * (2 + len(HANDCRAFTED["quantiles"]))
    np.testing.assert_allclose(features[:colour], numpy_colour(image), rtol=1e-4, atol=1e-5)
    gray = np.round(image @ np.array([0.2125, 0.7154, 0.0721])).astype(np.uint8)
    codes = local_binary_pattern(gray, 8, 1, method="uniform")
    np.testing.assert_allclose(features[colour:colour + 10], [np.mean(codes == c) for c in range(10)], atol=1e-6)
    glcm = graycomatrix(gray // 8, [1, 3], [0, np.pi / 4, np.pi / 2, 3 * np.pi / 4], levels=32, symmetric=True,
                        normed=True)
    props = np.concatenate([graycoprops(glcm, p).mean(axis=1) for p in HANDCRAFTED["glcm"]["props"]])
    np.testing.assert_allclose(features[colour + 10:], props, rtol=1e-5)


def test_handcrafted_features_of_constructed_tiles() -> None:
    """A flat colour: its statistics are the colour; inside, every LBP code is 'all neighbours >= centre' (8),
    while scikit-image reads 0 beyond the border, so edge pixels see 3 darker neighbours (code 5) and corners 5
    (code 3); the GLCM is one cell. A 1-px black/white checkerboard: horizontal and vertical neighbours
    (distances 1 and 3) always differ by 31 grey levels (contrast 961), diagonal ones (offsets (1, 1) and
    (2, 2)) never (0), mean 480.5."""
    flat = np.broadcast_to(np.array([200, 120, 180], np.uint8), (224, 224, 3)).copy()
    board = (np.indices((224, 224)).sum(axis=0) % 2 * 255).astype(np.uint8)
    features = features_of([flat, np.repeat(board[..., None], 3, axis=-1)])
    colour = 6 * (2 + len(HANDCRAFTED["quantiles"]))
    per_channel = features[0, :colour].reshape(6, -1)
    hed = rgb2hed(flat[:1, :1] / 255.0)[0, 0]
    np.testing.assert_allclose(per_channel[:, 0], [200 / 255, 120 / 255, 180 / 255, *hed], rtol=1e-5)
    np.testing.assert_allclose(per_channel[:, 1], 0, atol=1e-6)
    np.testing.assert_allclose(per_channel[:, 2:], np.repeat(per_channel[:, :1], 5, axis=1), rtol=1e-5)
    lbp = features[0, colour:colour + 10]
    np.testing.assert_allclose(lbp[[3, 5, 8]], np.array([4, 4 * 222, 222 * 222]) / 224**2, rtol=1e-5)
    assert lbp.sum() == pytest.approx(1.0)
    glcm = features[:, colour + 10:].reshape(2, 5, 2).transpose(1, 0, 2)  # (property, tile, distance)
    contrast, dissimilarity, homogeneity, energy, correlation = glcm
    np.testing.assert_allclose(contrast, [[0, 0], [480.5, 480.5]])
    np.testing.assert_allclose(dissimilarity, [[0, 0], [15.5, 15.5]])
    np.testing.assert_allclose(energy[0], 1.0)
    np.testing.assert_allclose(homogeneity[0], 1.0)
    np.testing.assert_allclose(correlation[0], 1.0)


def test_handcrafted_is_an_encoder_without_network_or_patches() -> None:
    encoder = handcrafted()
    batch = torch.randn(2, 3, 224, 224)
    assert encoder.module is None and encoder.patch_size is None and encoder.dim() == handcrafted_dim() == 62
    with pytest.raises(ConfigError, match="no patch tokens"):
        encoder.embed(batch, "patch")
    assert encoder.fingerprint() == handcrafted().fingerprint()
    assert encoder.identity["features"]["glcm"]["levels"] == 32
    fp32 = encoder.embed(batch)
    encoder.precision = Precision("bf16", "bf16", "a GPU-wide setting")  # statistics stay float32 regardless
    torch.testing.assert_close(encoder.embed(batch), fp32, rtol=0, atol=0)
