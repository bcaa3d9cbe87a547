"""The ``bony`` command as a user meets it: help for every option, one-line errors, exit codes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bonylib.cli import build_parser
from bonylib.config import describe
from bonylib.data.synthetic import SynthConfig
from bonylib.evaluation.embeddings import EmbedConfig
from bonylib.report import ReportConfig


def bony(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bonylib", *args], capture_output=True, text=True, cwd=cwd)


def test_top_level_help_lists_subcommands() -> None:
    result = bony("--help")
    assert result.returncode == 0
    for name in ("synth", "report"):
        assert name in result.stdout


@pytest.mark.parametrize(("command", "schema"), [("synth", SynthConfig), ("report", ReportConfig),
                                               ("embed", EmbedConfig)])
def test_subcommand_help_explains_every_option(command: str, schema: type) -> None:
    result = bony(command, "--help")
    assert result.returncode == 0
    for key, _, text in describe(schema):
        assert f"{key}=" in result.stdout and text.split()[0] in result.stdout, key
    sub = build_parser()._subparsers._group_actions[0].choices[command]  # type: ignore[union-attr]
    for action in sub._actions:
        assert action.help, f"option {action.dest} of {command} has no help"


def one_line_error(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_unknown_dataset(tmp_path: Path) -> None:
    one_line_error(bony("synth", "camelyon", str(tmp_path / "x")), "camelyon", "panda")


def test_unwritable_output_folder(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    one_line_error(bony("synth", "panda", str(blocker / "out")), str(blocker / "out"))


def test_bad_config_key(tmp_path: Path) -> None:
    one_line_error(bony("synth", "panda", str(tmp_path / "x"), "panda.slidez=3"), "panda.slidez")
    bad = tmp_path / "bad.yaml"
    bad.write_text("panda:\n  slides: many\n")
    one_line_error(bony("synth", "panda", str(tmp_path / "x"), "--config", str(bad)), str(bad), "panda.slides")


def test_missing_arguments_is_one_line() -> None:
    result = bony("synth")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_synth_prints_folders(tmp_path: Path, repo: Path) -> None:
    result = bony("synth", "deepgleason", str(tmp_path / "dg"), "--config", str(repo / "configs/synth/smoke.yaml"),
                  "deepgleason.slides=1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(tmp_path / "dg")
    assert (tmp_path / "dg" / "tiles.csv").is_file()
    assert "deepgleason:\n  slides: 1\n" in (tmp_path / "dg" / "config.yaml").read_text()
