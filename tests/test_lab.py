"""``make lab``: JupyterLab started as the target starts it, on a free port, answers, lists the notebooks and offers the
named kernel, then stops."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from bonylib.lab import DISPLAY_NAME, KERNEL_NAME, install_kernel, lab_command


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def get(url: str) -> tuple[int, bytes]:
    """The status and body of a GET (0 when nothing answers)."""
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, b""
    except (urllib.error.URLError, ConnectionError):
        return 0, b""  # not listening yet


@pytest.mark.slow
def test_lab_answers_lists_the_notebooks_and_offers_the_named_kernel(repo: Path, tmp_path: Path) -> None:
    prefix = tmp_path / "env"  # the kernel spec goes where `make lab` puts it (sys.prefix), here a scratch prefix
    spec = json.loads((install_kernel(prefix) / "kernel.json").read_text())
    assert spec["display_name"] == DISPLAY_NAME and spec["env"]["PYDEVD_DISABLE_FILE_VALIDATION"] == "1"
    assert Path(spec["argv"][0]).resolve() == Path(sys.executable).resolve(), "the project's own interpreter"
    port, token = free_port(), "bony-test"
    env = {**os.environ, "JUPYTER_PATH": str(prefix / "share" / "jupyter"), "JUPYTER_CONFIG_DIR": str(tmp_path / "cfg"),
           "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"), "JUPYTERLAB_WORKSPACES_DIR": str(tmp_path / "ws")}
    log = tmp_path / "lab.log"
    with open(log, "wb") as output:
        server = subprocess.Popen(lab_command(repo, port, token, browser=False), env=env, stdout=output,
                                  stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while get(f"{base}/api/status?token={token}")[0] != 200:
            assert server.poll() is None, f"JupyterLab exited: {log.read_text()[-2000:]}"
            assert time.monotonic() < deadline, f"JupyterLab did not answer in 120 s: {log.read_text()[-2000:]}"
            time.sleep(0.5)
        status, body = get(f"{base}/api/contents/notebooks?token={token}")
        listed = {entry["name"] for entry in json.loads(body)["content"]}
        assert status == 200 and {p.name for p in (repo / "notebooks").glob("[0-9][0-9]_*.ipynb")} <= listed
        specs = json.loads(get(f"{base}/api/kernelspecs?token={token}")[1])
        assert specs["default"] == KERNEL_NAME and KERNEL_NAME in specs["kernelspecs"]
        status, page = get(f"{base}/lab/tree/notebooks?token={token}")
        assert status == 200 and b"JupyterLab" in page
        assert get(f"{base}/api/contents/notebooks")[0] == 403, "no access without the token"
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    assert server.returncode is not None
