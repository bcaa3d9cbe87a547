"""The real-tissue chapter's steps (chapter glue: tiling, pretraining, evaluation and attention brought together).

The chapter (``notebooks/10_real_tissue.ipynb``) runs the pipeline on the two labelled prostate sets of
``../shared/data``: a partial SICAPv2 (600 patches at 10x, ``--format sicapv2``) and 200 Arvaniti tissue-microarray
patches at 40x (``--format imagefolder``). Magnification is decided here, once: both sets are tiled at one
target µm/px from what each declares (SICAPv2 its 10x, the image folder the µm/px the user gives), into tiles of
one side, so that every encoder sees the same physical scale from both.

Everything is written under ``<run>/real/``: ``tiles/sicapv2``, ``tiles/arvaniti``, ``tiles/pretrain.parquet`` (the
two manifests together, what DINO trains on), ``pretrain/``, ``evaluate/`` and ``attention/``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from bonylib.config import load_config
from bonylib.data.datasets import TileDataset
from bonylib.data.sicapv2_tables import gleason_text, read_slide_labels
from bonylib.data.sources import SICAPV2_MPP, id_problem
from bonylib.data.tiling import TileConfig, tile
from bonylib.errors import BonyError
from bonylib.evaluation.evaluate import EvaluateConfig, evaluate
from bonylib.evaluation.figures import comparison_counts, row_comparison, runs_of
from bonylib.evaluation.results import read_results
from bonylib.files import atomic_path

SICAPV2_FOLDER = "sicapv2_subset"
ARVANITI_FOLDER = "arvaniti_tma"


@dataclass(frozen=True)
class RealSets:
    """The two real datasets and the µm per pixel each declares."""

    sicapv2: Path
    arvaniti: Path
    arvaniti_mpp: float


def find_real_sets(shared: Path | None, arvaniti_mpp: float, sicapv2: str = "", arvaniti: str = "") -> RealSets | str:
    """The two sets: ``sicapv2`` and ``arvaniti`` when given (the full datasets on a cluster), else the samples in
    ``shared`` (``../shared/data``, None when it is absent); or, in one line, why the chapter cannot run."""
    if shared is None and not (sicapv2 and arvaniti):
        return "../shared/data (or $BONY_SHARED_DATA) not found: the real-tissue chapter needs its real sets"
    base = Path(shared or "")
    sets = RealSets(Path(sicapv2 or base / SICAPV2_FOLDER), Path(arvaniti or base / ARVANITI_FOLDER), arvaniti_mpp)
    missing = [str(p) for p in (sets.sicapv2, sets.arvaniti) if not p.is_dir()]
    if missing:
        return f"{' and '.join(missing)} not found: the real-tissue chapter needs both real sets"
    return sets


@dataclass(frozen=True)
class RealTiles:
    """The manifests of the tiled sets, the two together for pretraining, and the tiles' side."""

    sicapv2: Path
    arvaniti: Path
    pretrain: Path
    tile_px: int


def tile_real_sets(sets: RealSets, out: Path, overrides: list[str]) -> RealTiles:
    """Tile both sets into ``out`` with one tiling config (``overrides`` of :class:`TileConfig`: the target ``mpp``
    and ``tile_px``), Arvaniti's images read at the µm/px it declares; write the pretraining manifest (both sets).
    A set with failed images is still used (the failures are logged); a set with no tile is refused."""
    cfg = load_config(TileConfig, None, overrides)
    sicapv2 = tile("sicapv2", [sets.sicapv2], out / "sicapv2", cfg)
    arvaniti = tile("imagefolder", [sets.arvaniti], out / "arvaniti",
                    load_config(TileConfig, None, [*overrides, f"slide_mpp={sets.arvaniti_mpp}"]))
    frames = []
    for result in (sicapv2, arvaniti):
        assert result.manifest is not None
        frame = pd.read_parquet(result.manifest)
        if frame.empty:
            raise BonyError(f"{result.manifest}: no tiles (see {result.out / 'failures.csv'})")
        frames.append(frame)
    pretrain = out / "pretrain.parquet"
    with atomic_path(pretrain) as tmp:
        pd.concat(frames, ignore_index=True).to_parquet(tmp, index=False)
    return RealTiles(sicapv2.manifest, arvaniti.manifest, pretrain, cfg.tile_px)  # type: ignore[arg-type]


def magnification(tiles: RealTiles, sets: RealSets) -> pd.DataFrame:
    """What each set declares and what tiling made of it: the µm/px of its images, the region read for a tile, the
    tile's side and µm/px, and the counts."""
    rows = []
    for name, manifest, declared, source in (
            ("SICAPv2", tiles.sicapv2, SICAPV2_MPP, "10x, SICAPv2's readme"),
            ("Arvaniti TMA", tiles.arvaniti, sets.arvaniti_mpp, "40x, given for the image folder")):
        frame = pd.read_parquet(manifest, columns=["slide_id", "size", "mpp"])
        rows.append({"set": name, "declared µm/px": declared, "from": source,
                     "region read (px)": int(frame["size"].median()), "tile µm/px": round(float(frame["mpp"].median()), 3),
                     "images": frame["slide_id"].nunique(), "tiles": len(frame)})
    return pd.DataFrame(rows).set_index("set")


