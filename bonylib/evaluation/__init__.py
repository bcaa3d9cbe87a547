"""Evaluation of frozen encoders: features, k-NN and (later) probes and benchmarks."""
