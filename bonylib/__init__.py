"""Bony: self-supervised (DINO) foundation models for prostate histopathology.

The package holds every stage of the pipeline (data, models, ssl, evaluation, plotting, CLI);
the numbered notebooks and the ``bony`` command are thin fronts over the same functions.
"""

__version__ = "0.1.0"
