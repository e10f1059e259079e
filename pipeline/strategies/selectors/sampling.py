"""Draws and rankings shared by the selectors: weighted sampling without replacement, ranked takes.

When a selector is asked for more rows than it may draw from (``num_samples`` larger than the
eligible rows), every eligible row is taken once per full pass and the remainder is drawn by the
selector's own rule, so a row appears at most ``ceil(num_samples / eligible)`` times.
"""

from __future__ import annotations

import numpy as np

from store.errors import FlexfeedError


def check_count(num_samples: int, num_rows: int) -> int:
    """Validate the requested count against a non-empty train set."""
    if int(num_samples) != num_samples or num_samples <= 0:
        raise FlexfeedError(f"a selector was asked for {num_samples!r} rows",
                            "update_step x global batch size must be a positive integer")
    if num_rows <= 0:
        raise FlexfeedError("the train set has no rows to select from", "check the dataset and cutoff_len")
    return int(num_samples)


def weighted_order(rng: np.random.Generator, weights: np.ndarray, k: int) -> np.ndarray:
    """k distinct rows drawn without replacement with probability proportional to `weights` (k <= support)."""
    w = np.asarray(weights, dtype=np.float64)
    support = np.flatnonzero(w > 0)
    k = min(int(k), support.size)
    if k == 0:
        return np.empty(0, dtype=np.int64)
    # Gumbel-top-k: the k largest log(w) + Gumbel keys are a sequential draw without replacement.
    keys = np.log(w[support]) + rng.gumbel(size=support.size)
    if k < support.size:
        part = np.argpartition(-keys, k - 1)[:k]
    else:
        part = np.arange(support.size)
    part = part[np.argsort(-keys[part], kind="stable")]
    return support[part].astype(np.int64)


def weighted_sample(rng: np.random.Generator, weights: np.ndarray, k: int) -> np.ndarray:
    """k rows by weight, without replacement while the support allows, then in full passes (see module doc)."""
    w = np.asarray(weights, dtype=np.float64)
    support = np.flatnonzero(w > 0)
    if support.size == 0:
        raise FlexfeedError("every candidate row has zero selection probability",
                            "check the signal the selector reads (all NaN or zero?)")
    full, rest = divmod(int(k), support.size)
    parts = [support.astype(np.int64)] * full
    parts.append(weighted_order(rng, w, rest))
    return np.concatenate(parts)


def uniform_sample(rng: np.random.Generator, rows: np.ndarray, k: int) -> np.ndarray:
    """k of `rows` uniformly without replacement, in full passes when k exceeds them."""
    rows = np.asarray(rows, dtype=np.int64)
    if rows.size == 0:
        return np.empty(0, dtype=np.int64) if k == 0 else _no_rows()
    full, rest = divmod(int(k), rows.size)
    parts = [rows] * full
    parts.append(rows[rng.permutation(rows.size)[:rest]])
    return np.concatenate(parts)


def ranking(scores: np.ndarray) -> np.ndarray:
    """Row ids by decreasing score; ties by increasing row id; NaN last."""
    s = np.nan_to_num(np.asarray(scores, dtype=np.float64), nan=-np.inf)
    return np.lexsort((np.arange(s.size), -s)).astype(np.int64)


def take_ranked(order: np.ndarray, k: int) -> np.ndarray:
    """The first k of a ranking, repeating the ranking from the top when k exceeds it."""
    order = np.asarray(order, dtype=np.int64)
    if order.size == 0:
        return _no_rows()
    full, rest = divmod(int(k), order.size)
    return np.concatenate([order] * full + [order[:rest]])


def largest_remainder(total: int, weights: np.ndarray) -> np.ndarray:
    """Integer counts summing to `total`, proportional to `weights` (Hamilton's method, ties to lower index)."""
    w = np.asarray(weights, dtype=np.float64)
    exact = total * w / w.sum()
    counts = np.floor(exact).astype(np.int64)
    left = total - int(counts.sum())
    if left:
        order = np.lexsort((np.arange(w.size), -(exact - counts)))
        counts[order[:left]] += 1
    return counts


def _no_rows():
    raise FlexfeedError("no rows are eligible for selection", "check the selector's parameters and signals")
