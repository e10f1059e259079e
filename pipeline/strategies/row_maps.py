"""Per-row functions of a signal: what a strategy hands the signal source to score rows block by block.

A strategy that reduces every row of a large signal to a few numbers (a cosine to the target centres, a
mean or max similarity to anchors) does not need the signal in memory: it describes the per-row rule as a
`RowMap`, and the signal source applies it shard by shard (float16 as stored, float32 one block of about
`BLOCK_BYTES` at a time), in this process, split across ranks or as Dask tasks, and keeps only the
(N, ...) results. A RowMap is a small picklable value; its `key` names the rule and its parameters, so the
results are cached while neither the signal's state nor the rule changes.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from stages.vectors import unit_rows
from store.errors import FlexfeedError

BLOCK_BYTES = 2 << 20
"""float32 bytes converted and scored at a time: the block stays in the last-level cache from its conversion to its
product (at 4096-8192 dims 1.4-1.8x faster than 4096-row blocks, which were 3-5x faster than 65,536-row ones)."""
BLOCK_ROWS = 4096
"""Rows per block at most (narrow signals, and readers that take rows in blocks)."""


def array_digest(x: np.ndarray) -> str:
    """A content hash of an array's dtype, shape and bytes (part of a RowMap's key)."""
    x = np.ascontiguousarray(x)
    h = hashlib.sha256(f"{x.dtype.str}{x.shape}".encode())
    h.update(x.view(np.uint8).reshape(-1).data)
    return h.hexdigest()[:20]


class RowMap(Protocol):
    """A per-row rule: float32 (rows, dim) blocks in, (rows, ...) results out; picklable (Dask ships it)."""

    @property
    def dim(self) -> int:
        """Columns of the signal it reads."""

    @property
    def key(self) -> str:
        """Names the rule and its parameters: equal keys give equal results on equal values."""

    def __call__(self, block: np.ndarray) -> np.ndarray:
        """The results of one block of rows (the block is a fresh copy the rule may overwrite)."""


@dataclass(frozen=True, eq=False)
class UnitProjection:
    """unit(x) @ directions: each row's cosine-style score against fixed direction columns (LESS's task centres,
    ADAPT's mean anchor). float32 rows as LESS normalises them, or float64 as ADAPT does."""

    directions: np.ndarray
    """(d, m) columns the unit rows are projected onto; the result is (rows, m) float64."""
    float64: bool = False
    """Normalise and multiply in float64 (ADAPT's precision) instead of float32 (LESS's)."""

    @property
    def dim(self) -> int:
        return int(self.directions.shape[0])

    @property
    def key(self) -> str:
        return f"unit_projection/{int(self.float64)}/{array_digest(self.directions)}"

    def __call__(self, block: np.ndarray) -> np.ndarray:
        dtype = np.float64 if self.float64 else np.float32
        return (unit_rows(block, dtype, overwrite=True) @ np.asarray(self.directions, dtype=dtype)).astype(np.float64)


@dataclass(frozen=True, eq=False)
class UnitMaxCosine:
    """max over anchors of cos(x, a), in float64: each row's similarity to its nearest anchor (ADAPT's `max`)."""

    anchors: np.ndarray
    """(M, d) anchor rows, already unit length."""

    @property
    def dim(self) -> int:
        return int(self.anchors.shape[1])

    @property
    def key(self) -> str:
        return f"unit_max_cosine/{array_digest(self.anchors)}"

    def __call__(self, block: np.ndarray) -> np.ndarray:
        return (unit_rows(block, np.float64, overwrite=True) @ np.asarray(self.anchors, dtype=np.float64).T).max(axis=1)




def float_block(block: np.ndarray) -> np.ndarray:
    """A fresh copy of a block of stored values as the rules read them: float16 widened to float32, float64 kept."""
    return np.array(block, dtype=np.promote_types(block.dtype, np.float32))


def block_rows_for(dim: int) -> int:
    """Rows of a block of about BLOCK_BYTES of float32 values of ``dim`` columns."""
    return max(1, min(BLOCK_ROWS, BLOCK_BYTES // (4 * max(1, dim))))


def no_rows(fn: RowMap) -> np.ndarray:
    """``fn``'s results for zero rows (the right trailing shape and dtype)."""
    return fn(np.zeros((0, fn.dim), dtype=np.float32))


def apply_blocks(fn: RowMap, values: np.ndarray, block_rows: int | None = None) -> np.ndarray:
    """``fn`` over the rows of a (rows, d) array (a shard as stored, or values in memory), one block at a time:
    ``block_rows`` rows, by default about BLOCK_BYTES (`block_rows_for`)."""
    values = np.asarray(values)
    if values.ndim != 2 or values.shape[1] != fn.dim:
        raise FlexfeedError(f"a signal of shape {values.shape} was scored by a rule over {fn.dim} dims",
                            "compute the train and target signals with the same model and projection")
    block_rows = block_rows or block_rows_for(fn.dim)
    parts = [fn(float_block(values[i:i + block_rows])) for i in range(0, len(values), block_rows)]
    return np.concatenate(parts) if parts else no_rows(fn)
