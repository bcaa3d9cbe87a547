"""Config resolution: defaults < YAML file < key=value overrides, with errors that name the culprit."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from bonylib.config import describe, help_text, load_config, option, save_config, section
from bonylib.errors import ConfigError


@dataclass
class Inner:
    size: int = option(3, "a size")
    ratio: float = option(0.5, "a ratio")
    names: list[str] = option(["a"], "some names")


@dataclass
class Outer:
    seed: int = option(0, "the seed")
    path: str = option("default.parquet", "a path")
    inner: Inner = section(Inner, "a group")

    def __post_init__(self) -> None:
        if self.seed < 0:
            raise ConfigError(f"seed must be >= 0, got {self.seed}")


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def test_defaults_then_file_then_overrides(tmp_path: Path) -> None:
    path = write(tmp_path, "seed: 5\ninner:\n  size: 7\n  names: [x, y]\n")
    cfg = load_config(Outer, path, ["inner.size=9", "inner.ratio=0.25"])
    assert cfg == Outer(seed=5, inner=Inner(size=9, ratio=0.25, names=["x", "y"]))
    assert load_config(Outer) == Outer()


def test_empty_override_clears_a_text_option_and_reads_null_elsewhere() -> None:
    assert load_config(Outer, None, ["path="]).path == ""
    with pytest.raises(ConfigError, match="seed"):
        load_config(Outer, None, ["seed="])  # null for an int: refused, as before


def test_saved_config_reloads_to_the_same_object(tmp_path: Path) -> None:
    cfg = load_config(Outer, None, ["seed=3", "inner.names=[p,q]"])
    save_config(cfg, tmp_path / "run" / "config.yaml")
    assert load_config(Outer, tmp_path / "run" / "config.yaml") == cfg


def test_unknown_key_in_file_names_file_and_key(tmp_path: Path) -> None:
    path = write(tmp_path, "inner:\n  sise: 7\n")
    with pytest.raises(ConfigError) as err:
        load_config(Outer, path)
    message = str(err.value)
    assert str(path) in message and "inner.sise" in message and "inner.size" in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("inner.size=big", "inner.size"),
        ("nope=1", "unknown key 'nope'"),
        ("inner.size", "expected key=value"),
        ("=3", "expected key=value"),
        ("seed=-1", "seed must be >= 0"),
    ],
)
def test_bad_override_is_one_clear_line(override: str, expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(Outer, None, [override])
    assert expected in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("seed: [1, 2\n", "not valid YAML"), ("- 1\n- 2\n", "must be a mapping")],
)
def test_bad_file_names_the_file(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=expected) as err:
        load_config(Outer, path)
    assert str(path) in str(err.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(Outer, tmp_path / "absent.yaml")


def test_describe_lists_every_leaf_with_help() -> None:
    assert [(k, d, h) for k, d, h in describe(Outer)] == [
        ("seed", 0, "the seed"),
        ("path", "default.parquet", "a path"),
        ("inner.size", 3, "a size"),
        ("inner.ratio", 0.5, "a ratio"),
        ("inner.names", ["a"], "some names"),
    ]
    text = help_text(Outer)
    assert all(key in text for key in ("seed=0", "inner.size=3", "a ratio"))


def test_list_defaults_are_not_shared() -> None:
    a, b = Inner(), Inner()
    a.names.append("z")
    assert b.names == ["a"]
