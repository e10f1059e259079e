"""A reorder that takes the budget: the run's rows ordered by a pattern over the rest of the run.

From the sample offset where the reorder first fires to the end of the step budget, rows are served in
passes over the pool (full passes, then a uniformly drawn part of the pool for the last, shorter one),
so the plan covers exactly the samples that will be trained: nothing is cut off or replayed.

Each pass fixes its *slots* once: the pattern applied to rank positions 0..L-1 says which score rank
each position of the pass serves (for `sorting`, rank i at position i; for `folding`, the strided
sweeps). Rows are then placed by their scores' ranks. When the reorder fires again with fresh scores
(e.g. the live loss), the rows of the current pass that were not served yet are re-ranked and placed
into the remaining slots in rank order, and later passes are re-placed the same way: the pattern is
realised over the whole run, not restarted from its head at each re-score. Each slot keeps the score its
row was placed by, so what a run served can be drawn along the step axis (`flexfeed report`).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ...plan import rng_for


def _place(rows: np.ndarray, scores: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows (and their scores) at their slots: the slot with the k-th smallest target gets the row of the
    k-th smallest score."""
    by_score = np.argsort(scores, kind="stable")
    slot_rank = np.empty(targets.size, dtype=np.int64)
    slot_rank[np.argsort(targets, kind="stable")] = np.arange(targets.size)
    return rows[by_score][slot_rank], scores[by_score][slot_rank]


class CurriculumStream:
    """Row ids for the samples [origin, total) of a run, in passes realising a reorder's pattern."""

    def __init__(self, total_samples: int):
        self.total = int(total_samples)
        self.origin: int | None = None
        self.rows: np.ndarray | None = None
        self.scores: np.ndarray | None = None  # the score each sample's row was placed by (NaN: not placed)
        self.pool: np.ndarray | None = None
        # {"start": sample offset, "rows": pass rows in slot order, "targets": ranks, "scores": each row's score}
        self.passes: list[dict] = []

    @property
    def ready(self) -> bool:
        return self.rows is not None

    def refill(self, offset: int, pool: np.ndarray, scores_of: Callable[[np.ndarray], np.ndarray],
               order: Callable[[np.ndarray, np.ndarray, int], np.ndarray], seed: int) -> None:
        """(Re)order the stream from `offset` on: fresh scores, the same slots for passes already laid out."""
        pool = np.asarray(pool, dtype=np.int64)
        same_pool = self.ready and self.pool is not None and np.array_equal(self.pool, np.sort(pool))
        if not same_pool:
            self._lay_out(offset, pool, order, seed)
        for p in self.passes:
            if p["start"] + p["rows"].size <= offset:
                continue
            done = max(0, offset - p["start"])
            rows, scores = _place(p["rows"][done:], np.asarray(scores_of(p["rows"][done:]), dtype=np.float64),
                                  p["targets"][done:])
            p["rows"] = np.concatenate([p["rows"][:done], rows])
            p["scores"] = np.concatenate([p["scores"][:done], scores])
        self._join()

    def _join(self) -> None:
        """The passes as one stream of rows and scores (what windows slice)."""
        self.rows = np.concatenate([p["rows"] for p in self.passes]) if self.passes else np.empty(0, dtype=np.int64)
        self.scores = np.concatenate([p["scores"] for p in self.passes]) if self.passes else np.empty(0)

    def _lay_out(self, offset: int, pool: np.ndarray, order, seed: int) -> None:
        """Passes from `offset` to the end of the budget, each with its slots fixed by the pattern."""
        self.origin, self.passes, self.pool = offset, [], np.sort(pool)
        start, k = offset, 0
        while start < self.total and pool.size:
            length = min(pool.size, self.total - start)
            rows = pool if length == pool.size else np.sort(rng_for(seed, 800, k).choice(pool, length, replace=False))
            ranks = np.arange(length)
            targets = np.asarray(order(ranks, ranks.astype(np.float64), int(rng_for(seed, 801, k).integers(2**31))))
            self.passes.append({"start": start, "rows": rows.copy(), "targets": targets,
                                "scores": np.full(length, np.nan)})
            start += length
            k += 1

    def slice(self, offset: int, count: int) -> np.ndarray:
        """Row ids of samples [offset, offset + count)."""
        i = offset - self.origin
        out = self.rows[i : i + count]
        if out.size != count:
            raise ValueError(f"the reorder stream covers samples up to {self.total}, asked for {offset + count}")
        return out

    def score_slice(self, offset: int, count: int) -> np.ndarray:
        """The scores the rows of samples [offset, offset + count) were placed by (NaN: not recorded)."""
        i = offset - self.origin
        return self.scores[i : i + count]

    def state_dict(self) -> dict:
        if not self.ready:
            return {}
        return {"origin": self.origin, "pool": self.pool, "passes": [dict(p) for p in self.passes]}

    def load_state_dict(self, state: dict) -> None:
        if not state:
            self.origin, self.rows, self.scores, self.passes, self.pool = None, None, None, [], None
            return
        self.origin = int(state["origin"])
        self.pool = np.asarray(state["pool"], dtype=np.int64)
        self.passes = [{"start": int(p["start"]), "rows": np.asarray(p["rows"], dtype=np.int64),
                        "targets": np.asarray(p["targets"], dtype=np.int64),
                        "scores": np.asarray(p["scores"], dtype=np.float64)}
                       for p in state["passes"]]
        self._join()
