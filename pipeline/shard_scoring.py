"""Per-row results of a stored signal, computed shard by shard: in this process, split across ranks, or on Dask.

A strategy's `RowMap` (pipeline/strategies/row_maps.py) turns rows into a few numbers each. `ShardScorer`
applies it to one committed shard at a time (read as stored, float16; float32 one small block at a time), so a
decision holds a few shards and the (N, ...) results, never the signal: memory is flat in N x d x
checkpoints. With several ranks, each reads a contiguous share of the shards and the results are
all-gathered, identical on every rank. With `runner.scheduler` naming a Dask cluster, each shard is a task:
it opens the store, reads the shard's committed slot from its commit record (with the read-time checksum
check, store/signal.py), and returns the shard's results; the driver concatenates them in row order and the
strategy reduces (top-k, per-domain sums). Results are cached by the signal's state hash and the rule's
key, one entry per signal and rule kind, so a decision over unchanged signals reads nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from store.errors import FlexfeedError
from store.store import Store

from .strategies.row_maps import RowMap, apply_blocks, no_rows

Gather = Callable[[object], list]
"""Every rank's object, in rank order, on every rank (a collective: every rank calls it)."""


def score_shard(store_root: str, key: str, shard: int, fn: RowMap, block_rows: int | None = None
                ) -> tuple[int, np.ndarray]:
    """One Dask task: the committed slot of one shard (from its commit record, checksum-checked) scored by ``fn``."""
    values = Store.open(store_root).get(key).read_shard(shard)
    return shard, apply_blocks(fn, values, block_rows)


def rank_shards(num_shards: int, rank: int, world_size: int) -> range:
    """A rank's contiguous share of the shards (so the gathered results concatenate in row order)."""
    return range(num_shards * rank // world_size, num_shards * (rank + 1) // world_size)


def all_gather_objects(obj) -> list:
    """``obj`` of every rank in rank order (torch.distributed; [obj] outside a process group)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


@dataclass
class ShardScorer:
    """Applies RowMaps to signals shard by shard for a run; holds the run's per-row result cache."""

    rank: int = 0
    world_size: int = 1
    gather: Gather | None = None
    """All-gather of the ranks' results; None reads every shard on this rank."""
    scheduler: str | None = None
    """Address of a Dask scheduler whose workers score the shards; None scores them in this process."""
    block_rows: int | None = None
    """Rows converted to float32 at a time; None: about `row_maps.BLOCK_BYTES` of them."""
    _cache: dict = field(default_factory=dict, repr=False)
    _client: object = field(default=None, repr=False)

    def map_rows(self, sig, fn: RowMap) -> np.ndarray:
        """``fn`` over every row of ``sig`` (every shard committed): (N, ...) results, cached by state and rule."""
        if sig.dim != fn.dim:
            raise FlexfeedError(f"signal {sig.name!r} has {sig.dim or 1} values per row, the strategy's rule reads "
                                f"{fn.dim}", "compute the train and target signals with the same model and projection")
        state = sig.state_hash()
        slot = (sig.key, type(fn).__name__)
        hit = self._cache.get(slot)
        if hit is not None and hit[0] == (state, fn.key):
            return hit[1]
        missing = sig.num_shards - len(sig.records())
        if missing:
            raise FlexfeedError(f"signal {sig.name!r} lacks {missing} of {sig.num_shards} shards",
                                "run `flexfeed stage all CONFIG` (or let the run compute them)")
        split = self.gather is not None and self.world_size > 1
        mine = rank_shards(sig.num_shards, self.rank, self.world_size) if split else range(sig.num_shards)
        part = self._scheduled(sig, fn, mine) if self.scheduler else self._here(sig, fn, mine)
        result = np.concatenate(self.gather(part)) if split else part
        result.setflags(write=False)  # shared between decisions: strategies must not modify it
        self._cache[slot] = ((state, fn.key), result)
        return result

    def _here(self, sig, fn: RowMap, shards: range) -> np.ndarray:
        parts = [apply_blocks(fn, values, self.block_rows) for _, _, values in sig.iter_shards(list(shards))]
        return np.concatenate(parts) if parts else no_rows(fn)

    def _scheduled(self, sig, fn: RowMap, shards: range) -> np.ndarray:
        client = self._connect()
        fn_future = client.scatter(fn, broadcast=True)  # the rule's arrays travel once, not once per shard
        root = str(sig.dir.parents[1])  # the store root (<root>/signals/<key>)
        futures = [client.submit(score_shard, root, sig.key, shard, fn_future, self.block_rows, pure=False)
                   for shard in shards]
        parts = dict(client.gather(futures))
        return np.concatenate([parts[s] for s in shards]) if parts else no_rows(fn)

    def _connect(self):
        if self._client is None:
            from stages.args import RunnerArgs
            from stages.runner import open_client

            self._client, _ = open_client(RunnerArgs(scheduler=self.scheduler))
        return self._client

    def close(self) -> None:
        """Disconnect from the Dask scheduler (the cluster keeps running)."""
        if self._client is not None:
            self._client.close()
            self._client = None
