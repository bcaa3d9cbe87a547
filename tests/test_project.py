"""Project hygiene that CI must keep: pins agree everywhere, notebooks are committed clean."""

from __future__ import annotations

import ast
import importlib
import json
import re
import subprocess
import tomllib
import types
from pathlib import Path

import yaml


def pins_of(lines: list[str]) -> dict[str, str]:
    pins = {}
    for line in lines:
        match = re.fullmatch(r"\s*([A-Za-z0-9_.\-]+)==([^\s;#]+)\s*", line)
        if match:
            pins[match[1].lower().replace("_", "-")] = match[2]
    return pins


def test_pins_agree_across_pyproject_lock_and_environment_yml(repo: Path) -> None:
    project = tomllib.loads((repo / "pyproject.toml").read_text())["project"]
    declared = pins_of(project["dependencies"] + project["optional-dependencies"]["test"])
    assert len(declared) == len(project["dependencies"]) + len(project["optional-dependencies"]["test"]), "all pinned with =="
    locked = pins_of((repo / "requirements.lock").read_text().splitlines())
    env = yaml.safe_load((repo / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    conda_pins = pins_of(pip_section)
    for name, version in declared.items():
        assert locked.get(name) == version, f"requirements.lock has {name}=={locked.get(name)}, pyproject {version}"
        assert conda_pins.get(name) == version, f"environment.yml has {name}=={conda_pins.get(name)}, pyproject {version}"
    assert "python=3.11" in env["dependencies"]


def tracked(repo: Path, pattern: str) -> list[Path]:
    out = subprocess.run(["git", "ls-files", pattern], cwd=repo, capture_output=True, text=True, check=True).stdout
    return [repo / line for line in out.splitlines()]


def test_notebooks_are_committed_without_outputs(repo: Path) -> None:
    notebooks = sorted((repo / "notebooks").glob("*.ipynb"))
    assert notebooks
    for path in notebooks:
        nb = json.loads(path.read_text())
        for cell in nb["cells"]:
            if cell["cell_type"] == "code":
                assert not cell["outputs"] and cell["execution_count"] is None, f"{path.name} has outputs"
        tags = [c.get("metadata", {}).get("tags", []) for c in nb["cells"]]
        assert sum("parameters" in t for t in tags) == 1, f"{path.name} needs exactly one 'parameters' cell"


def test_every_numbered_notebook_is_in_the_book(repo: Path) -> None:
    toc = (repo / "_toc.yml").read_text()
    for path in sorted((repo / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        assert f"book/executed/{path.stem}" in toc, f"{path.name} is not in _toc.yml"


def test_every_chapter_lists_its_run_files(repo: Path) -> None:
    """A chapter missing from notebooks/run_files.yaml runs at every report (a misspelt name would, silently)."""
    listed = yaml.safe_load((repo / "notebooks" / "run_files.yaml").read_text())
    assert set(listed) == {p.stem for p in (repo / "notebooks").glob("[0-9][0-9]_*.ipynb")}


def test_every_bonylib_name_a_notebook_uses_exists(repo: Path) -> None:
    """Each ``from bonylib... import name`` of a chapter imports, and each ``module.attribute`` it reads from a
    bonylib module it imported exists: a chapter that the smoke report skips (the real-tissue chapter without
    ../shared/data) would otherwise meet a moved function only in `make report`."""
    problems = []
    for path in sorted((repo / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        source = "\n".join("".join(c["source"]) for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code")
        tree = ast.parse("\n".join(line for line in source.splitlines() if not line.lstrip().startswith("%")))
        modules = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("bonylib"):
                for alias in node.names:
                    parent = importlib.import_module(node.module)
                    if hasattr(parent, alias.name):
                        value = getattr(parent, alias.name)
                    else:
                        try:
                            value = importlib.import_module(f"{node.module}.{alias.name}")
                        except ImportError:
                            problems.append(f"{path.name}: {node.module} has no {alias.name}")
                            continue
                    if isinstance(value, types.ModuleType):
                        modules[alias.asname or alias.name] = value
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules:
                if not hasattr(modules[node.value.id], node.attr):
                    problems.append(f"{path.name}: {modules[node.value.id].__name__} has no {node.attr}")
    assert not problems, problems
