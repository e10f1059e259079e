"""SemDeDup's keep mask (Abbas et al. 2023): k-means on unit embeddings, near-duplicates dropped per cluster.

Within each cluster, rows are visited from the least to the most typical (increasing cosine to the
cluster's centroid, ties by row id), as the paper keeps the "hard" row of a duplicate group, the one
farthest from its centroid; a row is dropped when its cosine to a row kept before it exceeds 1 - eps.
The paper's code drops a row similar to any row before it, dropped or not; comparing with kept rows only
keeps the far end of a chain a ~ b ~ c whose ends are not duplicates of each other.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from stages.derived import DerivedStage
from stages.kmeans import cluster_count, spherical_kmeans
from stages.vectors import unit_rows


def dedup_cluster(x: np.ndarray, centroid: np.ndarray, eps: float) -> np.ndarray:
    """Keep flags of one cluster's unit rows: visited least typical first, dropped when within 1 - eps of a kept one."""
    order = np.lexsort((np.arange(x.shape[0]), x @ centroid))
    keep = np.zeros(x.shape[0], dtype=bool)
    kept: list[int] = []
    for i in order:
        if not kept or float(np.max(x[kept] @ x[i])) <= 1.0 - eps:
            keep[i] = True
            kept.append(int(i))
    return keep


@dataclass(frozen=True)
class SemDedupMask(DerivedStage):
    """Signal `semdedup`: 1 for a row kept, 0 for a near-duplicate of a kept row of its cluster."""

    name = "semdedup"
    code_version = "semdedup-1"

    num_clusters: int | None
    """k of k-means (at most the number of rows); None: ceil(N / cluster_size)."""
    cluster_size: int
    """Target rows per cluster when num_clusters is None."""
    eps: float
    """A row is a duplicate when its cosine to a kept row exceeds 1 - eps."""
    seed: int
    """Seed of the k-means initialisation."""
    kmeans_iters: int = 20
    """k-means iterations."""

    def derive(self, values: np.ndarray) -> np.ndarray:
        x = unit_rows(values)
        k = cluster_count(x.shape[0], self.num_clusters, self.cluster_size)
        assign, centroids = spherical_kmeans(x, k, iters=self.kmeans_iters, seed=self.seed)
        keep = np.zeros(x.shape[0], dtype=np.float32)
        for c in np.unique(assign):
            rows = np.flatnonzero(assign == c)
            keep[rows] = dedup_cluster(x[rows], centroids[c], self.eps)
        return keep
