"""facebookresearch/dino checkpoints as encoders: the seed's own models (``checkpoint_4096.pth``) load into Bony.

``main_dino.py`` saves ``{"student", "teacher", "optimizer", "epoch", "args", "dino_loss", ...}``, where the two
networks are the state dicts of a ``MultiCropWrapper(backbone, DINOHead)`` (with DDP's ``module.`` prefix when the
network was wrapped: the student always, the teacher when it has BatchNorm, as XCiT does), ``args`` is the run's
``argparse.Namespace`` and the head's last layer is weight-normalised the old way (``last_layer.weight_g`` and
``weight_v``). Backbones are DINO's ViTs (timm's key names) or the official XCiT, whose position encoder is
``pos_embeder`` and whose class-attention blocks have one ``qkv`` (timm's XCiT checkpoint filter converts them). A
bare backbone state dict (DINO's released ``dino_*_pretrain.pth``) loads too.

The file is read with ``torch.load(weights_only=True)`` and only ``argparse.Namespace`` allowed beside tensors and
plain containers: a checkpoint cannot run code. The architecture comes from ``args.arch`` and ``args.patch_size``
when the checkpoint has them, else from the weights' shapes (embedding width, depth, patch size).
"""

from __future__ import annotations

import argparse
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from timm.models import vision_transformer, xcit
from torch import nn

from bonylib.config import option
from bonylib.errors import BonyError, ConfigError
from bonylib.files import ensure_writable_dir, sha256_file
from bonylib.models.backbones import create_backbone, timm_model
from bonylib.models.encoders import IMAGENET_MEAN, IMAGENET_STD, Encoder, from_backbone
from bonylib.models.export import export_encoder
from bonylib.models.head import DINOHead

DINO_URL = "https://github.com/facebookresearch/dino (main_dino.py's checkpoint.pth, or a released dino_*_pretrain.pth)"
NETWORKS = ("teacher", "student")
INPUT_SIZE = 224
"""DINO's global crops and evaluation input."""

_VIT_SIZES = {192: "tiny", 384: "small", 768: "base"}
_XCIT_SIZES = {(128, 12): "nano_12", (192, 12): "tiny_12", (192, 24): "tiny_24", (384, 12): "small_12",
               (384, 24): "small_24", (512, 24): "medium_24", (768, 24): "large_24"}


@dataclass
class DinoImportConfig:
    """Options of ``bony import-dino``."""

    network: str = option("teacher", "the network to convert: teacher (what DINO and the seed evaluate) or student")

    def __post_init__(self) -> None:
        if self.network not in NETWORKS:
            raise ConfigError(f"network must be one of {', '.join(NETWORKS)}, got '{self.network}'")


@dataclass(frozen=True)
class DinoCheckpoint:
    """One network of a DINO checkpoint, in Bony's terms: its timm architecture, its backbone weights under timm's key
    names, its DINO head's weights under Bony's :class:`DINOHead` names (None when the file has no head) with the
    head's dimensions, and where it came from."""

    arch: str
    backbone: dict[str, torch.Tensor]
    head: dict[str, torch.Tensor] | None
    head_dims: dict[str, int] | None
    network: str
    epoch: int | None
    sha256: str


def _load(path: Path) -> Any:
    """The checkpoint's objects: tensors, plain containers and argparse namespaces only."""
    if not path.is_file():
        raise BonyError(f"{path}: no such file (expected a DINO checkpoint; get it from {DINO_URL})")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError) as exc:
        text = " ".join(str(exc).split())[:300]
        raise BonyError(f"{path}: not readable as a DINO checkpoint of tensors and its args ({text})") from None


def _tensors(state: Any, path: Path, what: str) -> dict[str, torch.Tensor]:
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BonyError(f"{path}: {what} is not a state dict of tensors (expected a DINO checkpoint; {DINO_URL})")
    return {str(k).removeprefix("module."): v for k, v in state.items()}


