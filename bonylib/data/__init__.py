"""Data, layer 1: everything read from disk before a model sees it.

Slide readers (``slides``), tissue and tile quality (``quality``), label encodings, policies and relabelling
(``labels``), dataset formats as slide jobs (``sources``), ``bony tile`` (``tiling``), reading a tile manifest as
checked input (``manifest``), torch datasets over a manifest (``datasets``), per-tile values stitched over a
slide thumbnail (``heatmaps``), k-means clusters of tile embeddings for curated sampling (``curation``), the real sample scans of ``../shared/data`` (``samples``) and the synthetic
datasets in the real on-disk formats (``synthetic/``, ``bony synth``).
"""
