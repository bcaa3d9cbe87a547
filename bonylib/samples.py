"""The real sample scans shipped beside the project (``../shared/data``).

Tests and notebooks use them to check readers and tissue detection on real files; they are not
part of the repository, so callers must cope with their absence.
"""

from __future__ import annotations

import os
from pathlib import Path

_REPO_ROOT = Path(__file__).resolve().parent.parent


def shared_data_dir() -> Path | None:
    """The sample-data folder: ``$BONY_SHARED_DATA`` or ``<repo>/../shared/data``; ``None`` if absent."""
    candidate = Path(os.environ.get("BONY_SHARED_DATA", _REPO_ROOT.parent / "shared" / "data"))
    return candidate if candidate.is_dir() else None
