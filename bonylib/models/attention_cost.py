"""What token mixing costs as tiles grow: ViT self-attention against XCiT's cross-covariance attention (XCA).

Self-attention compares every token with every other: its (N x N) attention matrix per head makes time
and memory grow as N^2 in the number of tokens N. XCA (El-Nouby et al., 2021) compares channels instead:
per head a (d_h x d_h) matrix built from a sum over the N tokens, so both grow as N. The seed chose XCiT
for this (large tiles, 96-px local crops). Here the growth is measured, not assumed: one attention layer
of each kind, built by timm with the same width and heads, runs forward on the patch tokens of tiles from
224 px up, and a least-squares line in log-log space gives the exponent of time and of peak memory.

Three layers are measured (:data:`MECHANISMS`): timm's ViT attention with the softmax matrix computed
explicitly (as DINO's reference and every attention map does), the same layer through torch's fused
``scaled_dot_product_attention`` (what timm runs by default: its flash kernel works in blocks and never
holds the N x N matrix, so its memory grows as N while its time still grows as N^2), and timm's XCA.
Only the attention layers are timed: the MLP, norms and patch embedding around them are linear in N
for both architectures and would only dilute the exponent of the part that differs.

Memory is the peak of bytes allocated during one forward above what was allocated before it (the
layer's intermediates and its output; weights and input excluded). On CUDA it is
``torch.cuda.max_memory_allocated``. On the CPU, torch has no peak counter and Python's ``tracemalloc``
does not see torch's allocator, so the forward runs once under ``torch.profiler`` with
``profile_memory=True``, which records every allocation and free of torch's CPU allocator with its
size and time; the running sum of those, in time order, peaks at the answer. This counts tensors only
(not the allocator's or the BLAS library's own scratch space), which is what grows with N.

Times are medians of ``repeats`` forwards after a warm-up, in float32 under ``inference_mode``,
with the mechanisms interleaved in each round so that a neighbour's load on a shared machine falls on
all of them alike. On the CPU they run on one thread by default: with two threads on a 2-core machine
that other jobs also used, every parallel op waited for a descheduled thread, which added a delay of
the same size to small and large inputs (XCA took 144 ms at 1600 tokens and 187 ms at 9216, an
exponent of 0.2; on one thread 9.6 and 81 ms). The exponent fit only uses the sizes where the
quadratic term dominates (``min_tokens``), since at 196 tokens the linear projections (q, k, v and
the output, 8 N d^2 flops against 4 N^2 d for the attention itself) take most of the time.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from timm.layers import Attention
from timm.models.xcit import XCA
from torch import nn
from torch.profiler import ProfilerActivity, profile

MECHANISMS: dict[str, str] = {
    "self_attention": "ViT self-attention (explicit softmax)",
    "self_attention_fused": "ViT self-attention, fused (SDPA)",
    "xca": "XCiT cross-covariance attention",
}
"""The attention layers measured, and their names in plots."""

DEFAULT_SIDES: tuple[int, ...] = (224, 320, 448, 640, 896, 1024, 1280, 1536)
"""Tile sides (px) of the benchmark: 196 to 9216 tokens at patch 16. At 1536 px the explicit self-attention
holds two (heads x N x N) float32 matrices at once, 2.7 GB with 4 heads; 2048 px would need 8.6 GB."""

QUANTITIES: dict[str, str] = {"time_s": "forward time (s)", "peak_bytes": "peak memory (bytes)"}
"""The measured columns whose growth is fitted, and their axis labels."""


def attention_layer(mechanism: str, dim: int, heads: int) -> nn.Module:
    """One timm attention layer of ``mechanism`` (a key of :data:`MECHANISMS`), ``dim`` wide with ``heads``
    heads, in eval mode. Whether timm fuses the attention is set here, not left to timm's environment
    variable, so a measurement always measures the layer it names."""
    if mechanism not in MECHANISMS:
        raise ValueError(f"attention mechanism '{mechanism}' is not one of {', '.join(MECHANISMS)}")
    if mechanism == "xca":
        layer: nn.Module = XCA(dim, num_heads=heads, qkv_bias=True)
    else:
        layer = Attention(dim, num_heads=heads, qkv_bias=True)
    layer.fused_attn = mechanism == "self_attention_fused"
    return layer.eval()


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def forward_seconds(layer: nn.Module, x: torch.Tensor) -> float:
    """Wall time of one forward of ``layer`` on ``x`` (waiting for the GPU to finish, on CUDA)."""
    _synchronize(x.device)
    start = time.perf_counter()
    layer(x)
    _synchronize(x.device)
    return time.perf_counter() - start


def peak_forward_bytes(layer: nn.Module, x: torch.Tensor) -> int:
    """Peak bytes allocated by one forward of ``layer`` on ``x`` above those allocated before it (see the
    module's docstring for how: CUDA's peak counter, or torch.profiler's allocation events on the CPU)."""
    if x.device.type == "cuda":
        _synchronize(x.device)
        torch.cuda.reset_peak_memory_stats(x.device)
        before = torch.cuda.memory_allocated(x.device)
        layer(x)
        _synchronize(x.device)
        return int(torch.cuda.max_memory_allocated(x.device) - before)
    # kineto logs two lines to stderr for every profiled region at its default level (a flood in a notebook);
    # it reads the level when the profiler first starts, and a level the user set is kept
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        layer(x)
    # each "[memory]" event is one allocation (+bytes) or free (-bytes); the kineto results keep all of them,
    # where prof.events() keeps only those outside any recorded op
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def measure_attention_cost(sides: Sequence[int] = DEFAULT_SIDES, dim: int = 192, heads: int = 4, patch: int = 16,
                           batch: int = 1, repeats: int = 5, mechanisms: Sequence[str] = tuple(MECHANISMS),
                           device: str | torch.device = "cpu", seed: int = 0,
                           threads: int | None = 1) -> pd.DataFrame:
    """Forward time and peak memory of each attention layer on the ``(side / patch)^2`` patch tokens of
    ``batch`` tiles of each side: one row per (mechanism, side).

    Columns: ``mechanism, side, tokens, time_s`` (median of ``repeats``), ``time_min_s, time_max_s``,
    ``peak_bytes``, and what was run (``dim, heads, batch, repeats, device, threads``). The default width
    and heads (192, 4) lie between XCiT-nano's (128, 4) and ViT-tiny's (192, 3), so the largest tiles fit
    in a laptop's memory; the exponents do not depend on them once N is large against the head width.
    ``threads``: torch's CPU threads while measuring (None: as they are), restored afterwards.
    """
    device = torch.device(device)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads or previous_threads)
    try:
        return _measure(sides, dim, heads, patch, batch, repeats, mechanisms, device, seed)
    finally:
        torch.set_num_threads(previous_threads)


