"""The package's layers as DESIGN.md draws them, enforced: import-linter's contracts (``pyproject.toml``) over every
import statement, those inside functions included, and what importing the trainer loads."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import grimp


def test_import_contracts_are_kept(repo: Path) -> None:
    """Layers (compose > stages > models > plotting > data > base), the three stages independent, plotting reading
    no data: ``lint-imports`` exits 0, and its report says why when it does not."""
    lint = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(lint), "--no-cache"], cwd=repo, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


def test_the_contract_counts_imports_inside_functions() -> None:
    """The graph the contracts run on has the imports that modules make inside functions (a lazy import that
    closed a cycle would otherwise go unseen)."""
    graph = grimp.build_graph("bonylib", cache_dir=None)
    details = graph.get_import_details(importer="bonylib.models.registry", imported="bonylib.models.loaders")
    assert details, "registry imports its loaders inside encoder_from_spec"


def test_no_cycles_between_subpackages() -> None:
    graph = grimp.build_graph("bonylib", cache_dir=None)
    children = sorted(graph.find_children("bonylib"))
    cycles = [(a, b) for a in children for b in children
              if a < b and graph.chain_exists(importer=a, imported=b, as_packages=True)
              and graph.chain_exists(importer=b, imported=a, as_packages=True)]
    assert cycles == []


def test_importing_the_trainer_loads_no_evaluation_attention_or_tiling() -> None:
    code = ("import json, sys; import bonylib.ssl.trainer; "
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith('bonylib'))))")
    loaded = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert not [m for m in loaded if m.startswith(("bonylib.evaluation", "bonylib.attention", "bonylib.data.tiling",
                                                    "bonylib.compose"))], loaded


def test_figures_are_drawn_in_plotting_only(repo: Path) -> None:
    """One home for drawing: only bonylib/plotting.py imports matplotlib's pyplot; the stages and the chapters prepare
    arrays and tables and call its primitives."""
    drawing = sorted(str(path.relative_to(repo)) for path in (repo / "bonylib").rglob("*.py")
                     if "matplotlib.pyplot" in path.read_text() or "from matplotlib import pyplot" in path.read_text())
    assert drawing == ["bonylib/plotting.py"]
