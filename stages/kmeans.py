"""Seeded spherical k-means with FAISS: cluster ids and unit centroids of unit-norm rows, and the stored
clustering of a signal (a derived signal keyed by the source signal, k and seed)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from stages.derived import DerivedStage
from stages.vectors import l2_normalise


def cluster_count(num_rows: int, num_clusters: int | None, cluster_size: int) -> int:
    """k of a clustering: `num_clusters`, else ceil(num_rows / cluster_size) (spherical_kmeans caps it at the rows)."""
    return num_clusters or -(-num_rows // cluster_size)


def spherical_kmeans(x: np.ndarray, num_clusters: int, *, iters: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(cluster id of every row (N,), unit centroids (k, d)), k = min(num_clusters, N); rows are assigned by
    the largest inner product, so on unit rows by cosine."""
    import faiss  # heavy: imported by the stages that cluster

    x = np.ascontiguousarray(x, dtype=np.float32)
    k = max(1, min(int(num_clusters), x.shape[0]))
    if k == 1:
        centroid = x.mean(0, keepdims=True)
        return np.zeros(x.shape[0], dtype=np.int64), centroid / max(float(np.linalg.norm(centroid)), 1e-12)
    km = faiss.Kmeans(x.shape[1], k, niter=iters, seed=seed, verbose=False, spherical=True,
                      min_points_per_centroid=1, max_points_per_centroid=max(256, x.shape[0]))
    km.train(x)
    _, assign = km.index.search(x, 1)
    return assign[:, 0].astype(np.int64), np.asarray(km.centroids, dtype=np.float32)


@dataclass(frozen=True)
class KMeansClusters(DerivedStage):
    """Signal `kmeans`: the spherical k-means cluster id of every row of a source signal (float32 ids)."""

    name = "kmeans"
    code_version = "kmeans-1"

    num_clusters: int | None
    """k (at most the number of rows); None: ceil(N / cluster_size)."""
    cluster_size: int
    """Target rows per cluster when num_clusters is None."""
    seed: int
    """Seed of the k-means initialisation."""
    kmeans_iters: int = 20
    """k-means iterations."""

    def derive(self, values: np.ndarray) -> np.ndarray:
        x = l2_normalise(values)
        k = cluster_count(x.shape[0], self.num_clusters, self.cluster_size)
        assign, _ = spherical_kmeans(x, k, iters=self.kmeans_iters, seed=self.seed)
        return assign.astype(np.float32)