def evaluate_real(config: Path, run: Path, sets: RealSets, overrides: list[str]) -> Path:
    """``bony evaluate`` of the chapter's config on the run folder (its ``root``), with SICAPv2's folder, into
    ``run/real/evaluate``."""
    cfg = load_config(EvaluateConfig, Path(config), [f"root={run}", f"sicapv2.data={sets.sicapv2}", *overrides])
    out = Path(run) / "real" / "evaluate"
    evaluate(cfg, out)
    return out


def example_tiles(tiles: RealTiles, dest: Path, per_class: int = 1) -> Path:
    """``per_class`` tiles of each labelled class of both sets (those with the least glass: SICAPv2's edge patches
    are half background) as PNGs in the emptied folder ``dest``, named ``<k>-<set>-<class>``, for the attention and
    token figures."""
    dest.mkdir(parents=True, exist_ok=True)
    for stale in dest.glob("*.png"):
        stale.unlink()
    k = 0
    for short, manifest, column in (("sicap", tiles.sicapv2, "label_name"), ("tma", tiles.arvaniti, "image_label")):
        frame = pd.read_parquet(manifest)
        labelled = frame[frame[column] != ""].sort_values(["background", "slide_id", "y", "x"], kind="stable")
        chosen = labelled.groupby(column).head(per_class).sort_values(column, kind="stable").reset_index(drop=True)
        reader = TileDataset(chosen, root=Path(manifest).parent, tile_px=tiles.tile_px)
        for i, name in enumerate(chosen[column]):
            stem = f"{k}-{short}-{name}"
            with atomic_path(dest / f"{stem if not id_problem(stem) else k}.png") as tmp:
                reader.read(i).save(tmp, format="PNG")
            k += 1
    return dest


def _evaluated(out: Path, names: list[str]) -> list[str]:
    """Those of ``names`` that have numbers in the results table (an encoder whose weights are absent has none)."""
    long = read_results(out)
    return [name for name in names if long.loc[long["encoder"] == name, "mean"].notna().any()]


def beats(out: Path, ours: str, others: list[str]) -> pd.DataFrame:
    """Our row against each of ``others`` (those evaluated) on every headline column: ours minus theirs, signed so
    that positive means ours is better (errors: lower), marked where the two 95 % intervals are apart
    (:func:`~bonylib.evaluation.figures.row_comparison`): a gain inside overlapping intervals is not a finding."""
    columns = {}
    for other in _evaluated(out, others):
        comparison = row_comparison(out, other, ours)
        gain = comparison["difference"].abs().where(comparison["better"] == ours, -comparison["difference"].abs())
        columns[f"vs {other}"] = pd.Series([f"{value:+.3f}{' (apart)' if apart else ''}" for value, apart
                                            in zip(gain, comparison["intervals apart"])], index=comparison.index)
    return pd.DataFrame(columns)


def verdict(out: Path, ours: str, others: list[str]) -> str:
    """:func:`beats` in a line per other row (markdown): on how many headline columns each row is better, and on how
    many of those with the intervals apart."""
    return "\n".join(f"- {ours} against **{other}**: "
                     + comparison_counts(row_comparison(out, other, ours), other, ours)
                     for other in _evaluated(out, others))


def slide_scores(out: Path, sets: RealSets, seed: int = 0) -> pd.DataFrame:
    """Each test slide's Gleason score as ``wsi_labels.xlsx`` gives it, and as each row's patches gave it (the
    ``slides`` head, its first member's run of ``seed`` in the partition that tests the slide)."""
    truth = read_slide_labels(sets.sicapv2)
    tested: dict[str, str] = {}
    columns: dict[str, dict[str, str]] = {}
    for label, runs in runs_of(out, "sicapv2", "slides").items():
        for meta, _ in runs:
            if meta["seed"] == seed and meta["member"] == 0:
                info = meta["info"]
                columns.setdefault(label, {}).update(zip(info["slides"], info["predicted_scores"]))
                tested.update(dict.fromkeys(info["slides"], meta["split"]))
    slides = sorted(tested)
    table = pd.DataFrame({"tested in": [tested[s] for s in slides],
                          "patient": truth.loc[slides, "patient"].to_numpy(),
                          "Gleason (wsi_labels)": [gleason_text(*truth.loc[s, ["primary", "secondary"]]) for s in slides],
                          **{label: [scores.get(s, "") for s in slides] for label, scores in columns.items()}},
                         index=pd.Index(slides, name="slide"))
    return table.sort_values(["tested in", "slide"])
