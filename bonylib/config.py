"""Experiment configuration: typed schemas, YAML files and ``key=value`` overrides.

Every stage declares its options once, as a dataclass whose fields carry a ``help`` text. A run
merges, in order, the schema's defaults, an optional YAML file and command-line overrides
(``panda.slides=4``), checks names and types, and saves the resolved result beside its outputs so
the run can be repeated exactly. The same schema produces the CLI help, so what ``--help`` lists
is what a config file may hold.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from bonylib.errors import ConfigError
from bonylib.files import write_text_atomic

T = TypeVar("T")


def option(default: Any, help: str, **kwargs: Any) -> Any:
    """A config field with its help text (shown by ``--help`` and in saved configs)."""
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help}, **kwargs)
    return dataclasses.field(default=default, metadata={"help": help}, **kwargs)


def check_fractions(section: str, cfg: Any, names: Sequence[str]) -> None:
    """Raise :class:`ConfigError` unless each named option of ``cfg`` lies in [0, 1]."""
    for name in names:
        value = getattr(cfg, name)
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"{section}.{name} must be in [0, 1], got {value}")


def section(schema: type, help: str) -> Any:
    """A nested group of options (a sub-dataclass) with its help text."""
    return dataclasses.field(default_factory=schema, metadata={"help": help})


def _first_line(exc: OmegaConfBaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def read_mapping(path: Path) -> dict[str, Any]:
    """The YAML mapping in ``path`` (empty file: empty mapping); a :class:`ConfigError` naming the file otherwise."""
    try:
        loaded = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read config file ({exc})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if loaded is not None and not (isinstance(loaded, dict) and all(isinstance(k, str) for k in loaded)):
        raise ConfigError(f"{path}: a config file must be a mapping of keys to values")
    return loaded or {}


def load_config(schema: type[T], path: Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Resolve a config: ``schema`` defaults, then the YAML at ``path``, then ``overrides``.

    Raises :class:`ConfigError` naming the file or the override and the key at fault.
    """
    base = OmegaConf.structured(schema)
    layers: list[tuple[str, Any]] = []
    if path is not None:
        try:
            layers.append((str(path), OmegaConf.create(read_mapping(Path(path)))))
        except OmegaConfBaseException as exc:  # a YAML value a config cannot hold: a date, a set, binary
            raise ConfigError(f"{path}: {_first_line(exc)}") from None
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override '{item}': expected key=value (for example panda.slides=4)")
        if not value and isinstance(OmegaConf.select(base, key.strip(), default=None), str):
            item = f"{key}=''"  # `key=` clears a text option (knn.manifest= turns monitoring off); others read null
        try:
            layers.append((f"override '{item}'", OmegaConf.from_dotlist([item])))
        except OmegaConfBaseException as exc:
            raise ConfigError(f"override '{item}': {_first_line(exc)}") from None
    cfg = base
    for source, layer in layers:
        try:
            cfg = OmegaConf.merge(cfg, layer)
        except OmegaConfBaseException as exc:
            key = getattr(exc, "full_key", None) or source
            known = ", ".join(k for k, _, _ in describe(schema))
            if isinstance(exc, ConfigKeyError):
                raise ConfigError(f"{source}: unknown key '{key}' (known keys: {known})") from None
            raise ConfigError(f"{source}: bad value for '{key}': {_first_line(exc)}") from None
    try:
        return OmegaConf.to_object(cfg)  # type: ignore[return-value]
    except OmegaConfBaseException as exc:
        raise ConfigError(f"config: {_first_line(exc)}") from None


def to_dict(cfg: Any) -> dict[str, Any]:
    """A resolved config as plain data (for YAML, JSON metadata and notebook parameters)."""
    return dataclasses.asdict(cfg)


def dump_config(cfg: Any) -> str:
    """The resolved config as YAML text."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save_config(cfg: Any, path: Path) -> None:
    """Write the resolved config atomically (beside the outputs it produced)."""
    write_text_atomic(Path(path), dump_config(cfg))


def describe(schema: type, prefix: str = "") -> Iterator[tuple[str, Any, str]]:
    """Yield ``(dotted key, default, help)`` for every leaf option of ``schema``."""
    for field in dataclasses.fields(schema):
        key = f"{prefix}{field.name}"
        if _is_section(field):
            yield from describe(field.default_factory, prefix=f"{key}.")  # type: ignore[arg-type]
            continue
        if field.default is not dataclasses.MISSING:
            default = field.default
        elif field.default_factory is not dataclasses.MISSING:
            default = field.default_factory()
        else:
            default = None
        yield key, default, field.metadata.get("help", "")


def _is_section(field: dataclasses.Field) -> bool:
    factory = field.default_factory
    return factory is not dataclasses.MISSING and dataclasses.is_dataclass(factory)


def flat_keys(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config as ``{dotted key: value}``, the form overrides and refusals name keys in."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, Mapping):
            flat.update(flat_keys(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def help_text(schema: type) -> str:
    """The options of ``schema`` as an indented list for an argparse epilog."""
    lines = ["config keys (set in --config YAML or as key=value overrides):"]
    for key, default, text in describe(schema):
        lines.append(f"  {key}={default!r}\n      {text}")
    return "\n".join(lines)
