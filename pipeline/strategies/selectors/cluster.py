"""`cluster`: k-means over embeddings, a few rows per cluster scored, clusters drawn by softmax of score.

Scoring every row's gradient is the expensive part of LESS; here only `samples_per_cluster` rows
of each cluster are scored (LESS cosine to the target gradients, or the current loss) and their
mean stands for the whole cluster. Cluster scores are standardised across clusters before the
softmax, so `temperature` is unit-free (learning rates scale LESS scores by orders of magnitude).
Rows are then drawn without replacement with weight softmax(z_c / temperature) / |c|: a sequential
draw picks a cluster in proportion to its remaining mass, then a row of it uniformly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from stages.kmeans import cluster_count, spherical_kmeans

from ..base import Selection, Selector, SignalNeed
from ..registry import SELECTORS
from ..simplex import softmax
from .kmeans_params import KMeansParams
from .less import less_scores
from .reading import train_signal
from .sampling import check_count, weighted_sample
from .summary import selection_info


@dataclass(kw_only=True)
class ClusterParams(KMeansParams):
    """Parameters of the cluster selector (k-means over the train rows' embeddings)."""

    samples_per_cluster: int = 3
    """Rows scored per cluster at each decision (drawn afresh each time)."""
    score: Literal["grads", "loss"] = "grads"
    """`grads` (LESS cosine to the target gradients) or `loss` (current loss, higher preferred)."""
    temperature: float = 1.0
    """Softmax temperature over standardised cluster scores; smaller concentrates on the best clusters."""

    def __post_init__(self):
        super().__post_init__()
        if self.samples_per_cluster < 1:
            raise ValueError("samples_per_cluster must be >= 1")
        if self.score not in ("grads", "loss"):
            raise ValueError(f"score must be 'grads' or 'loss', got {self.score!r}")
        if self.temperature <= 0:
            raise ValueError("temperature must be > 0")


@SELECTORS.register("cluster", "cluster_less")
class ClusterSelector(Selector):
    """Scores clusters from a few members each and samples rows cluster by cluster."""

    Params = ClusterParams
    rule = ("k-means on embeddings, LESS gradient (or loss) scores of a few rows per cluster, clusters drawn by "
            "softmax of their standardised score")

    def __init__(self, params=None, seed: int = 0):
        super().__init__(params, seed)
        self.assignment: np.ndarray | None = None  # embeddings are fixed, so the clustering is kept

    def needs(self) -> list[SignalNeed]:
        """Embeddings for clustering, plus gradients (LESS) or the current loss for scoring."""
        if self.params.score == "grads":
            # gradients of the probe rows only (computed when scored), the target's for all its rows
            scoring = [SignalNeed("grads", "train", rows="probe"), SignalNeed("grads_sgd", "target")]
        else:
            scoring = [SignalNeed("loss", "train", rows="probe")]
        return [SignalNeed("embed", "train", refresh=False), *scoring]

    def clusters(self, ctx) -> np.ndarray:
        """The cluster id of every row (computed at the first decision, then kept)."""
        if self.assignment is None or self.assignment.shape[0] != ctx.num_rows:
            emb = train_signal(ctx, "embed", 2)
            k = cluster_count(ctx.num_rows, self.params.num_clusters, self.params.cluster_size)
            self.assignment, _ = spherical_kmeans(emb, k, iters=self.params.kmeans_iters, seed=self.seed)
        return self.assignment

    def select(self, ctx, num_samples: int) -> Selection:
        """Score sampled members, give each cluster softmax weight, draw rows by cluster weight / size."""
        k = check_count(num_samples, ctx.num_rows)
        assign = self.clusters(ctx)
        labels, sizes = np.unique(assign, return_counts=True)
        probes = np.concatenate([
            ctx.rng.choice(np.flatnonzero(assign == c), size=min(self.params.samples_per_cluster, n), replace=False)
            for c, n in zip(labels, sizes)
        ])
        if self.params.score == "grads":
            probe_scores = less_scores(ctx, rows=probes)
        else:
            ((_, probe_loss),) = ctx.signals.get_rows_all("loss", probes, "train")
            probe_scores = np.asarray(probe_loss, dtype=np.float64).reshape(len(probes), -1)[:, 0]
        finite = probe_scores[np.isfinite(probe_scores)]
        # A row without a usable score counts as the worst scored one, not as a hole in the mean.
        probe_scores = np.where(np.isfinite(probe_scores), probe_scores, finite.min() if finite.size else 0.0)
        pos = np.searchsorted(labels, assign[probes])
        cluster_score = np.bincount(pos, weights=probe_scores, minlength=labels.size) / np.bincount(
            pos, minlength=labels.size)
        spread = cluster_score.std()
        z = (cluster_score - cluster_score.mean()) / spread if spread > 0 else np.zeros_like(cluster_score)
        cluster_prob = softmax(z / self.params.temperature)
        row_pos = np.searchsorted(labels, assign)
        row_weight = cluster_prob[row_pos] / sizes[row_pos]
        indices = weighted_sample(ctx.rng, row_weight, k)
        row_scores = cluster_score[row_pos]
        extra = {"num_clusters": int(labels.size), "num_scored": int(probes.size),
                 "top_cluster_prob": float(cluster_prob.max())}
        return Selection(indices=indices, scores=row_scores, info=selection_info(ctx, indices, row_scores, **extra))

    def state_dict(self) -> dict:
        """The cluster assignment (so a resumed run does not re-cluster)."""
        return {"assignment": None if self.assignment is None else self.assignment.copy()}

    def load_state_dict(self, state: dict) -> None:
        """Restore the cluster assignment."""
        a = state.get("assignment")
        self.assignment = None if a is None else np.asarray(a, dtype=np.int64).copy()
