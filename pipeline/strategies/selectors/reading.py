"""Reading and checking the signals a selector needs."""

from __future__ import annotations

import numpy as np

from store.errors import FlexfeedError

from ..row_maps import unit_rows  # noqa: F401 (selectors normalise rows with the rule streamed scoring uses)


def train_signal(ctx, name: str, ndim: int) -> np.ndarray:
    """A train-split signal with one row per train row, checked for shape."""
    values = np.asarray(ctx.signals.get(name, "train"))
    return check_rows(values, name, ctx.num_rows, ndim)


def check_rows(values: np.ndarray, name: str, num_rows: int, ndim: int) -> np.ndarray:
    """Refuse a signal whose row count or rank is not what the selector reads."""
    check_shape(values.shape, name, num_rows, ndim)
    return values


def check_shape(shape: tuple[int, ...], name: str, num_rows: int, ndim: int) -> tuple[int, ...]:
    """Refuse a signal shape (read or streamed) whose row count or rank is not what the selector reads."""
    if len(shape) != ndim or shape[0] != num_rows:
        want = f"({num_rows},)" if ndim == 1 else f"({num_rows}, d)"
        raise FlexfeedError(f"signal {name!r} has shape {shape}, the selector needs {want}",
                            f"recompute {name!r} for this train set (store info shows what it holds)")
    return shape


def target_tasks(ctx, num_targets: int) -> tuple[np.ndarray, np.ndarray]:
    """(task of each target row, distinct task ids); one task when the target has no domain ids."""
    ids = ctx.target_domain_ids
    if ids is None:
        return np.zeros(num_targets, dtype=np.int64), np.zeros(1, dtype=np.int64)
    ids = np.asarray(ids, dtype=np.int64)
    if ids.shape != (num_targets,):
        raise FlexfeedError(f"target_domain_ids has shape {ids.shape} but the target signal has {num_targets} rows",
                            "give one task id per target row")
    return ids, np.unique(ids)
