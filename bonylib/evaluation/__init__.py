"""Evaluation of frozen encoders: the encoder contract, cached embeddings, k-NN and (later) probes and benchmarks."""
