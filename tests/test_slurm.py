"""The cluster's files: sbatch scripts that bash accepts, the container that installs the lock, and the
batch shell's signal forwarding run for real (a fake `srun` standing in for the job step).

The scheduler itself is exercised by `make slurm-check` (slurm/check.sh), on a one-node SLURM."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import time
from pathlib import Path

import pytest


def test_sbatch_scripts_parse_and_submit_from_the_repository_root(repo: Path) -> None:
    scripts = sorted((repo / "slurm").glob("*.sbatch"))
    assert {p.name for p in scripts} >= {"pretrain.sbatch", "tile_array.sbatch", "notebook.sbatch", "report.sbatch"}
    for script in [*scripts, repo / "slurm" / "common.sh", repo / "slurm" / "check.sh"]:
        subprocess.run(["bash", "-n", str(script)], check=True)
    for script in scripts:
        text = script.read_text()
        assert text.startswith("#!/bin/bash\n") and "set -euo pipefail" in text, script.name
        assert 'source "$SLURM_SUBMIT_DIR/slurm/common.sh"' in text, f"{script.name}: the image option"
        assert not re.search(r"^\s*bony ", text, re.M), f"{script.name}: `python -m bonylib` runs inside the image too"


def test_the_container_installs_exactly_the_lock(repo: Path) -> None:
    definition = (repo / "slurm" / "bony.def").read_text()
    assert re.search(r"^From: python:3\.11[-\w.]*$", definition, re.M), "the Python of the Makefile and environment.yml"
    files = re.search(r"^%files\n((?:[ \t]+.*\n)+)", definition, re.M)
    assert files and files[1].split() == ["requirements.lock", "/opt/bony/requirements.lock"]
    installs = [line.strip() for line in definition.splitlines() if "install" in line and not line.startswith("#")]
    assert installs == ["python -m pip install --no-cache-dir --upgrade pip",
                        "python -m pip install --no-cache-dir -r /opt/bony/requirements.lock"], "nothing besides the lock"


def _batch_shell(tmp_path: Path, step: str, ready: Path | None = None) -> subprocess.Popen:
    """A batch script that runs ``step`` through bony_step, as pretrain.sbatch runs srun."""
    script = tmp_path / "job.sh"
    option = f"--ready {ready} " if ready else ""
    script.write_text(f"""#!/bin/bash
set -euo pipefail
source "$SLURM_SUBMIT_DIR/slurm/common.sh"
bony_step {option}bash -c {shlex.quote(step)}
echo "step status $status"
""")
    env = {**os.environ, "SLURM_SUBMIT_DIR": str(Path(__file__).resolve().parents[1])}
    env.pop("BONY_IMAGE", None)
    return subprocess.Popen(["bash", str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def _wait_for(path: Path) -> None:
    deadline = time.monotonic() + 30
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_the_batch_shell_survives_the_warning_and_passes_it_to_the_step(tmp_path: Path, sig: signal.Signals) -> None:
    started = tmp_path / "started"
    step = f"trap 'echo got TERM; exit 143' TERM; trap 'echo got USR1; exit 143' USR1; touch {started}; while true; do sleep 0.1; done"
    process = _batch_shell(tmp_path, step)
    _wait_for(started)
    process.send_signal(sig)
    out, _ = process.communicate(timeout=30)
    assert process.returncode == 0, out
    assert f"{sig.name[3:]}: passing it to the job step" in out
    assert f"got {sig.name[3:]}" in out and "step status 143" in out, out


def test_a_warning_before_the_run_is_ready_waits_for_it(tmp_path: Path) -> None:
    """SLURM may warn in a job's first seconds: the signal is held until the run says it has started."""
    started, ready = tmp_path / "started", tmp_path / "runtime.json"
    ready.write_text("{}")  # left by an earlier attempt: not this step's
    time.sleep(0.05)
    step = (f"trap 'echo got USR1 $(test -e {ready}.now && echo after || echo before) ready; exit 143' USR1; "
            f"touch {started}; sleep 3; touch {ready} {ready}.now; while true; do sleep 0.1; done")
    process = _batch_shell(tmp_path, step, ready=ready)
    _wait_for(started)
    process.send_signal(signal.SIGUSR1)
    out, _ = process.communicate(timeout=30)
    assert "got USR1 after ready" in out and "step status 143" in out, out


def test_a_failing_step_keeps_its_status(tmp_path: Path) -> None:
    process = _batch_shell(tmp_path, "exit 7")
    out, _ = process.communicate(timeout=30)
    assert "step status 7" in out
