"""One rank of a two-process gloo group scoring a stored signal with ShardScorer (the rank-split test's child).

usage: rank_scoring.py STORE KEY DIRECTIONS.npy OUT_DIR   (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT in the env)
Writes OUT_DIR/rank<r>.npy (the gathered per-row results) and OUT_DIR/rank<r>.json (the shards this rank read).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import torch.distributed as dist

from pipeline.shard_scoring import ShardScorer, all_gather_objects
from pipeline.strategies.row_maps import UnitProjection
from store.store import Store


def main(store: str, key: str, directions: str, out: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    read: list[int] = []
    scorer = ShardScorer(rank=rank, world_size=dist.get_world_size(), gather=all_gather_objects, block_rows=5)
    here = scorer._here
    scorer._here = lambda sig, fn, shards: read.extend(shards) or here(sig, fn, shards)
    result = scorer.map_rows(Store.open(store).get(key), UnitProjection(np.load(directions)))
    np.save(Path(out) / f"rank{rank}.npy", result)
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(read))
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(*sys.argv[1:])
