"""`semdedup`: the rows left after semantic deduplication of the stored embeddings (SemDeDup).

The keep mask is a derived signal (stages/semdedup.py): k-means on every train row's embedding, then, in
each cluster, a row whose cosine to a kept row exceeds 1 - eps is dropped. It is stored under the
embedding signal's key, k, eps and seed, so a run computes it once and the next run reuses it (a new
embedding signal, or recomputed embedding shards, make a new one). As a `filter` stage it keeps every
non-duplicate row of the pool (keep_ratio 1; a smaller keep_ratio keeps a uniform share of them); drawing
a window, it draws uniformly among them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from stages.semdedup import SemDedupMask
from store.errors import FlexfeedError

from ..base import Selection, Selector, SignalNeed
from ..registry import SELECTORS
from .kmeans_params import KMeansParams
from .sampling import check_count, uniform_sample
from .summary import selection_info


@dataclass(kw_only=True)
class SemDedupParams(KMeansParams):
    """Parameters of the semdedup selector (k-means over the train rows' embeddings)."""

    eps: float = 0.05
    """Duplicates are rows whose cosine to a kept row of their cluster exceeds 1 - eps (the paper's epsilon)."""

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.eps < 2:
            raise ValueError(f"eps must be in [0, 2) (a cosine threshold 1 - eps), got {self.eps}")


@SELECTORS.register("semdedup")
class SemDedupSelector(Selector):
    """Keeps one row of each group of semantic near-duplicates."""

    Params = SemDedupParams
    paper = ("Abbas, Tirumala, Simig, Ganguli, Morcos: SemDeDup: Data-efficient learning at web-scale through "
             "semantic deduplication, arXiv 2303.09540 (2023)")
    rule = ("drops rows whose embedding cosine to a kept row of their k-means cluster exceeds 1 - eps "
            "(least typical row of a group kept); the mask is stored, keyed by embeddings, k, eps and seed")

    def needs(self) -> list[SignalNeed]:
        """The train rows' stored embeddings (the mask is derived from them)."""
        return [SignalNeed("embed", "train", refresh=False)]

    def mask_stage(self) -> SemDedupMask:
        """The derived keep-mask signal these parameters and the seed define."""
        p = self.params
        return SemDedupMask(num_clusters=p.num_clusters, cluster_size=p.cluster_size, eps=p.eps, seed=self.seed,
                            kmeans_iters=p.kmeans_iters)

    def derivations(self) -> list[tuple]:
        """The keep mask, derived from the train rows' embeddings."""
        return [(self.mask_stage(), "embed", "train")]

    def select(self, ctx, num_samples: int) -> Selection:
        """The kept rows (all of them when num_samples covers them, else a uniform draw of num_samples)."""
        k = check_count(num_samples, ctx.num_rows)
        keep = np.asarray(ctx.signals.derived(self.mask_stage(), "embed", "train")) > 0.5
        kept = np.flatnonzero(keep)
        if kept.size == 0:
            raise FlexfeedError("every row of the pool is a near-duplicate of a row an earlier filter removed",
                                "put the semdedup filter first in the plan")
        indices = kept if k >= kept.size else np.sort(uniform_sample(ctx.rng, kept, k))
        return Selection(indices=indices, info=selection_info(ctx, indices, num_kept=int(kept.size),
                                                              num_duplicates=int(keep.size - kept.size)))
