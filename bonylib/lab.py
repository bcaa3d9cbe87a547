"""JupyterLab on the book's notebooks, with the project's environment as a named kernel (``make lab``).

The notebooks are committed with the generic ``python3`` kernel, so that papermill and the SLURM scripts run them
in whatever environment they are started from. A user who opens them in another Jupyter (a cluster's JupyterHub, a
system JupyterLab) needs to pick this environment by name: :func:`install_kernel` writes the kernel spec
:data:`KERNEL_NAME` into the environment itself (``sys.prefix``, not the user's home, so it goes with the
environment), pointing at this interpreter; :func:`lab_command` starts JupyterLab at the repository root on the
``notebooks`` folder with that kernel as the default.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

KERNEL_NAME = "bony"
DISPLAY_NAME = "Bony (Python 3.11, project environment)"
KERNEL_ENV = {"PYDEVD_DISABLE_FILE_VALIDATION": "1"}
"""Set in the kernel as ``make`` sets it for the report: the debugger's frozen-modules warning otherwise opens
every notebook."""


def install_kernel(prefix: Path | None = None) -> Path:
    """Install (or refresh) the kernel spec :data:`KERNEL_NAME` for this interpreter under ``prefix`` (default:
    this environment); return its folder."""
    from ipykernel.kernelspec import install

    return Path(install(kernel_name=KERNEL_NAME, display_name=DISPLAY_NAME, prefix=str(prefix or sys.prefix),
                        env=KERNEL_ENV))


def lab_command(root: Path, port: int, token: str | None = None, browser: bool = True) -> list[str]:
    """The ``jupyter lab`` command line: served from ``root`` (the repository) on ``port`` of this machine, opening
    on ``notebooks/``, new notebooks on the named kernel, without the news feed, update check and extension manager
    (they reach the network); ``token``: the access token (default: a random one, printed in the URL JupyterLab
    shows)."""
    command = [sys.executable, "-m", "jupyterlab", f"--ServerApp.root_dir={root}", f"--ServerApp.port={port}",
               "--ServerApp.port_retries=0", "--ServerApp.ip=127.0.0.1", "--ServerApp.default_url=/lab/tree/notebooks",
               f"--MappingKernelManager.default_kernel_name={KERNEL_NAME}", "--LabApp.news_url=None",
               "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate", "--LabApp.extension_manager=readonly"]
    if token is not None:
        command.append(f"--IdentityProvider.token={token}")
    if os.geteuid() == 0:  # containers and these machines run as root, which Jupyter refuses unless told
        command.append("--allow-root")
    if not browser:
        command.append("--no-browser")
    return command


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bonylib.lab [--port N] [--no-browser]``: install the kernel, then run JupyterLab until Ctrl-C."""
    parser = argparse.ArgumentParser(prog="python -m bonylib.lab", description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8888, help="port on 127.0.0.1 (default: 8888)")
    parser.add_argument("--no-browser", action="store_true", help="do not open a browser (print the URL only)")
    parser.add_argument("--root", type=Path, default=Path.cwd(), help="repository root (default: the current folder)")
    args = parser.parse_args(argv)
    if not (args.root / "notebooks").is_dir():
        print(f"{args.root}: no notebooks/ folder here (run from the repository root, or pass --root)", file=sys.stderr)
        return 2
    print(f"kernel '{KERNEL_NAME}' installed in {install_kernel()}")
    try:
        return subprocess.run(lab_command(args.root.resolve(), args.port, browser=not args.no_browser)).returncode
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
