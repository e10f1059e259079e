"""Writer of the crash soak: commits shards of two signals in a loop, one line per commit.

usage: soak_store_writer.py STORE TARGET_GENERATION [PAUSE_S]

Each pass picks the shard with the lowest generation and commits the values
``soak_values(shard, generation)``, a deterministic function of the two, so whoever reads the store
can tell from a commit record alone what its shard must hold. It stops when every shard of both
signals has reached TARGET_GENERATION. ``PAUSE_S`` sleeps between the data write and the commit
record, widening the window a kill lands in. Also run in a forkserver child (``run_child``).
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np

from store import signal as signal_mod
from store.store import Store

SIGNALS = (("soak32", "float32", 4), ("soak16", "float16", None))
SPEC = {"kind": "soak", "producer": "soak_store_writer"}


def soak_values(sig, shard: int, generation: int) -> np.ndarray:
    """What shard ``shard`` of ``sig`` holds at ``generation``: varied, never constant rows."""
    rng = np.random.default_rng([shard, generation, 0 if sig.dim is None else sig.dim])
    shape = (sig.store_meta.rows_in_shard(shard), *sig.meta.row_shape)
    return rng.uniform(-100, 100, shape).astype(sig.dtype)


def open_signals(path) -> list:
    store = Store.open(path)
    return [store.signal(name, SPEC, dtype=dtype, dim=dim) for name, dtype, dim in SIGNALS]


def write_loop(path, target_generation: int, pause_s: float, out) -> None:
    """Bring every shard to ``target_generation``; write `NAME SHARD GENERATION` to ``out`` per commit."""
    if pause_s:
        save = signal_mod.CommitRecord.save

        def slow_save(record, target):
            time.sleep(pause_s)
            save(record, target)

        signal_mod.CommitRecord.save = slow_save
    sigs = open_signals(path)
    while True:
        todo = []
        for i, sig in enumerate(sigs):
            recs = sig.records()
            for shard in range(sig.num_shards):
                gen = -1 if shard not in recs else recs[shard].generation
                if gen < target_generation:
                    todo.append((gen, i, shard))
        if not todo:
            return
        gen, i, shard = min(todo)
        sig = sigs[i]
        rec = sig.write_shard(shard, soak_values(sig, shard, gen + 1), version=gen + 1, model="soak")
        assert rec.generation == gen + 1
        out.write(f"{sig.name} {shard} {rec.generation}\n")
        out.flush()


def run_child(target, args: tuple, out_path: str) -> None:
    """Entry of a child process: ``target(*args, out)`` with ``out`` a line-buffered file."""
    with open(out_path, "a", buffering=1) as out:
        target(*args, out)


if __name__ == "__main__":
    args = sys.argv[1:]
    write_loop(args[0], int(args[1]), float(args[2]) if len(args) > 2 else 0.0, sys.stdout)
    os._exit(0)
