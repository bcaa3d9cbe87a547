"""Where encoders come from: each builder returns an :class:`~bonylib.models.encoders.Encoder`.

- :func:`from_export`: a Bony pretraining export (the teacher backbone, or its DINO head's output);
- :func:`random_init`: the same architecture untrained, from a seed (the floor that shows what training adds);
- :func:`from_timm`: any timm model with weights from a local file;
- :func:`hibou`: Hibou-B (HistAI's DINOv2 ViT-B/14 with 4 registers) from its Hugging Face folder;
- :func:`histoencoder`: HistoEncoder's DINO-trained XCiT (prostate_small / prostate_medium) state dicts;
- :func:`handcrafted`: colour statistics and texture, no network: the floor a learned encoder must clear;
- :func:`scattering`: wavelet scattering coefficients (kymatio), the fixed multiscale-texture floor.

Nothing is downloaded: weights come from files the user has. A missing or unusable file raises one
:class:`~bonylib.errors.BonyError` line naming the file, what was expected and where the weights are
published. Every identity carries the weights file's SHA-256, so the embedding store refuses
features computed with other weights under the same name.
"""

from __future__ import annotations

import json
import pickle
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from skimage.color import hed_from_rgb
from skimage.feature import graycomatrix, graycoprops, local_binary_pattern
from timm.layers import SwiGLUPacked
from torch import nn

from bonylib.errors import BonyError, ConfigError, one_line
from bonylib.files import read_json, sha256_file
from bonylib.models.backbones import create_backbone
from bonylib.models.encoders import IMAGENET_MEAN, IMAGENET_STD, INPUT_SIZES, Encoder, from_backbone
from bonylib.models.export import load_backbone, load_head
from bonylib.memory import check_fits

Triple = tuple[float, float, float]

HIBOU_URL = "https://huggingface.co/histai/hibou-b"
HIBOU_MEAN: Triple = (0.7068, 0.5755, 0.7220)
HIBOU_STD: Triple = (0.1950, 0.2316, 0.1816)
"""Hibou's normalisation, from the authors' example (github.com/HistAI/hibou, example.ipynb)."""

HISTOENCODER_URL = "https://github.com/jopo666/HistoEncoder/releases/tag/v0.0.1-state-dict"
HISTOENCODER_MODELS: dict[str, str] = {"prostate_small": "xcit_small_12_p16_224",
                                       "prostate_medium": "xcit_medium_24_p16_224"}
"""HistoEncoder's checkpoint names and the timm XCiT whose state dict each file is
(histoencoder/functional/_model.py)."""

TIMM_URL = "the model's page on https://huggingface.co/timm (model.safetensors) or its authors' release"


def _existing_file(path: Path, expected: str, source: str) -> Path:
    """``path`` if it is a file, else the one-line error that says what belongs there and where to get it."""
    path = Path(path)
    if not path.is_file():
        raise BonyError(f"{path}: no such file (expected {expected}; get it from {source})")
    return path


