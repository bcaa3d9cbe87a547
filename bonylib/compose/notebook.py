"""The set-up every chapter runs first, so the notebooks do not repeat it.

A chapter's log lines (training progress, what a stage does) go to stderr: ``bony report`` streams them to the
terminal while the chapter runs, and the book hides them (the cells that run stages are tagged
``remove-stderr``). timm and the stages import ``tqdm.auto``, which warns in a notebook without widgets; the
book has none, so the warning is silenced. Figures are inline: ipykernel sets matplotlib's backend.
"""

from __future__ import annotations

import logging
import warnings


def setup() -> None:
    """Log at INFO to stderr with timestamps, and silence tqdm's missing-widget warning."""
    warnings.filterwarnings("ignore", message="IProgress not found")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", force=True)
