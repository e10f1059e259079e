"""`coincide`: a coreset spread over concept clusters by transferability and density (COINCIDE, text variant).

Rows are clustered once (spherical k-means on the stored `hidden` features, a derived signal keyed by
those features, k and seed). Each cluster k gets transferability S_k, the mean cosine of its centroid to
the other centroids, and density D_k, the mean Gaussian kernel exp(-||u_p - u_q||^2) over its pairs of
distinct rows. The budget is shared by P_k = softmax(S / (tau * D)) with largest-remainder quotas capped
at each cluster's size (what a full cluster cannot take goes to the others by P). Inside a cluster the rows
are picked greedily to minimise MMD^2 between the picked rows and the whole cluster under the same kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from stages.kmeans import KMeansClusters

from ..base import Selection, Selector, SignalNeed
from ..registry import SELECTORS
from ..simplex import softmax
from .kmeans_params import KMeansParams
from .reading import train_signal, unit_rows
from .sampling import check_count, largest_remainder
from .summary import selection_info


@dataclass(kw_only=True)
class CoincideParams(KMeansParams):
    """Parameters of the coincide selector (k-means over the train rows' hidden features)."""

    temperature: float = 1.0
    """tau in softmax(S / (tau * D)): smaller concentrates the budget on transferable, diverse clusters."""
    single_member_density: float = 1.0
    """D of a cluster of one row (it has no pair): 1, the kernel's maximum, as a fully dense cluster."""

    def __post_init__(self):
        super().__post_init__()
        if self.temperature <= 0 or self.single_member_density <= 0:
            raise ValueError("temperature and single_member_density must be > 0")


def kernel(x: np.ndarray) -> np.ndarray:
    """Gaussian kernel matrix exp(-||x_p - x_q||^2) of the rows of x (float64)."""
    x = np.asarray(x, dtype=np.float64)
    sq = (x * x).sum(1)
    return np.exp(-np.maximum(sq[:, None] + sq[None, :] - 2 * x @ x.T, 0.0))


def transferability(centroids: np.ndarray) -> np.ndarray:
    """S_k: mean cosine of unit centroid k to the other centroids (0 for a single cluster)."""
    k = centroids.shape[0]
    if k == 1:
        return np.zeros(1)
    sim = centroids @ centroids.T
    return (sim.sum(1) - np.diag(sim)) / (k - 1)


def density(x: np.ndarray, single: float) -> float:
    """D: mean kernel over the ordered pairs of distinct rows of one cluster (`single` for one row)."""
    n = x.shape[0]
    if n < 2:
        return single
    km = kernel(x)
    return float((km.sum() - np.trace(km)) / (n * (n - 1)))


def capped_quotas(total: int, prob: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Integer quotas summing to min(total, sum(sizes)), proportional to prob by largest remainder, none above its
    cluster's size: what a full cluster cannot take is shared again among the others by prob."""
    sizes = np.asarray(sizes, dtype=np.int64)
    quota = np.zeros_like(sizes)
    left = min(int(total), int(sizes.sum()))
    while left > 0:
        room = quota < sizes
        weights = np.where(room, prob, 0.0)
        if weights.sum() <= 0:  # every cluster with room has underflowed to 0: share evenly among them
            weights = room.astype(np.float64)
        quota = np.minimum(quota + largest_remainder(left, weights), sizes)
        left = min(int(total), int(sizes.sum())) - int(quota.sum())
    return quota


def mmd_greedy(km: np.ndarray, m: int) -> np.ndarray:
    """m rows of a cluster (positions in its kernel matrix km) picked one by one, each minimising MMD^2 between the
    picked rows and the whole cluster; ties to the lower position.

    MMD^2(C, S) = mean_{S,S} k - 2 mean_{C,S} k + mean_{C,C} k; the last term does not depend on S.
    """
    n = km.shape[0]
    colsum = km.sum(0)
    picked = np.zeros(n, dtype=bool)
    cross = np.zeros(n)  # sum over picked p of km[p, j]
    within = 0.0  # sum over picked p, q of km[p, q]
    cluster_cross = 0.0  # sum over the cluster's rows p and picked q of km[p, q]
    order = []
    for t in range(1, m + 1):
        score = (within + 2 * cross + np.diag(km)) / t**2 - 2 * (cluster_cross + colsum) / (n * t)
        score[picked] = np.inf
        j = int(np.argmin(score))
        order.append(j)
        picked[j] = True
        within += 2 * cross[j] + km[j, j]
        cluster_cross += colsum[j]
        cross += km[:, j]
    return np.asarray(order, dtype=np.int64)


@SELECTORS.register("coincide")
class CoincideSelector(Selector):
    """Budget per concept cluster by transferability over density, MMD-representative rows inside each."""

    Params = CoincideParams
    consume_once = True  # fixed features: each decision takes its coreset among the rows not served this pass
    paper = ("Lee, Chen, Kim, Chang, Lee: Concept-skill Transferability-based Data Selection for Large "
             "Vision-Language Models (COINCIDE), EMNLP 2024, arXiv 2406.10995")
    rule = ("clusters hidden-layer features once (stored); budget per cluster by softmax(S / (tau * D)) of centroid "
            "transferability and kernel density, capped at cluster size; greedy MMD^2 rows inside each")

    def needs(self) -> list[SignalNeed]:
        """The train rows' stored hidden-layer features (the clustering is derived from them)."""
        return [SignalNeed("hidden", "train", refresh=False)]

    def clusters_stage(self) -> KMeansClusters:
        """The stored clustering these parameters and the seed define."""
        p = self.params
        return KMeansClusters(num_clusters=p.num_clusters, cluster_size=p.cluster_size, seed=self.seed,
                              kmeans_iters=p.kmeans_iters)

    def derivations(self) -> list[tuple]:
        """The clustering, derived from the train rows' hidden features."""
        return [(self.clusters_stage(), "hidden", "train")]

    def select(self, ctx, num_samples: int) -> Selection:
        """Every row once per full pass when more rows are asked than there are, the rest by the rule."""
        k = check_count(num_samples, ctx.num_rows)
        feats = unit_rows(train_signal(ctx, "hidden", 2))
        assign = np.asarray(ctx.signals.derived(self.clusters_stage(), "hidden", "train")).astype(np.int64)
        labels, pos = np.unique(assign, return_inverse=True)
        members = [np.flatnonzero(pos == c) for c in range(labels.size)]
        centroids = unit_rows(np.stack([feats[rows].mean(0) for rows in members]))
        s = transferability(centroids.astype(np.float64))
        d = np.array([density(feats[rows], self.params.single_member_density) for rows in members])
        logits = s / (self.params.temperature * d)
        prob = softmax(logits)
        full, rest = divmod(k, ctx.num_rows)
        quota = capped_quotas(rest, prob, np.array([rows.size for rows in members]))
        picked = [rows[mmd_greedy(kernel(feats[rows]), int(q))] for rows, q in zip(members, quota) if q > 0]
        indices = np.concatenate([np.arange(ctx.num_rows, dtype=np.int64)] * full + picked + [np.empty(0, np.int64)])
        extra = {"num_clusters": int(labels.size), "clusters_used": int((quota > 0).sum()),
                 "transferability_mean": float(s.mean()), "density_mean": float(d.mean()),
                 "top_cluster_prob": float(prob.max())}
        return Selection(indices=indices, info=selection_info(ctx, indices, **extra))
