"""Data: label encodings, synthetic datasets in the real on-disk formats (later: slides, tiling)."""