def _read_state_dict(path: Path, expected: str, source: str) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a torch pickle (``weights_only``: a checkpoint cannot run code)."""
    try:
        state = load_file(str(path)) if path.suffix == ".safetensors" else torch.load(path, map_location="cpu",
                                                                                      weights_only=True)
    except (SafetensorError, RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError) as exc:
        raise BonyError(f"{path}: not readable as {expected} ({one_line(exc, 200)}); get it from {source}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BonyError(f"{path}: holds a {type(state).__name__}, not a state dict of tensors (expected {expected}; "
                        f"get it from {source})")
    return state


def _load_strict(model: nn.Module, state: dict[str, torch.Tensor], path: Path, expected: str, source: str) -> nn.Module:
    """``model``, built on the meta device, with every weight taken from ``state`` (no missing, extra or reshaped
    tensor; else the error says which do not fit), in float32 and eval mode.

    Building on the meta device skips initialising weights the file replaces anyway: timm's truncated-normal
    init of ViT-B's 86 M parameters takes longer than reading them.
    """
    try:
        model.load_state_dict(state, assign=True)
    except RuntimeError as exc:
        raise BonyError(f"{path}: weights do not fit {expected} ({one_line(exc)}); get them from {source}") from None
    return model.float().eval()


# ---- Bony exports and random initialisation ---------------------------------------------------


def from_export(run_or_dir: Path, output: str = "backbone") -> Encoder:
    """The teacher of a ``bony pretrain`` run folder, fed exactly as in training (input size, mean, std).

    ``output="backbone"`` gives the backbone's pooled feature and patch tokens; ``output="head"``
    the DINO head's ``out_dim`` prototype scores of that feature (what the seed's decoders read;
    no patch tokens). Exports written before heads were exported serve only the backbone.
    """
    if output not in ("backbone", "head"):
        raise ConfigError(f"export output '{output}' is not one of backbone, head")
    run = Path(run_or_dir)
    backbone, meta = load_backbone(run)
    identity = {"kind": "bony-export", "backbone": meta["backbone"], "sha256": meta["sha256"], "step": meta.get("step"),
                "output": output}
    if meta["stem"] != "none":  # only then, so exports without a stem keep the fingerprints of their stored embeddings
        identity["stem"] = meta["stem"]
    name = f"bony:{run.name}" + (":head" if output == "head" else "")
    mean, std = tuple(meta["mean"]), tuple(meta["std"])
    if output == "backbone":
        return from_backbone(backbone, name, int(meta["input_size"]), mean, std, identity)
    head, head_sha = load_head(run)
    model = nn.Sequential(backbone, head).eval()
    return Encoder(name=name, tokens=lambda batch: (model(batch), None), input_size=int(meta["input_size"]), mean=mean,
                   std=std, embed_dim=int(head.last_layer.out_features), patch_size=None,
                   identity={**identity, "head_sha256": head_sha}, module=model)


def random_init(arch: str, seed: int, input_size: int = 224, mean: Triple = IMAGENET_MEAN,
                std: Triple = IMAGENET_STD) -> Encoder:
    """``arch`` (a Bony backbone name) untrained, its weights drawn from ``seed``: the baseline that tells
    what pretraining added (report several seeds: their spread is the baseline's noise)."""
    backbone = create_backbone(arch, seed=seed)
    return from_backbone(backbone, f"random:{arch}:seed{seed}", input_size, mean, std,
                         {"kind": "random-init", "backbone": arch, "seed": seed})


# ---- timm models from local files -------------------------------------------------------------


def from_timm(name: str, weights_file: Path, pretrained_cfg: dict[str, Any] | None = None) -> Encoder:
    """timm model ``name`` with the weights of ``weights_file`` (``.safetensors``, or a ``.pth``/``.bin`` state dict).

    The file goes through timm's own reader and the model's checkpoint filter (so original-format
    checkpoints timm knows how to convert load too); a classifier in the file is dropped, and every
    backbone weight must then fit. The input size, mean and std come from timm's pretrained config
    for ``name``; ``pretrained_cfg`` overrides its fields (``mean``, ``std``, ``input_size``) when the
    weights were trained with another normalisation.
    """
    if not timm.is_model(name):
        raise ConfigError(f"timm has no model '{name}' (list them with timm.list_models('{name.split('_')[0]}*'))")
    path = _existing_file(weights_file, f"{name} weights", TIMM_URL)
    try:
        state = timm.models.load_state_dict(str(path))
    except (SafetensorError, RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError) as exc:
        raise BonyError(f"{path}: not readable as {name} weights ({one_line(exc, 200)}); get them from {TIMM_URL}") \
            from None
    default_cfg = timm.models.get_pretrained_cfg(name)
    classifier = default_cfg.classifier if default_cfg is not None else None
    for head in (classifier,) if isinstance(classifier, str) else classifier or ():
        state.pop(f"{head}.weight", None)
        state.pop(f"{head}.bias", None)
    # num_classes 0 in the config too: timm then keeps its load strict (a mismatch would only be logged);
    # no source: a config whose source is the Hugging Face hub would download instead of taking the state dict
    overlay = {**(pretrained_cfg or {}), "state_dict": state, "num_classes": 0, "source": None}
    try:
        model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, num_classes=0)
    except RuntimeError as exc:
        raise BonyError(f"{path}: weights do not fit {name} ({one_line(exc)}); get them from {TIMM_URL}") from None
    cfg = model.pretrained_cfg
    return from_backbone(model, f"timm:{name}", int(cfg["input_size"][-1]), tuple(cfg["mean"]), tuple(cfg["std"]),
                         {"kind": "timm", "model": name, "sha256": sha256_file(path)})