@torch.inference_mode()
def _measure(sides: Sequence[int], dim: int, heads: int, patch: int, batch: int, repeats: int,
             mechanisms: Sequence[str], device: torch.device, seed: int) -> pd.DataFrame:
    """:func:`measure_attention_cost` with torch's threads already set."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        layers = {name: attention_layer(name, dim, heads).to(device) for name in mechanisms}
        inputs = {side: torch.randn(batch, (side // patch) ** 2, dim, device=device) for side in sides}
    rows = []
    for side, x in inputs.items():
        for layer in layers.values():  # warm-up: first-call allocations and kernel selection
            layer(x)
        times: dict[str, list[float]] = {name: [] for name in layers}
        for _ in range(repeats):
            for name, layer in layers.items():
                times[name].append(forward_seconds(layer, x))
        for name, layer in layers.items():
            rows.append({"mechanism": name, "side": side, "tokens": x.shape[1],
                         "time_s": statistics.median(times[name]), "time_min_s": min(times[name]),
                         "time_max_s": max(times[name]), "peak_bytes": peak_forward_bytes(layer, x), "dim": dim,
                         "heads": heads, "batch": batch, "repeats": repeats, "device": str(device),
                         "threads": torch.get_num_threads()})
    return pd.DataFrame(rows)


@dataclass(frozen=True)
class PowerLaw:
    """``value = prefactor * tokens ** exponent``, fitted on ``points`` measurements."""

    exponent: float
    prefactor: float
    points: int

    def __call__(self, tokens: np.ndarray | float) -> np.ndarray:
        return self.prefactor * np.asarray(tokens, dtype=float) ** self.exponent


def fit_power_law(tokens: Sequence[float] | np.ndarray, values: Sequence[float] | np.ndarray) -> PowerLaw:
    """Least-squares line through ``(log tokens, log values)``: its slope is the growth exponent.

    In log space a multiplicative noise (a slower run is slower by a factor) has the same weight at
    every size, so the largest sizes do not dominate the fit as they would in linear space.
    """
    x, y = np.asarray(tokens, dtype=float), np.asarray(values, dtype=float)
    if x.shape != y.shape or len(np.unique(x)) < 2:
        raise ValueError("a power law needs values at two or more distinct token counts")
    if (x <= 0).any() or (y <= 0).any():
        raise ValueError("a power law is fitted on positive token counts and values only")
    slope, intercept = np.polyfit(np.log(x), np.log(y), 1)
    return PowerLaw(float(slope), float(np.exp(intercept)), len(x))


def fit_exponents(table: pd.DataFrame, min_tokens: int = 1024) -> pd.DataFrame:
    """The growth exponent of time and of memory for each mechanism of a :func:`measure_attention_cost`
    table, fitted on its rows with at least ``min_tokens`` tokens (the asymptotic regime; 1024 tokens
    is a 512-px tile). Columns: ``mechanism, quantity, exponent, prefactor, points, min_tokens``."""
    rows = []
    for mechanism, group in table[table["tokens"] >= min_tokens].groupby("mechanism", sort=False):
        for quantity in QUANTITIES:
            law = fit_power_law(group["tokens"], group[quantity])
            rows.append({"mechanism": mechanism, "quantity": quantity, "exponent": law.exponent,
                         "prefactor": law.prefactor, "points": law.points, "min_tokens": min_tokens})
    return pd.DataFrame(rows)
