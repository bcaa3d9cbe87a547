"""Bony: self-supervised (DINO) foundation models for prostate histopathology.

The package holds every stage of the pipeline in layers whose imports point down (``pyproject.toml`` holds the
contract, ``tests/test_architecture.py`` enforces it): base (``errors``, ``files``, ``config``, ``runtime``,
``signals``) < ``data`` < ``plotting`` < ``models`` < the stages ``ssl``, ``evaluation`` and ``attention``
(independent of each other) < ``compose``, ``report`` and ``cli``. The numbered notebooks and the ``bony``
command are thin fronts over the same functions.
"""

__version__ = "0.1.0"
