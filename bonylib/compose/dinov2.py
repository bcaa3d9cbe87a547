"""The DINOv2-style comparison of the chapter "DINOv2-style pretraining": its arms, trained at equal wall time,
curated tiles for one of them, and every benchmark on their teachers.

The arms are one recipe (``configs/pretrain/demo_dinov2.yaml``) with the terms switched by config keys, so that
nothing but the objective (and, for the last, the tiles drawn) differs:

- DINO: ``objective: dino`` with EMA centering, the pretraining chapter's recipe;
- DINO + iBOT: the masked-patch term added (EMA centering, no KoLeo);
- DINOv2-style: iBOT, KoLeo and Sinkhorn-Knopp centering;
- DINOv2-style on curated tiles: the same, drawing the tiles balanced over k-means clusters of their embeddings.

Equal wall time: every arm runs the recipe's schedule and stops when its time is spent. The DINO arm trains
``steps`` steps, and an arm whose step costs ``step_cost`` times DINO's (measured by
``benchmarks/bench_train_step.py --dinov2``) trains ``round(steps / step_cost)``: fixed step counts, so that the
comparison is reproducible, where a clock would make it depend on the machine's load. Each run's log gives the time it
took (:func:`budget_table`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from PIL import Image

from bonylib import plotting
from bonylib.compose.curation import curate
from bonylib.compose.figures import read_tiles
from bonylib.compose.pretrain import PretrainConfig, build_trainer, training_differences
from bonylib.config import load_config
from bonylib.data.curation import CurateConfig
from bonylib.errors import BonyError
from bonylib.evaluation.benchmarks.common import LOWER_IS_BETTER
from bonylib.evaluation.embeddings import EmbedConfig, embed
from bonylib.evaluation.evaluate import EncoderEntry, EvaluateConfig, evaluate
from bonylib.evaluation.results import read_results
from bonylib.models.registry import encoder_from_spec
from bonylib.ssl.masking import BlockMasking
from bonylib.ssl.runs import training_log

FOLDER = "dinov2"
"""The chapter's folder in the run folder: the arms' runs, the curation's embeddings, the evaluation."""
CURATED = "manifest.curated.parquet"


@dataclass(frozen=True)
class Arm:
    """One arm of the comparison: its run folder and row name, its label, the keys it sets on the recipe, whether its
    step costs DINOv2's (fewer steps at equal wall time) and whether it draws curated tiles."""

    name: str
    label: str
    overrides: tuple[str, ...]
    dinov2_step: bool = True
    curated: bool = False


ARMS = (
    Arm("dino", "DINO", ("objective=dino", "loss.centering=ema"), dinov2_step=False),
    Arm("dino-ibot", "DINO + iBOT", ("dinov2.koleo_weight=0", "loss.centering=ema")),
    Arm("dinov2", "DINOv2-style (iBOT, KoLeo, Sinkhorn-Knopp)", ()),
    Arm("dinov2-curated", "DINOv2-style, curated tiles", ("data.balance_by=cluster",), curated=True),
)


