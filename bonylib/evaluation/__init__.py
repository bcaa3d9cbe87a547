"""Evaluation of frozen encoders, a stage (layer 3): it imports neither ``ssl`` nor ``attention``.

``bony embed`` (``embeddings``: a resumable store per encoder and manifest), weighted k-NN and the trainer's k-NN
monitor (``knn``), probes and attention-MIL on cached embeddings (``probes``), the seed's decoders
(``decoders``), metrics and bootstrap intervals (``metrics``), slide-level splits (``splits``), the benchmarks
(``benchmarks/``), ``bony evaluate`` (``evaluate``), the results table (``results``) and the figures of an
evaluation's outputs (``figures``).
"""
