"""Shared fixtures: the repository root, the smoke datasets (written once), the real sample scans."""

from __future__ import annotations

from pathlib import Path

import pytest

from bonylib.config import load_config
from bonylib.data.synthetic import SynthConfig, synthesize
from bonylib.data.samples import shared_data_dir

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def smoke_config() -> SynthConfig:
    return load_config(SynthConfig, REPO / "configs" / "synth" / "smoke.yaml")


@pytest.fixture(scope="session")
def smoke_data(tmp_path_factory: pytest.TempPathFactory, smoke_config: SynthConfig) -> Path:
    """All three synthetic datasets at smoke size, written once per test session."""
    root = tmp_path_factory.mktemp("synth")
    synthesize("all", root, smoke_config)
    return root


@pytest.fixture(scope="session")
def shared_data() -> Path:
    folder = shared_data_dir()
    if folder is None:
        pytest.skip("../shared/data (real sample scans) is not present")
    return folder
