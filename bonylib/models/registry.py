"""Encoders by reference: the one way a text (``--encoder``, an evaluation entry, ``bony attention EXPORT``)
becomes an :class:`~bonylib.models.encoders.Encoder`.

A *spec* is ``<kind>:<fields>``, e.g. ``random:xcit_nano_12_p16_224:0``, ``bony:runs/demo/pretrain`` or
``timm:vit_small_patch16_224:weights.safetensors``. Each kind (:data:`ENCODER_KINDS`) names its builder in
:mod:`bonylib.models.loaders`, the form users write, how many ``:``-separated fields come before its local
path, if it has one, and how its fields become the builder's arguments. A path is everything after those
fields, so a path that contains ``:`` stays whole (``bony:exp:colon`` is the folder ``exp:colon``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bonylib.errors import ConfigError
from bonylib.models.encoders import Encoder


@dataclass(frozen=True)
class EncoderKind:
    """One ``kind:`` of spec: its builder, ``module.function`` in :mod:`bonylib.models.loaders` or
    :mod:`bonylib.models.dino_checkpoints` (imported only when an encoder is built: weight readers, scikit-image and
    kymatio are slow to import), the form users write, the fields before its path (``None``: no path), and the
    arguments its fields give the builder."""

    builder: str
    form: str
    path_after: int | None
    arguments: Callable[[list[str]], tuple[Any, ...]]


def _arch_and_seed(fields: list[str]) -> tuple[Any, ...]:
    arch, _, seed = ":".join(fields).rpartition(":")
    if not arch or not seed.lstrip("-").isdigit():
        raise ValueError("expected <timm architecture>:<integer seed>")
    return arch, int(seed)


def _nothing(fields: list[str]) -> tuple[Any, ...]:
    if fields != [""]:
        raise ValueError("takes nothing after the kind")
    return ()


def _path(fields: list[str]) -> tuple[Any, ...]:
    return (Path(fields[0]),)


def _head(fields: list[str]) -> tuple[Any, ...]:
    return Path(fields[0]), "head"


def _name_and_path(fields: list[str]) -> tuple[Any, ...]:
    return fields[0], Path(fields[1])


def _path_and_name(fields: list[str]) -> tuple[Any, ...]:
    return Path(fields[1]), fields[0]


ENCODER_KINDS: dict[str, EncoderKind] = {
    "random": EncoderKind("loaders.random_init", "random:<arch>:<seed>", None, _arch_and_seed),
    "bony": EncoderKind("loaders.from_export", "bony:<run folder>", 0, _path),
    "bony-head": EncoderKind("loaders.from_export", "bony-head:<run folder> (the DINO head's output)", 0, _head),
    "timm": EncoderKind("loaders.from_timm", "timm:<timm model name>:<weights file>", 1, _name_and_path),
    "hibou": EncoderKind("loaders.hibou", "hibou:<Hugging Face folder of Hibou-B>", 0, _path),
    "histoencoder": EncoderKind("loaders.histoencoder", "histoencoder:<prostate_small|prostate_medium>:<.pth file>", 1,
                                _path_and_name),
    "dino": EncoderKind("dino_checkpoints.dino_encoder", "dino:<facebookresearch/dino checkpoint.pth> (its teacher)", 0,
                        _path),
    "dino-head": EncoderKind("dino_checkpoints.dino_encoder", "dino-head:<DINO checkpoint.pth> (its teacher's head output)",
                             0, _head),
    "handcrafted": EncoderKind("loaders.handcrafted", "handcrafted", None, _nothing),
    "scattering": EncoderKind("loaders.scattering", "scattering", None, _nothing),
}
"""The spec kinds; a loader added to :mod:`bonylib.models.loaders` needs one line here."""


def spec_forms() -> str:
    """Every spec form, for help texts and errors."""
    return ", ".join(kind.form for kind in ENCODER_KINDS.values())


def _fields(spec: str) -> tuple[str, EncoderKind, list[str]]:
    """The kind of ``spec`` and its fields: the leading ones, then the path whole (``:`` included)."""
    name, _, rest = spec.partition(":")
    if name not in ENCODER_KINDS:
        raise ConfigError(f"--encoder '{spec}': unknown kind '{name}' (expected one of: {spec_forms()})")
    kind = ENCODER_KINDS[name]
    if kind.path_after is None:
        return name, kind, [rest]
    parts = rest.split(":", kind.path_after)
    if len(parts) != kind.path_after + 1 or not all(parts):
        wanted = "<name>:<local weights file>" if kind.path_after else "a local path"
        raise ConfigError(f"--encoder '{spec}': expected {wanted} ({kind.form})")
    return name, kind, parts


def encoder_from_spec(spec: str) -> Encoder:
    """The :class:`Encoder` a spec names, e.g. ``random:xcit_nano_12_p16_224:0`` or ``bony:runs/demo/pretrain``."""
    _, kind, fields = _fields(spec)
    try:
        arguments = kind.arguments(fields)
    except ValueError as exc:
        raise ConfigError(f"--encoder '{spec}': {exc} ({kind.form})") from None
    from bonylib.models import dino_checkpoints, loaders

    module_name, _, function = kind.builder.rpartition(".")
    module = {"loaders": loaders, "dino_checkpoints": dino_checkpoints}[module_name]
    return getattr(module, function)(*arguments)


def load_encoder(reference: str) -> Encoder:
    """A spec, or a pretraining run folder (``bony attention``'s EXPORT), which means ``bony:<folder>``."""
    if reference.partition(":")[0] in ENCODER_KINDS:
        return encoder_from_spec(reference)
    return encoder_from_spec(f"bony:{reference}")


def rooted_spec(spec: str, root: Path) -> str:
    """``spec`` with its path, if it names one, taken relative to ``root`` (absolute paths stay as they are)."""
    name, kind, fields = _fields(spec)
    if kind.path_after is None:
        return spec
    return ":".join([name, *fields[:-1], str(Path(root) / fields[-1])])