def masked_examples(manifest: Path, count: int = 6, side: int = 96, patch: int = 16, seed: int = 0) -> Figure:
    """``count`` labelled tiles of ``manifest`` as the student sees a masked global crop: at ``side`` pixels, with
    a block mask of DINOv2's (every crop masked here, to show it) over their ``patch``-pixel patches greyed out."""
    frame = pd.read_parquet(manifest)
    picks = frame[frame["label_name"] != ""].sample(count, random_state=seed)
    torch.manual_seed(seed)
    masks = BlockMasking((side // patch, side // patch), probability=1.0)(count)
    images, titles = [], []
    for tile, mask, label in zip(read_tiles(picks), masks, picks["label_name"]):
        crop = np.asarray(Image.fromarray(tile).resize((side, side), Image.Resampling.BICUBIC)).copy()
        crop[mask.repeat_interleave(patch, 0).repeat_interleave(patch, 1).numpy()] = 128
        images.append(crop)
        titles.append(f"{label}: {int(mask.sum())} of {mask.numel()} patches")
    return plotting.image_grid(images, titles, ncols=count, size=2.2)


def arm_steps(arm: Arm, steps: int, step_cost: float) -> int:
    """The steps ``arm`` trains in the wall time of ``steps`` DINO steps."""
    return steps if not arm.dinov2_step else max(1, round(steps / step_cost))


def run_name(arm: Arm, seed: int) -> str:
    """An arm's run folder (and results member) for a pretraining seed: ``dino``, ``dino-s1``, ..."""
    return arm.name if seed == 0 else f"{arm.name}-s{seed}"


def arm_config(recipe: Path, arm: Arm, tiles: Path, steps: int, step_cost: float, seed: int,
               overrides: list[str]) -> PretrainConfig:
    """The config of one arm: the recipe on the PANDA tiles (curated ones for a curated arm), the arm's keys, its
    seed and its share of the wall time (``max_steps``), then ``overrides``; no k-NN monitor (every benchmark
    judges the arms)."""
    manifest = tiles / "panda" / (CURATED if arm.curated else "manifest.parquet")
    return load_config(PretrainConfig, Path(recipe), [
        f"data.manifest={manifest}", "knn.manifest=", f"seed={seed}", *arm.overrides,
        f"max_steps={arm_steps(arm, steps, step_cost)}", *overrides])


def curate_tiles(run: Path, encoder: str, cfg: CurateConfig, embed_cfg: EmbedConfig | None = None) -> Path:
    """The PANDA tiles clustered by ``encoder``'s embeddings (a ``bony embed`` store in the chapter's folder, then
    ``bony curate``): the curated manifest beside the tiling's. Both steps resume (a store is kept; the manifest is
    written again only if missing)."""
    manifest = run / "tiles" / "panda" / "manifest.parquet"
    out = manifest.with_name(CURATED)
    if not out.is_file():
        store = embed(manifest, encoder_from_spec(encoder), run / FOLDER / "embeddings", "cls", embed_cfg).store
        curate(manifest, store, out, cfg)
    return out


def train_arms(run: Path, recipe: Path, arms: tuple[Arm, ...], steps: int, step_cost: float, seeds: list[int],
               overrides: list[str]) -> dict[str, list[Path]]:
    """Train (or resume) every arm for every seed; the run folders by arm name. Before training, each arm's config
    is checked against the first arm's: they may differ only in the keys the arms set, and the steps."""
    runs: dict[str, list[Path]] = {}
    tiles = run / "tiles"
    reference = arm_config(recipe, arms[0], tiles, steps, step_cost, seeds[0], overrides)
    for arm in arms:
        for seed in seeds:
            cfg = arm_config(recipe, arm, tiles, steps, step_cost, seed, overrides)
            allowed = {key.partition("=")[0] for a in arms for key in a.overrides} | {
                "max_steps", "seed", "data.manifest", "objective", "loss.centering"}
            extra = set(training_differences(reference, cfg)) - allowed
            if extra:
                raise BonyError(f"arm {arm.name} differs from {arms[0].name} in {', '.join(sorted(extra))}, not only in "
                                f"what the arms compare")
            out = run / FOLDER / run_name(arm, seed)
            build_trainer(cfg, out).train()
            runs.setdefault(arm.name, []).append(out)
    return runs


def budget_table(runs: dict[str, list[Path]], arms: tuple[Arm, ...]) -> pd.DataFrame:
    """Each arm's budget as it trained: steps, the median seconds a step took (logged steps; the first left out: it
    pays for start-up), the training time that gives, and the images seen (seeds averaged)."""
    rows = {}
    for arm in arms:
        found = []
        for path in runs[arm.name]:
            steps, _ = training_log(path)
            batch = load_config(PretrainConfig, path / "config.yaml").optim.batch_size
            seconds = batch / steps["images_per_s"].iloc[1:] if len(steps) > 1 else batch / steps["images_per_s"]
            found.append({"steps": float(steps["step"].iloc[-1]), "s / step (median)": float(seconds.median()),
                          "images": float(steps["step"].iloc[-1] * batch)})
        mean = pd.DataFrame(found).mean()
        rows[arm.label] = {**mean.to_dict(), "training (min)": mean["steps"] * mean["s / step (median)"] / 60}
    return pd.DataFrame(rows).T


def evaluate_arms(run: Path, config: Path, runs: dict[str, list[Path]], arms: tuple[Arm, ...],
                  overrides: list[str]) -> Path:
    """Every benchmark of ``config`` (the report's protocol) on the arms' teachers, one row per arm (its seeds
    pooled, as a random-init row pools its seeds), into the chapter's own evaluation folder; returns it."""
    cfg = load_config(EvaluateConfig, Path(config), [f"root={run}", *overrides])
    entries = [EncoderEntry(name=arm.name, specs=[f"bony:{path}" for path in runs[arm.name]], label=arm.label)
               for arm in arms]
    out = run / FOLDER / "evaluate"
    evaluate(dataclasses.replace(cfg, encoders=entries), out)
    return out


TARGETS = (("panda", "linear", "balanced_accuracy"), ("panda", "knn", "balanced_accuracy"),
           ("deepgleason", "patch", "mean_iou"))
"""The (benchmark, head, metric) issue 23 judges the objectives by: the grade task on held-out slides (linear probe
and k-NN, balanced accuracy) and the patch tokens' mask decoding (mIoU), iBOT's natural judge."""
COMPARISON = ("arm", "column", "DINO", "arm mean", "gain", "run-to-run spread", "runs", "beats DINO beyond the spread",
              "intervals apart")


def against_dino(out: Path, arms: tuple[Arm, ...], targets: tuple[tuple[str, str, str], ...] = TARGETS) -> pd.DataFrame:
    """Each arm against the first (DINO) on the results columns of ``targets``: both means, the difference (arm
    minus DINO, the metric's better direction counted), the run-to-run spread (the larger of the two rows' standard
    deviations over their runs; none with one run, as k-NN has), and whether the arm beats DINO by more than that
    spread and with its 95 % interval beyond DINO's. Columns are found by benchmark, head and metric, whatever
    the split their name carries."""
    long = read_results(out)
    rank = {target: i for i, target in enumerate(targets)}
    long = long.assign(rank=[rank.get(key) for key in zip(long["benchmark"], long["head"], long["metric"])])
    long = long[long["rank"].notna()].sort_values("rank", kind="stable")
    by_row = long.set_index(["encoder", "column"])
    base = arms[0]
    rows = []
    for arm in arms[1:]:
        for column in dict.fromkeys(long["column"]):
            if (arm.name, column) not in by_row.index or (base.name, column) not in by_row.index:
                continue
            a, b = by_row.loc[(arm.name, column)], by_row.loc[(base.name, column)]
            sign = -1.0 if a["metric"] in LOWER_IS_BETTER else 1.0
            gain = sign * float(a["mean"] - b["mean"])
            stds = [s for s in (a["std"], b["std"]) if np.isfinite(s)]
            spread = max(stds) if stds else float("nan")
            apart = bool(a["ci_low"] > b["ci_high"] if sign > 0 else a["ci_high"] < b["ci_low"])
            rows.append((arm.label, column, float(b["mean"]), float(a["mean"]), gain, spread, int(a["runs"]),
                         bool(gain > spread), apart))
    return pd.DataFrame(rows, columns=list(COMPARISON)).rename(columns={"DINO": base.label}).set_index(["arm", "column"])
