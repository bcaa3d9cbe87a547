"""The attention-cost measurement: the exponent fit on data with known exponents, and sane measurements.

Nothing here asserts a time: times depend on the machine and its neighbours. Memory is exact and
repeatable, so its growth is checked.
"""

from __future__ import annotations

import matplotlib
import numpy as np
import pandas as pd
import pytest
import torch

from bonylib.models.attention_cost import (
    MECHANISMS,
    QUANTITIES,
    attention_layer,
    fit_exponents,
    fit_power_law,
    measure_attention_cost,
    peak_forward_bytes,
)
from bonylib.plotting import growth_curves

matplotlib.use("Agg")


@pytest.mark.parametrize("exponent", [1.0, 1.5, 2.0, 2.7])
def test_power_law_fit_recovers_an_exact_law(exponent: float) -> None:
    tokens = np.array([196, 400, 784, 1600, 3136, 4096])
    law = fit_power_law(tokens, 3e-7 * tokens ** exponent)
    assert law.exponent == pytest.approx(exponent, abs=1e-9)
    assert law.prefactor == pytest.approx(3e-7, rel=1e-6)
    assert law.points == 6
    np.testing.assert_allclose(law(tokens), 3e-7 * tokens ** exponent, rtol=1e-6)


def test_power_law_fit_under_multiplicative_noise() -> None:
    """Timing noise is a factor (a busy neighbour slows a run by some percent): 10 % of it moves the
    exponent fitted over a 16x range of tokens by a few hundredths, not more."""
    rng = np.random.default_rng(0)
    tokens = np.geomspace(1024, 16384, 8)
    for exponent in (1.0, 2.0):
        law = fit_power_law(tokens, 2e-9 * tokens ** exponent * rng.lognormal(0.0, 0.1, tokens.size))
        assert law.exponent == pytest.approx(exponent, abs=0.1)


def test_power_law_fit_refuses_what_has_no_slope() -> None:
    with pytest.raises(ValueError, match="two or more"):
        fit_power_law([1024, 1024], [1.0, 2.0])
    with pytest.raises(ValueError, match="positive"):
        fit_power_law([256, 1024], [0.0, 1.0])


def test_exponents_per_mechanism_use_only_the_large_sizes() -> None:
    """Below ``min_tokens`` the table follows another law (the linear projections' regime): it must not
    enter the fit."""
    rows = []
    for tokens in (196, 400, 1024, 2304, 4096, 9216):
        small = tokens < 1024
        rows.append({"mechanism": "self_attention", "tokens": tokens, "time_s": 1e-5 * tokens if small else
                     1e-8 * tokens ** 2, "peak_bytes": 8.0 * tokens ** 2})
        rows.append({"mechanism": "xca", "tokens": tokens, "time_s": 0.5 if small else 1e-5 * tokens,
                     "peak_bytes": 4000.0 * tokens})
    exponents = fit_exponents(pd.DataFrame(rows), min_tokens=1024).set_index(["mechanism", "quantity"])
    assert set(exponents.index) == {(m, q) for m in ("self_attention", "xca") for q in QUANTITIES}
    expected = {("self_attention", "time_s"): 2, ("self_attention", "peak_bytes"): 2, ("xca", "time_s"): 1,
                ("xca", "peak_bytes"): 1}
    for key, exponent in expected.items():
        assert exponents.loc[key, "exponent"] == pytest.approx(exponent, abs=1e-9), key
        assert exponents.loc[key, "points"] == 4


def test_measurement_gives_one_sane_row_per_mechanism_and_size() -> None:
    threads = torch.get_num_threads()
    table = measure_attention_cost(sides=(32, 64), dim=16, heads=2, repeats=3, threads=1)
    assert torch.get_num_threads() == threads
    assert len(table) == 2 * len(MECHANISMS)
    assert set(table["mechanism"]) == set(MECHANISMS)
    assert sorted(set(table["tokens"])) == [4, 16]
    assert (table["time_s"] > 0).all() and (table["peak_bytes"] > 0).all()
    assert ((table["time_min_s"] <= table["time_s"]) & (table["time_s"] <= table["time_max_s"])).all()
    assert (table["repeats"] == 3).all() and (table["threads"] == 1).all()


def test_peak_memory_sees_the_attention_matrix_only_where_it_is_held() -> None:
    """1024 tokens, 2 heads: explicit self-attention allocates the (2, 1024, 1024) float32 matrix (8 MiB); the
    fused kernel and XCA never hold anything of that size."""
    x = torch.randn(1, 1024, 32)
    matrix = 2 * 1024 * 1024 * 4
    with torch.inference_mode():
        peaks = {name: peak_forward_bytes(attention_layer(name, 32, 2), x) for name in MECHANISMS}
    assert peaks["self_attention"] >= matrix
    assert peaks["self_attention_fused"] < matrix / 2
    assert peaks["xca"] < matrix / 4
    assert peaks["xca"] >= x.numel() * 4  # at least its output


def test_memory_grows_as_n_squared_for_self_attention_and_as_n_for_xca() -> None:
    table = measure_attention_cost(sides=(256, 384, 512), dim=32, heads=2, repeats=1,
                                   mechanisms=("self_attention", "xca"))
    exponents = fit_exponents(table, min_tokens=256).set_index(["mechanism", "quantity"])["exponent"]
    assert 1.8 <= exponents["self_attention", "peak_bytes"] <= 2.05
    assert 0.95 <= exponents["xca", "peak_bytes"] <= 1.05


def test_plot_names_each_mechanism_with_its_exponent() -> None:
    rows = [{"mechanism": m, "tokens": n, "time_s": 1e-8 * n ** k, "peak_bytes": 8.0 * n ** k}
            for m, k in (("self_attention", 2.0), ("xca", 1.0)) for n in (196, 1024, 4096)]
    table = pd.DataFrame(rows)
    fig = growth_curves(table, fit_exponents(table, min_tokens=1024), MECHANISMS, QUANTITIES)
    axes = [ax for ax in fig.axes if ax.get_legend() is not None]
    assert len(axes) == len(QUANTITIES)
    labels = [text.get_text() for text in axes[0].get_legend().get_texts()]
    assert any(MECHANISMS["self_attention"] in label and "2.00" in label for label in labels)
    assert any(MECHANISMS["xca"] in label and "1.00" in label for label in labels)
