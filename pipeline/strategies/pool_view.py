"""A decision context restricted to a pool of rows: what a stage after a filter sees.

Row i of the view is row pool[i] of the train set; train signals are sliced to the pool, target signals
are untouched, and the view's kNN search is exact over the pool's rows. A strategy written for the whole
train set thus works unchanged on a filtered pool; its row ids are mapped back with `pool[ids]`.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from .context import DecisionContext, exact_search
from .row_maps import RowMap


class PoolSignals:
    """A SignalSource over the rows `pool` of another one's train split."""

    def __init__(self, base, pool: np.ndarray):
        self.base = base
        self.pool = np.asarray(pool, dtype=np.int64)

    def get(self, name: str, split: str = "train") -> np.ndarray:
        values = self.base.get(name, split)
        return np.asarray(values)[self.pool] if split == "train" else values

    def get_all(self, name: str, split: str = "train") -> list[tuple[dict, np.ndarray]]:
        variants = self.base.get_all(name, split)
        return [(m, np.asarray(v)[self.pool]) for m, v in variants] if split == "train" else variants

    def get_rows_all(self, name: str, rows: np.ndarray, split: str = "train") -> list[tuple[dict, np.ndarray]]:
        rows = np.asarray(rows, dtype=np.int64)
        return self.base.get_rows_all(name, self.pool[rows] if split == "train" else rows, split)

    def derived(self, stage, source: str, split: str = "train") -> np.ndarray:
        """Derived from every row of the train set (what the store keys), then sliced to the pool."""
        values = self.base.derived(stage, source, split)
        return np.asarray(values)[self.pool] if split == "train" else values

    def variants(self, name: str, split: str = "train") -> list[tuple[dict, tuple[int, ...]]]:
        variants = self.base.variants(name, split)
        return [(m, (self.pool.size, *shape[1:])) for m, shape in variants] if split == "train" else variants

    def map_rows(self, name: str, fn: RowMap, split: str = "train", variant: int = -1) -> np.ndarray:
        values = self.base.map_rows(name, fn, split, variant)  # per-row results are O(N): slicing them is cheap
        return values[self.pool] if split == "train" else values

    def search(self, name: str, queries: np.ndarray, k: int, split: str = "train"):
        if split != "train":
            return self.base.search(name, queries, k, split)
        # the pool's rows only (read shard by shard from a store), never a whole copy of the train signal
        return exact_search(self.base.get_rows_all(name, self.pool, split)[-1][1], queries, k)


def pool_context(ctx: DecisionContext, pool: np.ndarray | None) -> DecisionContext:
    """`ctx` seen through a pool of rows (itself when the pool is every row)."""
    if pool is None:
        return ctx
    pool = np.asarray(pool, dtype=np.int64)
    return replace(ctx, num_rows=int(pool.size), domain_ids=np.asarray(ctx.domain_ids)[pool],
                   signals=PoolSignals(ctx.signals, pool))