# ---- Hibou-B ------------------------------------------------------------------------------------


DINOV2_LIMITS = {"hidden_size": 8192, "num_hidden_layers": 128, "num_attention_heads": 256,
                 "num_register_tokens": 64}
"""Upper bounds of a Hugging Face DINOv2 config's sizes (Hibou-L, the largest, has 1024, 24, 16 and 4; DINOv2-g
1536, 40, 24): a network is built from these numbers before any weight is read."""


def _whole(config: dict[str, Any], key: str, low: int, high: int, default: int | None = None) -> int:
    value = config.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ValueError(f"{key} {value!r} is not a whole number in {low}..{high}")
    return value


def _real(config: dict[str, Any], key: str, low: float, high: float, default: float) -> float:
    value = config.get(key, default)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not low < value <= high:
        raise ValueError(f"{key} {value!r} is not a number in ({low}, {high}]")
    return float(value)


def read_dinov2_config(path: Path) -> dict[str, Any]:
    """A Hugging Face DINOv2 ``config.json`` (Hibou's), checked before a network is built from it: a JSON object
    of ``model_type`` dinov2, every size a whole number in its range (:data:`DINOV2_LIMITS`; heads dividing the
    width, patches fitting the image), the flags booleans, and the parameters it describes within what this
    machine can hold. Returns the values :func:`_hibou_vit` reads, defaults filled in; a bad file raises
    :class:`BonyError` naming it and the key."""
    config = read_json(path)
    try:
        if not isinstance(config, dict):
            raise ValueError(f"a JSON {type(config).__name__}, not an object")
        if config.get("model_type") not in ("dinov2", "dinov2_with_registers"):
            raise ValueError(f"model_type {config.get('model_type')!r}, not dinov2")
        checked: dict[str, Any] = {key: _whole(config, key, 1 if key != "num_register_tokens" else 0, high,
                                               0 if key == "num_register_tokens" else None)
                                   for key, high in DINOV2_LIMITS.items()}
        checked["image_size"] = _whole(config, "image_size", *INPUT_SIZES)
        checked["patch_size"] = _whole(config, "patch_size", 1, checked["image_size"])
        if checked["hidden_size"] % checked["num_attention_heads"]:
            raise ValueError(f"hidden_size {checked['hidden_size']} is not a multiple of num_attention_heads "
                             f"{checked['num_attention_heads']}")
        checked["mlp_ratio"] = _real(config, "mlp_ratio", 0, 64, 4)
        checked["layer_norm_eps"] = _real(config, "layer_norm_eps", 0, 1, 1e-6)
        for key, default in (("use_swiglu_ffn", False), ("qkv_bias", True)):
            checked[key] = config.get(key, default)
            if not isinstance(checked[key], bool):
                raise ValueError(f"{key} {checked[key]!r} is not true or false")
        checked["hidden_act"] = config.get("hidden_act", "gelu")
        if not checked["use_swiglu_ffn"] and checked["hidden_act"] != "gelu":
            raise ValueError(f"hidden_act {checked['hidden_act']!r} is not supported (gelu, or use_swiglu_ffn)")
    except ValueError as exc:
        raise BonyError(f"{path}: not a DINOv2 config ({one_line(exc, 200)}); get it from {HIBOU_URL}") from None
    dim = checked["hidden_size"]
    per_block = 4 * dim * dim + 2 * dim * int(dim * checked["mlp_ratio"])
    check_fits(4 * checked["num_hidden_layers"] * per_block,
               f"{path}: a DINOv2 of {checked['num_hidden_layers']} layers of width {dim}")
    return checked


