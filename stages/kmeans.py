"""Seeded spherical k-means with FAISS: cluster ids and unit centroids of unit-norm rows."""

from __future__ import annotations

import numpy as np


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
