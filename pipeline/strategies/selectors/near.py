"""`near`: nearest train rows of each target sample in embedding space (kNN through the FAISS index)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..base import Selection, Selector, SignalNeed
from ..registry import SELECTORS
from .sampling import check_count, ranking, take_ranked
from .summary import selection_info


@dataclass(kw_only=True)
class NearParams:
    """Parameters of the nearest-neighbour selector."""

    order: str = "round_robin"
    """`round_robin`: each target's 1st neighbour, then each one's 2nd, ...; `score`: best similarity first."""

    def __post_init__(self):
        if self.order not in ("round_robin", "score"):
            raise ValueError(f"order must be 'round_robin' or 'score', got {self.order!r}")


def round_robin(scores: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct rows in neighbour-rank order (within a rank, closer pairs first) and their similarity."""
    num_targets, k = ids.shape
    rank = np.broadcast_to(np.arange(k), ids.shape).ravel()
    flat_ids, flat_scores = ids.ravel(), scores.ravel()
    target = np.repeat(np.arange(num_targets), k)
    keep = flat_ids >= 0  # FAISS pads with -1 when it finds fewer than k
    order = np.lexsort((target[keep], -flat_scores[keep], rank[keep]))
    seq_ids, seq_scores = flat_ids[keep][order], flat_scores[keep][order]
    _, first = np.unique(seq_ids, return_index=True)
    first = np.sort(first)
    return seq_ids[first].astype(np.int64), seq_scores[first]


@SELECTORS.register("near", "knn")
class NearSelector(Selector):
    """Serves the train rows closest to the target samples."""

    Params = NearParams
    rule = "exact kNN of each target sample in embedding space (FAISS), round-robin over targets"
    consume_once = True  # embeddings do not change: every decision would retake the same nearest rows

    def needs(self) -> list[SignalNeed]:
        """Embeddings of train and target rows (they do not change with the model being trained)."""
        return [SignalNeed("embed", "train", refresh=False), SignalNeed("embed", "target", refresh=False)]

    def select(self, ctx, num_samples: int) -> Selection:
        """Union of the targets' neighbour lists in rank order, widened until it holds `num_samples` rows."""
        k_total = check_count(num_samples, ctx.num_rows)
        queries = np.asarray(ctx.signals.get("embed", "target"), dtype=np.float32)
        queries = np.atleast_2d(queries)
        wanted = min(k_total, ctx.num_rows)
        k = min(ctx.num_rows, -(-wanted // queries.shape[0]))
        while True:
            scores, ids = ctx.signals.search("embed", queries, k, "train")
            if self.params.order == "round_robin":
                rows, sims = round_robin(np.asarray(scores), np.asarray(ids))
            else:
                rows, sims = best_similarity(np.asarray(scores), np.asarray(ids))
            # In `score` order a row just outside the lists could beat one inside, so widen until safe.
            enough = rows.size >= wanted and (self.params.order == "round_robin" or k >= ctx.num_rows
                                              or _score_cut_safe(scores, sims, wanted))
            if enough or k >= ctx.num_rows:
                break
            # an index search costs about the same at any k (it scans the same lists): widen in big steps
            k = min(ctx.num_rows, 4 * k)
        indices = take_ranked(rows, k_total)
        row_scores = np.full(ctx.num_rows, np.nan)
        row_scores[rows] = sims
        extra = {"neighbours_per_target": int(k), "num_targets": int(queries.shape[0])}
        return Selection(indices=indices, scores=row_scores, info=selection_info(ctx, indices, row_scores, **extra))


def best_similarity(scores: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct rows by their best similarity to any target, highest first (ties by row id)."""
    keep = ids >= 0
    flat_ids, flat_scores = ids[keep].astype(np.int64), scores[keep]
    best = np.full(int(flat_ids.max()) + 1 if flat_ids.size else 0, -np.inf)
    np.maximum.at(best, flat_ids, flat_scores)
    rows = np.flatnonzero(np.isfinite(best))
    order = ranking(best[rows])
    return rows[order], best[rows][order]


def _score_cut_safe(scores: np.ndarray, sims: np.ndarray, wanted: int) -> bool:
    """Every unseen row is below each target's last listed similarity, so it cannot beat the cut."""
    return bool(sims[wanted - 1] >= np.max(np.asarray(scores)[:, -1]))
