"""The exported encoder: teacher backbone weights (safetensors) and the JSON that says how to use them.

The JSON carries the SHA-256 of the weights file: an export is verified before it is used, so a
damaged copy fails with a line naming it instead of giving wrong features.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from bonylib.errors import BonyError
from bonylib.files import atomic_path, sha256_file
from bonylib.models.backbones import create_backbone

FORMAT = "bony-dino-teacher-1"


def export_encoder(backbone: nn.Module, name: str, input_size: int, mean: list[float], std: list[float],
                   out: Path, step: int) -> Path:
    """Write ``teacher_backbone.safetensors`` and ``teacher_backbone.json`` into ``out``."""
    weights = {k: v.detach().cpu().contiguous() for k, v in backbone.state_dict().items()}
    with atomic_path(out / "teacher_backbone.safetensors") as tmp:
        save_file(weights, str(tmp))
        checksum = sha256_file(tmp)
    meta = {"backbone": name, "embed_dim": int(backbone.num_features), "input_size": input_size,
            "mean": list(mean), "std": list(std), "step": step, "format": FORMAT, "sha256": checksum}
    with atomic_path(out / "teacher_backbone.json") as tmp:
        tmp.write_text(json.dumps(meta, indent=2) + "\n")
    return out / "teacher_backbone.safetensors"


def load_encoder(run: Path) -> tuple[nn.Module, dict[str, Any]]:
    """The exported backbone of a pretraining run folder (eval mode) and its metadata."""
    run = Path(run)
    meta_path, weights_path = run / "teacher_backbone.json", run / "teacher_backbone.safetensors"
    if not meta_path.is_file() or not weights_path.is_file():
        raise BonyError(f"{run}: no exported encoder (teacher_backbone.json/.safetensors); run bony pretrain first")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BonyError(f"{meta_path}: not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise BonyError(f"{meta_path}: unknown format {found!r} (expected {FORMAT})")
    missing = [key for key in ("backbone", "input_size", "mean", "std") if key not in meta]
    if missing:
        raise BonyError(f"{meta_path}: incomplete export metadata (no {', '.join(missing)})")
    if "sha256" in meta and sha256_file(weights_path) != meta["sha256"]:
        raise BonyError(f"{weights_path}: its bytes do not match the sha256 in {meta_path.name} (damaged or replaced "
                        f"after export); export again or restore the file")
    backbone = create_backbone(meta["backbone"])
    try:
        backbone.load_state_dict(load_file(str(weights_path)))
    except (RuntimeError, OSError, SafetensorError) as exc:
        raise BonyError(f"{weights_path}: weights do not fit {meta['backbone']} ({str(exc).splitlines()[0]})") from None
    return backbone.eval(), meta
