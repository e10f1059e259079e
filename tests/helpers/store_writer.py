"""Child process of the crash and concurrency tests: commits shards in a loop, one line per commit.

usage: store_writer.py STORE ROUNDS FIRST_VERSION [SHARD ...]

Shard ``s`` of round ``r`` holds the value ``s * 1000 + version`` in every cell, where
``version = FIRST_VERSION + r`` is also its commit record's version: a reader can tell from the
record alone what the data must be. ``STORE_WRITER_PAUSE_S`` sleeps between the data write and the
commit record, widening the window a kill can land in.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np

from store import signal as signal_mod
from store.store import Store

SPEC = {"kind": "test", "producer": "store_writer"}
DIM = 8


def shard_values(sig, shard: int, version: int) -> np.ndarray:
    """What the writer puts in ``shard`` at ``version``."""
    return np.full((sig.store_meta.rows_in_shard(shard), DIM), shard * 1000 + version, dtype=sig.dtype)


def main(argv: list[str]) -> None:
    path, rounds, first_version = argv[0], int(argv[1]), int(argv[2])
    pause_s = float(os.environ.get("STORE_WRITER_PAUSE_S", "0"))
    if pause_s:
        save = signal_mod.CommitRecord.save

        def slow_save(record, target):
            time.sleep(pause_s)
            save(record, target)

        signal_mod.CommitRecord.save = slow_save
    sig = Store.open(path).signal("crash", SPEC, dtype="float32", dim=DIM)
    shards = [int(s) for s in argv[3:]] or list(range(sig.num_shards))
    for r in range(rounds):
        for shard in shards:
            sig.write_shard(shard, shard_values(sig, shard, first_version + r), version=first_version + r,
                            lock_timeout_s=float(os.environ.get("STORE_WRITER_LOCK_TIMEOUT_S", "0")))
            print(first_version + r, shard, flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