def _split(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(backbone, head) of a MultiCropWrapper state dict; a dict without ``backbone.`` keys is a bare backbone.
    A classifier the backbone kept (``head.*``, ``fc.*`` of a timm or torchvision model) is dropped: DINO replaces
    it with an identity."""
    if not any(k.startswith("backbone.") for k in state):
        backbone, head = state, {}
    else:
        backbone = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
        head = {k.removeprefix("head."): v for k, v in state.items() if k.startswith("head.")}
    return {k: v for k, v in backbone.items() if not k.startswith(("head.", "fc."))}, head


def _arch_from_args(args: dict[str, Any]) -> str | None:
    """The timm name of ``args.arch`` (and ``args.patch_size``) as ``main_dino.py`` names architectures."""
    arch, patch = str(args.get("arch", "")), int(args.get("patch_size", 16) or 16)
    if arch.startswith(("vit_", "deit_")):
        name = f"vit_{arch.split('_', 1)[1]}_patch{patch}_224"
    elif arch.startswith("xcit_"):
        name = arch if arch.endswith("_224") else f"{arch}_224"
    else:
        return None
    return name if timm.is_model(name) else None


def _arch_from_weights(backbone: dict[str, torch.Tensor], path: Path) -> str:
    """The timm name a backbone's shapes give: XCiT by its XCA temperature, else a ViT; the width from the class
    token, the depth from the blocks, the patch from the patch embedding."""
    width = int(backbone["cls_token"].shape[-1]) if "cls_token" in backbone else 0
    depth = 1 + max((int(m[1]) for k in backbone if (m := re.match(r"blocks\.(\d+)\.", k))), default=-1)
    if any(k.endswith("attn.temperature") for k in backbone):
        convs = sum(1 for k in backbone if re.fullmatch(r"patch_embed\.proj\.\d+\.0\.weight", k))
        size = _XCIT_SIZES.get((width, depth))
        name = f"xcit_{size}_p{16 if convs == 4 else 8}_224" if size else ""
    else:
        patch = int(backbone["patch_embed.proj.weight"].shape[-1]) if "patch_embed.proj.weight" in backbone else 0
        name = f"vit_{_VIT_SIZES.get(width, '?')}_patch{patch}_224"
    if not timm.is_model(name):
        raise BonyError(f"{path}: cannot tell the architecture (width {width}, depth {depth}) and the checkpoint has "
                        f"no args.arch; DINO's ViT and XCiT checkpoints are supported")
    return name


def _head(head: dict[str, torch.Tensor], path: Path) -> tuple[dict[str, torch.Tensor] | None, dict[str, int] | None]:
    """Bony's DINOHead state and dimensions of a DINO head's (the old weight norm's ``weight_g``/``weight_v`` become
    the parametrisation's ``original0``/``original1``); None when there is no head."""
    if not head:
        return None, None
    if any(re.fullmatch(r"mlp\.\d+\.running_mean", k) for k in head):
        raise BonyError(f"{path}: the DINO head has BatchNorm (use_bn_in_head): not supported; use the backbone output")
    if "mlp.weight" in head:  # nlayers=1: DINO's mlp is a single Linear, not a Sequential
        head = {k.replace("mlp.", "mlp.0.", 1) if k.startswith("mlp.") else k: v for k, v in head.items()}
    linears = sorted({int(m[1]) for k in head if (m := re.fullmatch(r"mlp\.(\d+)\.weight", k))})
    if "last_layer.weight_v" not in head or "last_layer.weight_g" not in head or not linears:
        raise BonyError(f"{path}: the head has no weight-normalised last layer (not a DINOHead)")
    # DINO's mlp alternates Linear and GELU as Bony's does, so its Linear layers sit at 0, 2, 4, ...
    state = {f"mlp.{2 * i}.{part}": head[f"mlp.{index}.{part}"] for i, index in enumerate(linears)
             for part in ("weight", "bias") if f"mlp.{index}.{part}" in head}
    state["last_layer.parametrizations.weight.original0"] = head["last_layer.weight_g"]
    state["last_layer.parametrizations.weight.original1"] = head["last_layer.weight_v"]
    first, last = head[f"mlp.{linears[0]}.weight"], head[f"mlp.{linears[-1]}.weight"]
    dims = {"in_dim": int(first.shape[1]), "out_dim": int(head["last_layer.weight_v"].shape[0]),
            "hidden_dim": int(first.shape[0]) if len(linears) > 1 else int(last.shape[0]),
            "bottleneck_dim": int(last.shape[0]), "layers": len(linears)}
    return state, dims


def read_dino_checkpoint(path: Path, network: str = "teacher") -> DinoCheckpoint:
    """``network`` (teacher or student) of the DINO checkpoint at ``path``, mapped to timm and Bony names."""
    if network not in NETWORKS:
        raise ConfigError(f"DINO network '{network}' is not one of {', '.join(NETWORKS)}")
    path = Path(path)
    loaded = _load(path)
    if isinstance(loaded, dict) and network in loaded:
        state, epoch = _tensors(loaded[network], path, f"its '{network}'"), loaded.get("epoch")
        args = loaded.get("args")
    else:
        state, epoch, args = _tensors(loaded, path, "it"), None, None
    args = vars(args) if isinstance(args, argparse.Namespace) else dict(args) if isinstance(args, dict) else {}
    backbone, head = _split(state)
    arch = _arch_from_args(args) or _arch_from_weights(backbone, path)
    head_state, dims = _head(head, path)
    return DinoCheckpoint(arch, backbone, head_state, dims, network, int(epoch) if isinstance(epoch, int) else None,
                          sha256_file(path))


def dino_networks(checkpoint: DinoCheckpoint, path: Path) -> tuple[nn.Module, DINOHead | None]:
    """The backbone (a Bony backbone: timm, eval mode) and the DINO head (or None) with the checkpoint's weights;
    every weight must fit."""
    backbone = create_backbone(checkpoint.arch)
    model = timm_model(backbone)
    filter_fn = xcit.checkpoint_filter_fn if checkpoint.arch.startswith("xcit_") else vision_transformer.checkpoint_filter_fn
    try:
        model.load_state_dict(filter_fn(dict(checkpoint.backbone), model))
    except RuntimeError as exc:
        raise BonyError(f"{path}: weights do not fit {checkpoint.arch} ({' '.join(str(exc).split())[:400]})") from None
    head = None
    if checkpoint.head is not None and checkpoint.head_dims is not None:
        dims = checkpoint.head_dims
        head = DINOHead(dims["in_dim"], dims["out_dim"], dims["hidden_dim"], dims["bottleneck_dim"], layers=dims["layers"])
        try:
            head.load_state_dict(checkpoint.head)
        except RuntimeError as exc:
            raise BonyError(f"{path}: the head's weights do not fit a DINOHead {dims} "
                            f"({' '.join(str(exc).split())[:300]})") from None
        head.eval()
    return backbone.eval(), head


def dino_encoder(path: Path, output: str = "backbone", network: str = "teacher") -> Encoder:
    """The :class:`Encoder` of a DINO checkpoint: the backbone's pooled feature and patch tokens (``backbone``), or
    the DINO head's ``out_dim`` scores (``head``, what the seed's benchmarks read), fed as DINO evaluates (224 px,
    ImageNet normalisation)."""
    if output not in ("backbone", "head"):
        raise ConfigError(f"DINO checkpoint output '{output}' is not one of backbone, head")
    path = Path(path)
    checkpoint = read_dino_checkpoint(path, network)
    backbone, head = dino_networks(checkpoint, path)
    identity = {"kind": "dino-checkpoint", "arch": checkpoint.arch, "network": network, "sha256": checkpoint.sha256,
                "output": output}
    name = f"dino:{path.name}" + (":head" if output == "head" else "")
    if output == "backbone":
        return from_backbone(backbone, name, INPUT_SIZE, IMAGENET_MEAN, IMAGENET_STD, identity)
    if head is None:
        raise BonyError(f"{path}: this checkpoint has no DINO head (a bare backbone); use dino:, not dino-head:")
    model = nn.Sequential(backbone, head).eval()
    return Encoder(name=name, tokens=lambda batch: (model(batch), None), input_size=INPUT_SIZE, mean=IMAGENET_MEAN,
                   std=IMAGENET_STD, embed_dim=int(head.last_layer.out_features), patch_size=None, identity=identity,
                   module=model)


def export_dino(path: Path, out: Path, network: str = "teacher") -> Path:
    """Convert ``network`` of the DINO checkpoint at ``path`` into a Bony export in ``out`` (what ``bony:<out>`` and
    ``bony-head:<out>`` load, and timm alone loads the backbone of); returns the backbone's weights file."""
    path = Path(path)
    checkpoint = read_dino_checkpoint(path, network)
    backbone, head = dino_networks(checkpoint, path)
    return export_encoder(backbone, head, checkpoint.arch, INPUT_SIZE, IMAGENET_MEAN, IMAGENET_STD,
                          ensure_writable_dir(Path(out)), checkpoint.epoch)
