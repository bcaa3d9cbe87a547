"""Curation of a tile collection by visual similarity: k-means clusters of tile embeddings, to balance over.

The seed's first DINOv2 advance (§9.1): DINOv2 curated its data by clustering embeddings and drawing from the
clusters evenly (Oquab et al., 2024; Vo et al., 2024), so that common images do not drown rare ones. In a prostate
slide most tiles are stroma and benign glands; Gleason 5 sheets and cribriform glands are few. Clustering the tiles'
embeddings and drawing every cluster as often (:func:`bonylib.ssl.data.balance_weights` on the ``cluster`` column)
shows the model rare tissue as often as common tissue, without labels.

Embeddings are L2-normalised first (DINO features are compared by cosine). Up to ``hierarchical_above`` tiles one
k-means (scikit-learn's ``KMeans``) makes the clusters; above, as in Vo et al.'s hierarchical k-means, a
``MiniBatchKMeans`` first groups the tiles into ``fine_clusters`` small clusters and a k-means of their centroids
(unweighted, so that a concept counts once however many tiles it has) makes the clusters, each tile going with its
fine cluster: a k-means over millions of tiles and thousands of centroids would not fit a node's time. The sampler
balances over the top level only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.cluster import KMeans, MiniBatchKMeans

from bonylib.config import option
from bonylib.errors import ConfigError


@dataclass
class CurateConfig:
    """Options of ``bony curate``."""

    clusters: int = option(16, "clusters of tiles, each drawn as often when pretraining balances by them")
    hierarchical_above: int = option(200_000, "more tiles than this are clustered in two levels (MiniBatchKMeans into "
                                     "fine_clusters, then k-means of their centroids); at most this many, one k-means")
    fine_clusters: int = option(2000, "clusters of the first level when clustering in two levels")
    seed: int = option(0, "seed of the k-means initialisations")

    def __post_init__(self) -> None:
        if self.clusters < 2:
            raise ConfigError(f"clusters must be at least 2, got {self.clusters}")
        if self.fine_clusters < self.clusters:
            raise ConfigError(f"fine_clusters ({self.fine_clusters}) must be at least clusters ({self.clusters})")


@dataclass(frozen=True)
class Clustering:
    """Each tile's cluster and, for two levels, its fine cluster (else the same), and the clusters' centroids."""

    labels: np.ndarray
    fine_labels: np.ndarray
    centroids: np.ndarray
    levels: int


def _normalised(embeddings: np.ndarray) -> np.ndarray:
    x = np.asarray(embeddings, dtype=np.float32).reshape(len(embeddings), -1)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def cluster_tiles(embeddings: np.ndarray, cfg: CurateConfig) -> Clustering:
    """Clusters of ``embeddings`` (tiles, D): one k-means up to ``cfg.hierarchical_above`` tiles, two levels above.
    Cluster numbers are ordered by size (0: the largest), so that they read the same whatever k-means' order."""
    x = _normalised(embeddings)
    if len(x) < cfg.clusters:
        raise ConfigError(f"{len(x)} tiles cannot make {cfg.clusters} clusters (lower clusters)")
    if len(x) <= cfg.hierarchical_above:
        model = KMeans(cfg.clusters, n_init=4, random_state=cfg.seed).fit(x)
        labels, fine, centroids, levels = model.labels_, model.labels_, model.cluster_centers_, 1
    else:
        first = MiniBatchKMeans(min(cfg.fine_clusters, len(x)), n_init=3, batch_size=4096, random_state=cfg.seed).fit(x)
        fine = first.labels_
        second = KMeans(cfg.clusters, n_init=4, random_state=cfg.seed).fit(_normalised(first.cluster_centers_))
        labels, centroids, levels = second.labels_[fine], second.cluster_centers_, 2
    order = np.argsort(-np.bincount(labels, minlength=cfg.clusters), kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    return Clustering(rank[labels].astype(np.int64), np.asarray(fine, np.int64), centroids[order], levels)
