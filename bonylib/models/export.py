"""The exported encoder: teacher backbone and DINO head weights (safetensors) and the JSON that says how to use them.

The JSON carries the SHA-256 of each weights file: an export is verified before it is used, so a
damaged copy fails with a line naming it instead of giving wrong features. The head is exported
beside the backbone because the seed's decoders read the head's output (``out_dim`` prototypes),
not the backbone's pooled feature; exports written before heads were exported have no ``head``
entry and still load for their backbone.

The backbone file is a plain timm state dict, so timm alone loads it (see the README). A backbone
trained behind a wavelet stem (``model.stem``) is recorded with its ``stem``: its file is the timm
model built for the stem's output (:func:`bonylib.models.backbones.create_backbone` with that stem), and
the stem runs before it; exports without a ``stem`` entry have none.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from bonylib.errors import BonyError, one_line
from bonylib.files import atomic_path, read_json, sha256_file, write_text_atomic
from bonylib.models.backbones import BACKBONES, backbone_stem, create_backbone, timm_model
from bonylib.models.encoders import INPUT_SIZES
from bonylib.models.head import DINOHead
from bonylib.models.stems import STEMS
from bonylib.memory import check_fits

FORMAT = "bony-dino-teacher-1"
BACKBONE_FILE = "teacher_backbone.safetensors"
HEAD_FILE = "teacher_head.safetensors"
META_FILE = "teacher_backbone.json"
HEAD_LIMITS = {"in_dim": 16384, "out_dim": 1 << 20, "hidden_dim": 65536, "bottleneck_dim": 65536, "layers": 16}
"""Upper bounds of a DINO head's dimensions (DINO: 65,536 prototypes, 2048 hidden, 256 bottleneck, 3 layers):
the head is allocated from these numbers before any weight is read."""
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def _save_weights(module: nn.Module, dest: Path) -> str:
    """Write ``module``'s state dict to ``dest`` atomically; return the file's SHA-256."""
    weights = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    with atomic_path(dest) as tmp:
        save_file(weights, str(tmp))
        return sha256_file(tmp)


def head_dims(head: DINOHead) -> dict[str, int]:
    """The constructor arguments that rebuild ``head`` (read off its layers, so they cannot disagree with it)."""
    linears = [m for m in head.mlp if isinstance(m, nn.Linear)]
    return {"in_dim": linears[0].in_features, "out_dim": head.last_layer.out_features,
            "hidden_dim": linears[0].out_features if len(linears) > 1 else linears[-1].out_features,
            "bottleneck_dim": linears[-1].out_features, "layers": len(linears)}


def export_encoder(backbone: nn.Module, head: DINOHead | None, name: str, input_size: int, mean: Sequence[float],
                   std: Sequence[float], out: Path, step: int | None) -> Path:
    """Write the teacher's backbone and head weights and ``teacher_backbone.json`` into ``out``; without a head (a
    converted bare backbone) the JSON has no ``head`` entry, as exports written before heads were exported.

    The JSON is written last: a run killed mid-export leaves the previous export's JSON, whose
    checksums then refuse the half-replaced weights instead of silently mixing two steps.
    """
    backbone_sha = _save_weights(timm_model(backbone), out / BACKBONE_FILE)
    meta: dict[str, Any] = {"backbone": name, "stem": backbone_stem(backbone), "embed_dim": int(backbone.num_features),
                            "input_size": input_size, "mean": list(mean), "std": list(std), "step": step,
                            "format": FORMAT, "sha256": backbone_sha}
    if head is not None:
        meta["head"] = {**head_dims(head), "sha256": _save_weights(head, out / HEAD_FILE)}
    write_text_atomic(out / META_FILE, json.dumps(meta, indent=2) + "\n")
    return out / BACKBONE_FILE


def _integer(value: Any, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _triple(value: Any, positive: bool) -> bool:
    return (isinstance(value, list) and len(value) == 3
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
            and (not positive or all(v > 0 for v in value)))


def _meta_problem(meta: dict[str, Any]) -> str:
    """What is wrong with an export's metadata (types and ranges), or "": every number the loaders use to allocate
    or feed a network is checked here, once, before a module is built from it."""
    if meta.get("backbone") not in BACKBONES:
        return f"backbone {meta.get('backbone')!r} is not one Bony builds ({', '.join(BACKBONES)})"
    if meta.get("stem", "none") not in STEMS:
        return f"stem {meta.get('stem')!r} is not one of {', '.join(STEMS)}"
    if not _integer(meta.get("input_size"), *INPUT_SIZES):
        return f"input_size {meta.get('input_size')!r} is not a whole number of pixels in {INPUT_SIZES[0]}..{INPUT_SIZES[1]}"
    if not _triple(meta.get("mean"), positive=False):
        return f"mean {meta.get('mean')!r} is not 3 finite numbers (one per RGB channel)"
    if not _triple(meta.get("std"), positive=True):
        return f"std {meta.get('std')!r} is not 3 positive finite numbers (one per RGB channel)"
    if "sha256" in meta and not (isinstance(meta["sha256"], str) and _SHA256.match(meta["sha256"])):
        return f"sha256 {meta['sha256']!r} is not a SHA-256 (64 hexadecimal digits)"
    if meta.get("step") is not None and not _integer(meta["step"], 0, 2**63 - 1):
        return f"step {meta['step']!r} is not a training step"
    head = meta.get("head")
    if head is not None:
        if not isinstance(head, dict):
            return f"head is a {type(head).__name__}, not the head's dimensions"
        for key, high in HEAD_LIMITS.items():
            if not _integer(head.get(key), 1, high):
                return f"head {key} {head.get(key)!r} is not a whole number in 1..{high}"
        if "sha256" in head and not (isinstance(head["sha256"], str) and _SHA256.match(head["sha256"])):
            return f"head sha256 {head['sha256']!r} is not a SHA-256 (64 hexadecimal digits)"
    return ""


def head_bytes(dims: dict[str, int]) -> int:
    """float32 bytes of a DINO head of these dimensions (its MLP and its prototypes)."""
    widths = [dims["in_dim"]] + [dims["hidden_dim"]] * (dims["layers"] - 1) + [dims["bottleneck_dim"]]
    weights = sum(a * b + b for a, b in zip(widths, widths[1:])) + dims["bottleneck_dim"] * dims["out_dim"]
    return 4 * weights


def read_export_meta(run: Path) -> dict[str, Any]:
    """The checked metadata of the export in ``run``, without loading weights: the format, then the type and range of
    every value a loader uses (the input size, 3 positive stds, head dimensions bounded, the head's size by what this
    machine can hold). The JSON is input like any file: a damaged or edited one is refused in one line naming it."""
    run = Path(run)
    meta_path, weights_path = run / META_FILE, run / BACKBONE_FILE
    if not meta_path.is_file() or not weights_path.is_file():
        raise BonyError(f"{run}: no exported encoder ({META_FILE} and {BACKBONE_FILE}); run bony pretrain first")
    meta = read_json(meta_path)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise BonyError(f"{meta_path}: unknown format {found!r} (expected {FORMAT})")
    missing = [key for key in ("backbone", "input_size", "mean", "std") if key not in meta]
    if missing:
        raise BonyError(f"{meta_path}: incomplete export metadata (no {', '.join(missing)})")
    problem = _meta_problem(meta)
    if problem:
        raise BonyError(f"{meta_path}: {one_line(problem, 300)}; export again (bony pretrain, bony import-dino)")
    if meta.get("head") is not None:
        check_fits(head_bytes(meta["head"]), f"{meta_path}: a DINO head of {meta['head']['out_dim']} prototypes")
    return meta


def _load_verified(module: nn.Module, path: Path, expected_sha: str | None, what: str) -> str:
    """Load ``path`` into ``module`` after checking its bytes against ``expected_sha``; return the file's SHA-256.

    The hash is returned even when the metadata has none (exports written before checksums), because
    the embedding store keys features on it.
    """
    checksum = sha256_file(path)
    if expected_sha is not None and checksum != expected_sha:
        raise BonyError(f"{path}: its bytes do not match the sha256 in {META_FILE} (damaged or replaced "
                        f"after export); export again or restore the file")
    try:
        module.load_state_dict(load_file(str(path)))
    except (RuntimeError, OSError, SafetensorError) as exc:
        raise BonyError(f"{path}: weights do not fit {what} ({one_line(exc)})") from None
    return checksum


def load_backbone(run: Path) -> tuple[nn.Module, dict[str, Any]]:
    """The exported backbone of a pretraining run folder (eval mode, behind its stem if it was trained with
    one) and its metadata, whose ``sha256`` is the weights file's (computed when an old export did not record
    it) and whose ``stem`` is ``none`` for exports written before stems were recorded."""
    meta = read_export_meta(run)
    meta.setdefault("stem", "none")
    backbone = create_backbone(meta["backbone"], stem=meta["stem"])
    meta["sha256"] = _load_verified(timm_model(backbone), Path(run) / BACKBONE_FILE, meta.get("sha256"),
                                    meta["backbone"])
    return backbone.eval(), meta


def load_head(run: Path) -> tuple[DINOHead, str]:
    """The exported DINO head of ``run`` (eval mode) and its weights' SHA-256."""
    head_meta, head_path = read_export_meta(run).get("head"), Path(run) / HEAD_FILE
    if not isinstance(head_meta, dict):
        raise BonyError(f"{Path(run) / META_FILE}: this export has no DINO head (written before heads were exported); "
                        f"use the backbone output, or export again from the run's checkpoint with a current bony")
    if not head_path.is_file():
        raise BonyError(f"{head_path}: missing (the export's JSON lists a DINO head); restore the file or export again")
    head = DINOHead(head_meta["in_dim"], head_meta["out_dim"], head_meta["hidden_dim"], head_meta["bottleneck_dim"],
                    layers=head_meta["layers"])
    checksum = _load_verified(head, head_path, head_meta.get("sha256"), f"a DINO head {head_meta}")
    return head.eval(), checksum
