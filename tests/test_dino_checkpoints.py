"""facebookresearch/dino checkpoints load as Bony encoders and convert to Bony exports, with the outputs of the
network they came from.

The checkpoints are written here as ``main_dino.py`` writes them: ``{"student", "teacher", "optimizer", "epoch",
"args", "dino_loss"}``, the networks as state dicts of ``MultiCropWrapper(backbone, DINOHead)`` (``module.`` where
DDP wrapped them), DINO's head built as its code builds it (``nn.utils.weight_norm``: ``weight_g``/``weight_v``),
the official XCiT's key names (``pos_embeder``, one ``qkv`` per class-attention block) and ``args`` an
``argparse.Namespace``. The reference outputs come from those reference modules, not from Bony's.
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bonylib.cli import main
from bonylib.errors import BonyError
from bonylib.models.backbones import create_backbone
from bonylib.models.registry import encoder_from_spec

K, HIDDEN, BOTTLENECK = 64, 32, 16


class ReferenceDINOHead(nn.Module):
    """DINO's DINOHead (nlayers=3, no BN, norm_last_layer) as facebookresearch/dino builds it."""

    def __init__(self, in_dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, HIDDEN), nn.GELU(),
                                 nn.Linear(HIDDEN, BOTTLENECK))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch deprecates the old weight norm DINO uses
            self.last_layer = nn.utils.weight_norm(nn.Linear(BOTTLENECK, K, bias=False))
        self.last_layer.weight_g.data.fill_(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(F.normalize(self.mlp(x), dim=-1, p=2))


def official_xcit_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm's XCiT state dict under the official implementation's names (what DINO's torch.hub XCiT carries)."""
    out = {}
    for key, value in state.items():
        key = key.replace("pos_embed.", "pos_embeder.")
        out[key] = value
    for block in {k.split(".attn.")[0] for k in state if k.startswith("cls_attn_blocks.") and ".attn.q." in k}:
        for part in ("weight", "bias"):
            pieces = [out.pop(f"{block}.attn.{name}.{part}") for name in "qkv"]
            out[f"{block}.attn.qkv.{part}"] = torch.cat(pieces)
    return out


def write_dino_checkpoint(path: Path, arch: str, dino_arch: str, ddp_teacher: bool, seed: int = 0
                          ) -> tuple[nn.Module, nn.Module]:
    """A DINO checkpoint of a random network; returns the teacher's (backbone, head) reference modules."""
    torch.manual_seed(seed)
    networks = {}
    for name in ("student", "teacher"):
        backbone = create_backbone(arch)
        head = ReferenceDINOHead(backbone.num_features)
        state = backbone.state_dict()
        if arch.startswith("xcit_"):
            state = official_xcit_keys(state)
        wrapper = {**{f"backbone.{k}": v for k, v in state.items()}, **{f"head.{k}": v for k, v in head.state_dict().items()}}
        prefix = "module." if name == "student" or ddp_teacher else ""
        networks[name] = ({f"{prefix}{k}": v for k, v in wrapper.items()}, backbone, head)
    args = argparse.Namespace(arch=dino_arch, patch_size=16, out_dim=K, norm_last_layer=True, use_bn_in_head=False,
                              global_crops_scale=(0.4, 1.0), local_crops_number=8, lr=0.0005, output_dir=".")
    torch.save({"student": networks["student"][0], "teacher": networks["teacher"][0], "optimizer": {}, "epoch": 7,
                "args": args, "dino_loss": {"center": torch.zeros(1, K)}}, path)
    _, backbone, head = networks["teacher"]
    return backbone.eval(), head.eval()


@pytest.mark.parametrize(("arch", "dino_arch", "ddp_teacher"), [("xcit_nano_12_p16_224", "xcit_nano_12_p16", True),
                                                                 ("vit_tiny_patch16_224", "vit_tiny", False)])
def test_a_dino_checkpoint_gives_the_outputs_of_its_teacher(tmp_path: Path, arch: str, dino_arch: str,
                                                            ddp_teacher: bool) -> None:
    path = tmp_path / "checkpoint.pth"
    backbone, head = write_dino_checkpoint(path, arch, dino_arch, ddp_teacher)
    batch = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        features = backbone(batch)
        logits = head(features)
    encoder, scores = encoder_from_spec(f"dino:{path}"), encoder_from_spec(f"dino-head:{path}")
    assert encoder.identity["arch"] == arch and (encoder.input_size, encoder.patch_size) == (224, 16)
    assert (encoder.embed(batch) - features).abs().max() <= 1e-6
    assert (scores.embed(batch) - logits).abs().max() <= 1e-6
    assert encoder.embed(batch, "patch").shape == (3, 196, backbone.num_features)


def test_a_checkpoint_converts_to_a_bony_export_and_a_bare_backbone_is_recognised(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pth"
    backbone, head = write_dino_checkpoint(path, "xcit_nano_12_p16_224", "xcit_nano_12_p16", True, seed=3)
    assert main(["import-dino", str(path), "--out", str(tmp_path / "run")]) == 0
    batch = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = head(backbone(batch))
    assert (encoder_from_spec(f"bony-head:{tmp_path / 'run'}").embed(batch) - expected).abs().max() <= 1e-6
    # a released dino_*_pretrain.pth: the backbone's state dict alone, no args: the architecture from the shapes
    bare = tmp_path / "dino_xcit_pretrain.pth"
    torch.save(official_xcit_keys(backbone.state_dict()), bare)
    encoder = encoder_from_spec(f"dino:{bare}")
    assert encoder.identity["arch"] == "xcit_nano_12_p16_224"
    with torch.no_grad():
        assert (encoder.embed(batch) - backbone(batch)).abs().max() <= 1e-6
    with pytest.raises(BonyError, match="no DINO head"):
        encoder_from_spec(f"dino-head:{bare}")


class Payload:
    """Any class: unpickling it would run code a checkpoint chose."""


def test_a_checkpoint_that_unpickles_objects_or_does_not_fit_is_refused_in_one_line(tmp_path: Path) -> None:
    hostile = tmp_path / "hostile.pth"
    torch.save({"teacher": {"backbone.cls_token": torch.zeros(1, 1, 8)}, "args": Payload()}, hostile)
    with pytest.raises(BonyError, match="hostile.pth: not readable as a DINO checkpoint"):
        encoder_from_spec(f"dino:{hostile}")
    path = tmp_path / "checkpoint.pth"
    write_dino_checkpoint(path, "vit_tiny_patch16_224", "vit_small", False)  # args say ViT-S, weights are ViT-Ti
    with pytest.raises(BonyError, match=r"checkpoint.pth: weights do not fit vit_small_patch16_224 \(.*size mismatch"):
        encoder_from_spec(f"dino:{path}")
    with pytest.raises(BonyError, match="missing.pth: no such file"):
        encoder_from_spec(f"dino:{tmp_path / 'missing.pth'}")