def _hibou_vit(config: dict[str, Any]) -> nn.Module:
    """The timm DINOv2-with-registers ViT that a checked Hugging Face DINOv2 config (:func:`read_dinov2_config`)
    describes, on the meta device.

    Hibou-B is ``vit_base_patch14_reg4_dinov2`` with SwiGLU feed-forward layers: Hugging Face's
    SwiGLU keeps 2/3 of the MLP width rounded up to a multiple of 8, and timm's packed SwiGLU takes
    the width of its fused input projection (twice that).
    """
    dim, ratio = config["hidden_size"], config["mlp_ratio"]
    if config["use_swiglu_ffn"]:
        hidden = (int(int(dim * ratio) * 2 / 3) + 7) // 8 * 8
        mlp = {"mlp_layer": SwiGLUPacked, "act_layer": nn.SiLU, "mlp_ratio": (2 * hidden + 0.5) / dim}
    else:
        mlp = {"mlp_ratio": ratio}
    with torch.device("meta"):
        return timm.create_model(
            "vit_base_patch14_reg4_dinov2", pretrained=False, num_classes=0, img_size=config["image_size"],
            patch_size=config["patch_size"], embed_dim=dim, depth=config["num_hidden_layers"],
            num_heads=config["num_attention_heads"], reg_tokens=config["num_register_tokens"],
            qkv_bias=config["qkv_bias"], norm_layer=partial(nn.LayerNorm, eps=config["layer_norm_eps"]), **mlp)


_HIBOU_RENAMES: tuple[tuple[str, str], ...] = (
    ("embeddings.patch_embeddings.projection.", "patch_embed.proj."), ("embeddings.register_tokens", "reg_token"),
    ("layernorm.", "norm."), ("encoder.layer.", "blocks."), ("attention.output.dense.", "attn.proj."),
    ("layer_scale1.lambda1", "ls1.gamma"), ("layer_scale2.lambda1", "ls2.gamma"),
    ("mlp.weights_in.", "mlp.fc1."), ("mlp.weights_out.", "mlp.fc2."),
)


