"""How the seed's SICAPv2 number moves with the one value its report leaves out: the blur's σ.

The report scores a decoder that rebuilds the Gaussian-blurred tile, and does not state σ. A wider blur
leaves less to rebuild, so every encoder's MSE falls with σ, and the MSE alone cannot say whether an
encoder or the blur did the work. :func:`blur_sensitivity` refits the reconstruction of each encoder of an
evaluation at several σ on its cached embeddings, and sets beside it the MSE of the mean training image (a
decoder that ignores the embedding), so that the ratio of the two (the *skill*, below 1 when the
embedding helps) can be compared across σ where the MSE cannot.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from bonylib.config import load_config, to_dict
from bonylib.errors import BonyError
from bonylib.evaluation.benchmarks.sicapv2 import Sicapv2
from bonylib.evaluation.evaluate import EvaluateConfig, Evaluation
from bonylib.files import read_json, sha256_json, write_text_atomic

log = logging.getLogger(__name__)

COLUMNS = ("encoder", "sigma", "part", "mse", "mean_image_mse", "skill")


def mean_image_mse(targets: torch.Tensor, parts: np.ndarray, part: str) -> float:
    """MSE on ``part``'s rows of predicting every target by the mean training target: what a decoder that ignores
    its input can reach at best."""
    mean = targets[torch.from_numpy(parts == "train")].double().mean(0)
    return float(((targets[torch.from_numpy(parts == part)].double() - mean) ** 2).mean())


def blur_sensitivity(run_dir: str | Path, config: str | Path, overrides: Sequence[str], sigmas: Sequence[float],
                     seed: int = 0) -> pd.DataFrame:
    """The reconstruction MSE of each encoder of ``config`` (its first member) at each σ (px at the decoder's side)
    on the first scored part, beside the mean image's, computed on the embeddings ``bony evaluate`` cached in
    ``run_dir/evaluate`` and kept in ``blur_sensitivity.json`` there (recomputed when the settings change).

    A row per (encoder, σ): ``mse``, ``mean_image_mse`` and ``skill`` = their ratio.
    """
    if not sigmas or min(sigmas) <= 0:
        raise BonyError(f"blur sensitivity: need positive σ values, got {list(sigmas)}")
    run = Path(run_dir).resolve()
    cfg = load_config(EvaluateConfig, Path(config), [f"root={run}", *overrides, "benchmarks=[sicapv2]",
                                                     "sicapv2.heads=[reconstruction]"])
    out = run / "evaluate"
    evaluation = Evaluation(cfg, out)
    cfg = evaluation.cfg  # its paths taken from the root
    bench = evaluation.benchmarks[0]
    part = cfg.sicapv2.scored_parts[0]
    members = [(entry.name, members[0]) for entry, members, _ in evaluation.entries if members]
    if not members:
        raise BonyError(f"{config}: no encoder of it could be loaded for the blur sensitivity")
    key = sha256_json({"sicapv2": to_dict(cfg.sicapv2), "sigmas": list(map(float, sigmas)), "seed": seed,
                       "manifest": str(bench.manifest),
                       "encoders": [(name, encoder.fingerprint("cls")) for name, encoder in members]})
    cache = out / "blur_sensitivity.json"
    if cache.is_file():
        kept = read_json(cache)
        if isinstance(kept, dict) and kept.get("key") == key:
            return pd.DataFrame(kept["rows"], columns=list(COLUMNS))
    benches = {sigma: Sicapv2(dataclasses.replace(cfg.sicapv2, blur_sigma=float(sigma)), out / "manifests")
               for sigma in sigmas}
    rows = []
    with tqdm(total=len(members) * len(sigmas), desc="blur sensitivity", unit="fit") as progress:
        for name, encoder in members:
            features = evaluation.features(encoder, bench.manifest, "cls")
            for sigma, sigma_bench in benches.items():
                result = sigma_bench.fit("reconstruction", part, seed, features, evaluation.device)
                floor = mean_image_mse(sigma_bench.blurred, sigma_bench.reconstruction_parts, part)
                rows.append((name, float(sigma), part, result.metrics["mse"], floor, result.metrics["mse"] / floor))
                log.info("blur σ %.2f, %s: MSE %.4g (mean image %.4g)", sigma, name, result.metrics["mse"], floor)
                progress.update()
    write_text_atomic(cache, json.dumps({"key": key, "rows": rows}, indent=1) + "\n")
    return pd.DataFrame(rows, columns=list(COLUMNS))
