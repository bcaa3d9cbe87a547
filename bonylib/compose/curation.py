"""``bony curate``: a tile manifest with a ``cluster`` column made from a ``bony embed`` store, for curated
pretraining (``data.balance_by=cluster``), and the chapter's figure of the clusters.

Glue of two stages: the embeddings are the evaluation stage's stores (:mod:`bonylib.evaluation.embeddings`), the
clustering is data curation (:mod:`bonylib.data.curation`), and the column is read by the pretraining sampler
(:mod:`bonylib.ssl.data`), which imports neither.

The curated manifest keeps every row and column of the manifest the store was computed from and adds ``cluster``
(and ``fine_cluster``); it is written beside that manifest, whose shard paths are relative to its folder, and a JSON
beside it records the clusters' sizes, the store and the config.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from bonylib import plotting
from bonylib.config import to_dict
from bonylib.data.curation import CurateConfig, cluster_tiles
from bonylib.data.manifest import read_manifest
from bonylib.errors import BonyError
from bonylib.evaluation.embeddings import load_embeddings
from bonylib.files import atomic_path, write_text_atomic


def curate(manifest: Path, store: Path, out: Path, cfg: CurateConfig) -> Path:
    """Cluster the tiles of ``manifest`` by their embeddings in ``store`` and write the manifest with a ``cluster``
    column to ``out`` (in the manifest's folder) and ``out`` with suffix ``.json``; return ``out``."""
    manifest, out = Path(manifest).resolve(), Path(out).resolve()
    if out.parent != manifest.parent:
        raise BonyError(f"{out}: write the curated manifest into {manifest.parent}, beside {manifest.name}: its tile "
                        f"paths (shards) are relative to that folder")
    if out == manifest:
        raise BonyError(f"{out}: is the manifest itself; the embeddings are keyed by its checksum, so write another file")
    frame, ids = read_manifest(manifest)
    stored_ids, embeddings = load_embeddings(store, manifest)
    if not np.array_equal(stored_ids, ids):  # load_embeddings checked the manifest's checksum: a store of its rows
        raise BonyError(f"{store}: its rows are not those of {manifest}")
    clustering = cluster_tiles(embeddings, cfg)
    curated = frame.assign(cluster=clustering.labels, fine_cluster=clustering.fine_labels)
    with atomic_path(out) as tmp:
        curated.to_parquet(tmp, index=False)
    sizes = np.bincount(clustering.labels, minlength=cfg.clusters)
    record = {"manifest": str(manifest), "store": str(Path(store).resolve()), "tiles": len(frame),
              "levels": clustering.levels, "cluster_sizes": sizes.tolist(), "config": to_dict(cfg)}
    write_text_atomic(out.with_suffix(".json"), json.dumps(record, indent=2) + "\n")
    return out


def cluster_overview(curated: Path, examples: int = 6, seed: int = 0, classes: list[str] | None = None) -> Figure:
    """The clusters of a curated manifest: tiles per cluster (split by label, where tiles have one) and
    ``examples`` tiles of each, read from their slides."""
    from bonylib.compose.figures import read_tiles

    frame = pd.read_parquet(curated)
    if "cluster" not in frame:
        raise BonyError(f"{curated}: no cluster column (write it with bony curate)")
    labels = frame["label_name"].replace("", "no label")
    counts = pd.crosstab(frame["cluster"], labels)
    if classes is not None:
        counts = counts.reindex(columns=[c for c in [*classes, "no label"] if c in counts])
    picks = [group.sample(min(examples, len(group)), random_state=seed) for _, group in frame.groupby("cluster")]
    tiles = [read_tiles(pick) for pick in picks]
    return plotting.cluster_overview(counts, tiles)
