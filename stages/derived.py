"""Signals computed from a whole other signal at once: a clustering, a deduplication mask.

A per-row stage maps a shard of rows to a shard of values and is fanned out shard by shard. A derived
stage needs every row of its source together (k-means clusters the whole set), so `derive_signal` reads
the complete source signal, computes every row, and commits the result shard by shard like any signal.
Its key is the source signal's key plus the stage's parameters and code version: the next run with the
same source and parameters reuses it. Each commit record names a digest of the source's shard checksums,
so a source whose values were recomputed in place (repaired, refreshed) makes it recompute.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np

from store.errors import FlexfeedError
from store.hashing import stable_hash
from store.layout import LOCKS_DIR
from store.locks import FileLock
from store.signal import Signal
from store.store import Store


@dataclasses.dataclass(frozen=True)
class DerivedStage:
    """A pure function of a whole source signal; subclasses are frozen dataclasses of their parameters."""

    name: ClassVar[str] = ""
    """Store signal name of the result."""
    code_version: ClassVar[str] = "1"
    """Bump when the numerics change: part of the key."""
    dtype: ClassVar[str] = "float32"

    def params(self) -> dict:
        """What decides the values besides the source: every field of the dataclass."""
        return dataclasses.asdict(self)

    def derive(self, values: np.ndarray) -> np.ndarray:
        """Source values (N, d) -> one value per row (N,)."""
        raise NotImplementedError


def source_digest(source: Signal) -> str:
    """Changes when any shard of the source holds other values (recommitting equal values leaves it)."""
    return stable_hash(sorted((shard, rec.checksum) for shard, rec in source.records().items()))


def derived_spec(stage: DerivedStage, source: Signal) -> dict:
    """The derived signal's content spec: its source's key, its parameters and its code."""
    return {"kind": stage.name, "source": source.key, "params": stage.params(), "code": stage.code_version}


def _fresh(sig: Signal, digest: str) -> bool:
    records = sig.records()
    return len(records) == sig.num_shards and all(r.model == digest for r in records.values())


def check_complete(source: Signal) -> None:
    """Refuse a source some of whose shards are not committed (a derivation reads every row)."""
    if not source.is_complete():
        raise FlexfeedError(f"signal {source.name!r} has {len(source.records())} of {source.num_shards} shards "
                            "committed, and a derived signal reads every row", "run `flexfeed stage all CONFIG`")


def derive_signal(stage: DerivedStage, source: Signal, store: Store) -> tuple[np.ndarray, bool]:
    """The derived values of `source`, stored in `store`: reused when stored for the source's current values,
    else computed and committed. Returns (values (N,), whether they were computed now)."""
    check_complete(source)
    spec = derived_spec(stage, source)
    digest = source_digest(source)
    key = store.signal_key(stage.name, spec, stage.dtype, None)
    # one process computes; another job asking meanwhile waits and then reuses its result
    with FileLock(store.root / LOCKS_DIR / f"derive-{key}.lock", timeout_s=3600, what=f"derived signal {stage.name!r}"):
        sig = store.signal(stage.name, spec, dtype=stage.dtype, sources={"source": source.name})
        if _fresh(sig, digest):
            return sig.read_all(), False
        values = np.asarray(stage.derive(source.read_all()), dtype=stage.dtype)
        if values.shape != (sig.num_rows,):
            raise FlexfeedError(f"derived signal {stage.name!r} has shape {values.shape}, expected ({sig.num_rows},)",
                                f"fix {type(stage).__name__}.derive")
        for shard in range(sig.num_shards):
            start, stop = sig.shard_range(shard)
            sig.write_shard(shard, values[start:stop], version=0, model=digest, lock_timeout_s=600)
    return values, True