def _hibou_state(hf: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """Hugging Face DINOv2 keys -> timm's: q, k and v fused into one projection; the class token's position
    embedding folded into the token itself (timm's registers and class token take no position embedding);
    the mask token (used only in training) dropped. Keys it does not know pass through, so a strict load names them."""
    hf = dict(hf)
    hf.pop("embeddings.mask_token", None)
    position = hf.pop("embeddings.position_embeddings")
    out = {"cls_token": hf.pop("embeddings.cls_token") + position[:, :1], "pos_embed": position[:, 1:]}
    for i in range(depth):
        prefix = f"encoder.layer.{i}.attention.attention."
        for kind in ("weight", "bias"):
            parts = [hf.pop(f"{prefix}{which}.{kind}") for which in ("query", "key", "value")]
            out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat(parts)
    for key, value in hf.items():
        for old, new in _HIBOU_RENAMES:
            key = key.replace(old, new)
        out[key] = value
    return out


def hibou(model_dir: Path, name: str = "Hibou-B") -> Encoder:
    """Hibou-B from the folder its authors publish on Hugging Face (``config.json`` + ``model.safetensors``
    or ``pytorch_model.bin``), run as timm's ``vit_base_patch14_reg4_dinov2`` at the config's input size
    (224) with Hibou's mean and std. The feature is the CLS token after the final norm (the reference's
    ``pooler_output``); patch tokens exclude the 4 registers.
    """
    folder = Path(model_dir)
    layout = "a Hugging Face DINOv2 folder (config.json + model.safetensors or pytorch_model.bin)"
    config_path = folder / "config.json"
    if not folder.is_dir() or not config_path.is_file():
        raise BonyError(f"{config_path}: no such file (expected {layout}; get it from {HIBOU_URL})")
    weights = next((folder / f for f in ("model.safetensors", "pytorch_model.bin") if (folder / f).is_file()), None)
    if weights is None:
        raise BonyError(f"{folder}: no model.safetensors or pytorch_model.bin (expected {layout}; "
                        f"get them from {HIBOU_URL})")
    config = read_dinov2_config(config_path)
    model = _hibou_vit(config)
    expected = f"{name} ({config['hidden_size']}-d, {config['num_hidden_layers']} layers, as {config_path.name} says)"
    try:
        state = _hibou_state(_read_state_dict(weights, expected, HIBOU_URL), len(model.blocks))
    except KeyError as exc:
        raise BonyError(f"{weights}: weights do not fit {expected} (no {exc.args[0]}); get them from {HIBOU_URL}") \
            from None
    model = _load_strict(model, state, weights, expected, HIBOU_URL)
    return from_backbone(model, name, config["image_size"], HIBOU_MEAN, HIBOU_STD,
                         {"kind": "hibou", "model": name, "sha256": sha256_file(weights)})


# ---- HistoEncoder ------------------------------------------------------------------------------


def histoencoder(weights_file: Path, model: str = "prostate_small", mean: Triple = IMAGENET_MEAN,
                 std: Triple = IMAGENET_STD) -> Encoder:
    """HistoEncoder's ``prostate_small`` (XCiT-S12/16) or ``prostate_medium`` (XCiT-M24/16) from the ``.pth``
    its authors publish: a timm XCiT state dict loaded strictly, as ``histoencoder.functional.create_encoder`` does.

    The ``cls`` output equals HistoEncoder's ``extract_features`` default (class token after the final
    norm) and ``cls+mean`` its ``avg_pool=True``. HistoEncoder's own CLI normalises each dataset with its
    tiles' mean and std (HistoPrep); pass those as ``mean``/``std`` to reproduce it, else ImageNet's apply.
    """
    if model not in HISTOENCODER_MODELS:
        raise ConfigError(f"HistoEncoder model '{model}' is not one of {', '.join(HISTOENCODER_MODELS)}")
    arch = HISTOENCODER_MODELS[model]
    expected = f"HistoEncoder {model} ({arch} state dict, {model}.pth)"
    path = _existing_file(weights_file, expected, HISTOENCODER_URL)
    with torch.device("meta"):
        network = timm.create_model(arch, pretrained=False, num_classes=0)
    state = _read_state_dict(path, expected, HISTOENCODER_URL)
    network = _load_strict(network, state, path, expected, HISTOENCODER_URL)
    return from_backbone(network, f"HistoEncoder:{model}", 224, mean, std,
                         {"kind": "histoencoder", "model": model, "sha256": sha256_file(path)})


# ---- handcrafted baseline ----------------------------------------------------------------------

HANDCRAFTED: dict[str, Any] = {
    "version": 1, "spaces": ("rgb", "hed"), "stride": 2, "quantiles": (0.1, 0.25, 0.5, 0.75, 0.9),
    "lbp": {"points": 8, "radius": 1, "method": "uniform"},
    "glcm": {"levels": 32, "distances": (1, 3), "angles": 4,
             "props": ("contrast", "dissimilarity", "homogeneity", "energy", "correlation")},
}
"""What the handcrafted features are; it is part of their identity, so changing it invalidates stored embeddings."""
GRAY = (0.2125, 0.7154, 0.0721)
"""scikit-image's ``rgb2gray`` weights."""


def colour_features(rgb: torch.Tensor) -> torch.Tensor:
    """Per-channel mean, std and quantiles of RGB and of the haematoxylin/eosin/DAB stain densities
    (``skimage.color.rgb2hed``'s colour deconvolution), for a (B, 3, H, W) batch in [0, 1], all at once.

    They are taken over every other pixel of every other row (``HANDCRAFTED["stride"]``): an even sample
    of the tile's own pixel colours, at a quarter of the cost of sorting all of them for the quantiles
    (which dominated the baseline's time).
    """
    stride = HANDCRAFTED["stride"]
    rgb = rgb[..., ::stride, ::stride]
    log_rgb = torch.log(rgb.clamp(min=1e-6)) / np.log(1e-6)
    hed = (log_rgb.movedim(1, -1) @ torch.as_tensor(hed_from_rgb, dtype=rgb.dtype, device=rgb.device)).clamp(min=0)
    pixels = torch.cat([rgb.flatten(2), hed.movedim(-1, 1).flatten(2)], dim=1)  # (B, 6, H*W)
    quantiles = torch.quantile(pixels, torch.tensor(HANDCRAFTED["quantiles"], dtype=rgb.dtype, device=rgb.device),
                               dim=-1).movedim(0, -1)
    stats = [pixels.mean(dim=-1, keepdim=True), pixels.std(dim=-1, unbiased=False, keepdim=True), quantiles]
    return torch.cat(stats, dim=-1).flatten(1)


def texture_features(gray: np.ndarray) -> np.ndarray:
    """Uniform LBP histogram and GLCM properties (averaged over angles, per distance) of one uint8 image."""
    lbp_cfg, glcm_cfg = HANDCRAFTED["lbp"], HANDCRAFTED["glcm"]
    points = lbp_cfg["points"]
    codes = local_binary_pattern(gray, points, lbp_cfg["radius"], method=lbp_cfg["method"])
    histogram = np.bincount(codes.astype(np.int64).ravel(), minlength=points + 2) / codes.size
    levels = glcm_cfg["levels"]
    angles = np.arange(glcm_cfg["angles"]) * np.pi / glcm_cfg["angles"]
    glcm = graycomatrix((gray // (256 // levels)).astype(np.uint8), glcm_cfg["distances"], angles, levels=levels,
                        symmetric=True, normed=True)
    props = [graycoprops(glcm, prop).mean(axis=1) for prop in glcm_cfg["props"]]  # each (distances,)
    return np.concatenate([histogram, *props]).astype(np.float32)


def handcrafted_dim() -> int:
    """Width of the handcrafted feature: 6 colour channels x (mean, std, quantiles), the LBP histogram
    (``points + 2`` uniform codes), and each GLCM property per distance."""
    glcm = HANDCRAFTED["glcm"]
    return (3 * len(HANDCRAFTED["spaces"]) * (2 + len(HANDCRAFTED["quantiles"])) + HANDCRAFTED["lbp"]["points"] + 2
            + len(glcm["props"]) * len(glcm["distances"]))


def handcrafted(input_size: int = 224, mean: Triple = IMAGENET_MEAN, std: Triple = IMAGENET_STD) -> Encoder:
    """Colour statistics (RGB and stain densities) and texture (LBP, GLCM) of each tile: the floor a learned
    encoder must clear. No network; ``mean``/``std`` only undo the normalisation of the batch it is given.

    Colour is computed for the whole batch on its device; texture per tile with scikit-image's compiled
    LBP and GLCM (about 8 ms a 224-px tile on one core, the larger part of the baseline's time).
    """
    mean_t, std_t = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)

    def tokens(batch: torch.Tensor) -> tuple[torch.Tensor, None]:
        with torch.autocast(batch.device.type, enabled=False):  # statistics in float32 whatever the encoder's precision
            rgb = (batch.float() * std_t.to(batch.device) + mean_t.to(batch.device)).clamp(0, 1)
            gray = torch.round(255 * torch.einsum("bchw,c->bhw", rgb, torch.tensor(GRAY, device=batch.device)))
            texture = np.stack([texture_features(g) for g in gray.to(torch.uint8).cpu().numpy()])
            return torch.cat([colour_features(rgb), torch.from_numpy(texture).to(batch.device)], dim=1), None

    return Encoder(name="handcrafted", tokens=tokens, input_size=input_size, mean=tuple(mean), std=tuple(std),
                   embed_dim=handcrafted_dim(), patch_size=None,
                   identity={"kind": "handcrafted", "features": json.loads(json.dumps(HANDCRAFTED))})


# ---- wavelet scattering baseline ---------------------------------------------------------------

SCATTERING_CHANNELS: tuple[str, ...] = ("rgb", "grey")
"""What is scattered: each RGB channel (colour kept, 3x the width and time) or scikit-image's grey level."""


def scattering_dim(J: int, L: int, channels: str = "rgb") -> int:
    """Width of the scattering feature: per channel 1 low-pass + ``J*L`` first-order + ``L^2 J(J-1)/2``
    second-order coefficients (kymatio's order 2, with only the paths j1 < j2 that carry energy)."""
    per_channel = 1 + J * L + L * L * J * (J - 1) // 2
    return per_channel * (3 if channels == "rgb" else 1)


def scattering(input_size: int = 224, J: int = 3, L: int = 8, channels: str = "rgb", mean: Triple = IMAGENET_MEAN,
               std: Triple = IMAGENET_STD) -> Encoder:
    """Spatially averaged 2-D wavelet scattering coefficients (Bruna & Mallat) of each tile, up to order 2, from
    kymatio's ``Scattering2D`` (Morlet wavelets at ``J`` scales and ``L`` orientations): fixed, translation-stable
    multiscale texture with no learning, the baseline a wavelet stem should beat. ``mean``/``std`` only undo the
    normalisation of the batch; the scattering sees pixels in [0, 1].

    The feature is the mean over positions of each coefficient map (the scattering already averages over
    ``2^J`` pixels; the mean extends that invariance to the whole tile, as the tile label has no position).
    It runs in float32 outside autocast (FFTs in bf16 are not supported) and cost about 0.2 s a 224-px
    RGB tile on one shared AMD EPYC core, J=2 and J=3 alike (the full-resolution first layer dominates).

    kymatio is imported from its 2-D torch frontend module, not ``kymatio.torch``: the latter also imports the
    3-D frontend, which needs ``scipy.special.sph_harm``, removed in scipy 1.17 (kymatio issue #1068, open).
    It is imported here rather than with the module so that the other encoders load without kymatio.
    """
    from kymatio import __version__ as kymatio_version
    from kymatio.scattering2d.frontend.torch_frontend import ScatteringTorch2D

    if channels not in SCATTERING_CHANNELS:
        raise ConfigError(f"scattering channels '{channels}' is not one of {', '.join(SCATTERING_CHANNELS)}")
    if input_size % 2**J:
        raise ConfigError(f"scattering input_size {input_size} is not a multiple of 2^J = {2**J}")
    # kymatio builds its filters for one image shape; one module per side seen, so an encoder resized for a
    # benchmark (an evaluation entry's input_size) scatters at that side instead of failing on the shape
    modules = nn.ModuleDict({str(input_size): ScatteringTorch2D(J=J, shape=(input_size, input_size), L=L,
                                                                max_order=2).eval()})
    mean_t, std_t = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)

    def scatter(images: torch.Tensor) -> torch.Tensor:
        side = images.shape[-1]
        if images.shape[-2] != side or side % 2**J:
            raise BonyError(f"scattering: tiles of {tuple(images.shape[-2:])} px; it takes square tiles whose side is "
                            f"a multiple of 2^J = {2**J}")
        if str(side) not in modules:
            modules[str(side)] = ScatteringTorch2D(J=J, shape=(side, side), L=L, max_order=2).eval().to(images.device)
        return modules[str(side)](images.contiguous())

    def tokens(batch: torch.Tensor) -> tuple[torch.Tensor, None]:
        with torch.autocast(batch.device.type, enabled=False):
            rgb = (batch.float() * std_t.to(batch.device) + mean_t.to(batch.device)).clamp(0, 1)
            grey = torch.tensor(GRAY, device=batch.device)
            images = rgb if channels == "rgb" else torch.einsum("bchw,c->bhw", rgb, grey)
            coefficients = scatter(images)  # (B, [3,] K, S / 2^J, S / 2^J)
            return coefficients.mean(dim=(-2, -1)).flatten(1), None

    return Encoder(name=f"scattering:J{J}L{L}:{channels}", tokens=tokens, input_size=input_size, mean=tuple(mean),
                   std=tuple(std), embed_dim=scattering_dim(J, L, channels), patch_size=None,
                   identity={"kind": "scattering", "library": f"kymatio {kymatio_version}", "J": J, "L": L,
                             "max_order": 2, "channels": channels, "pooling": "spatial mean"},
                   module=modules)
