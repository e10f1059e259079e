"""The k-means parameters of the selectors that cluster the train rows (coincide, semdedup)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(kw_only=True)
class KMeansParams:
    """How many clusters k-means makes over the train rows' features, and how long it runs."""

    num_clusters: int | None = None
    """k of k-means over the train rows' features (at most the number of rows); unset: ceil(N / cluster_size)."""
    cluster_size: int = 64
    """Target rows per cluster when num_clusters is unset."""
    kmeans_iters: int = 20
    """k-means iterations."""

    def __post_init__(self):
        if self.num_clusters is not None and self.num_clusters < 1:
            raise ValueError("num_clusters must be >= 1 (or unset)")
        if self.cluster_size < 1 or self.kmeans_iters < 1:
            raise ValueError("cluster_size and kmeans_iters must be >= 1")
