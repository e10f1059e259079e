"""`loss`: rows drawn from high/medium/low-loss terciles with configurable bucket weights."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..base import Selection, Selector, SignalNeed
from ..registry import SELECTORS
from .reading import train_signal
from .sampling import check_count, largest_remainder, ranking, weighted_sample
from .summary import selection_info

BUCKETS = ("high", "medium", "low")


@dataclass(kw_only=True)
class LossParams:
    """Parameters of the loss-bucket selector."""

    bucket_weights: list[float] = field(default_factory=lambda: [0.6, 0.3, 0.1])
    """Share of the selection from the high, medium and low loss terciles (normalised to sum 1)."""
    focus: str | None = None
    """`high`, `medium` or `low`: take every row from that tercile (overrides bucket_weights)."""
    within_bucket: str = "loss"
    """How rows are drawn inside a tercile: `loss` (probability proportional to loss) or `uniform`."""

    def __post_init__(self):
        if len(self.bucket_weights) != 3 or any(w < 0 for w in self.bucket_weights) or sum(self.bucket_weights) <= 0:
            raise ValueError("bucket_weights needs three non-negative numbers (high, medium, low) with a positive sum")
        if self.focus is not None and self.focus not in BUCKETS:
            raise ValueError(f"focus must be one of {BUCKETS}, got {self.focus!r}")
        if self.within_bucket not in ("loss", "uniform"):
            raise ValueError(f"within_bucket must be 'loss' or 'uniform', got {self.within_bucket!r}")

    def weights(self) -> np.ndarray:
        """Bucket weights (high, medium, low) after `focus`, summing to 1."""
        if self.focus is not None:
            return np.array([1.0 if b == self.focus else 0.0 for b in BUCKETS])
        w = np.asarray(self.bucket_weights, dtype=np.float64)
        return w / w.sum()


def terciles(loss: np.ndarray) -> list[np.ndarray]:
    """Row ids of the high, medium and low thirds by loss rank (sizes differ by at most one)."""
    return [np.sort(part) for part in np.array_split(ranking(loss), 3)]


def bucket_quotas(num_samples: int, weights: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Rows per bucket: proportional to weights, capped at capacity, overflow spilled to the other buckets."""
    passes = -(-num_samples // int(sizes.sum()))
    capacity = sizes * passes
    quotas = np.zeros(3, dtype=np.int64)
    left = num_samples
    open_ = capacity > 0
    while left > 0:
        # Overflow goes to weighted buckets first; zero-weight buckets only when those are full.
        w = np.where(open_, weights, 0.0)
        if w.sum() <= 0:
            w = np.where(open_, 1.0, 0.0)
        add = np.minimum(largest_remainder(left, w), capacity - quotas)
        quotas += add
        left -= int(add.sum())
        open_ = quotas < capacity
    return quotas


@SELECTORS.register("loss")
class LossSelector(Selector):
    """Favours rows by their current loss tercile."""

    Params = LossParams
    rule = "high/medium/low-loss terciles of the live loss, a weighted draw from each"

    def needs(self) -> list[SignalNeed]:
        """The current model's per-sample loss, recomputed at every decision (forward passes only)."""
        return [SignalNeed("loss", "train", live=True)]

    def select(self, ctx, num_samples: int) -> Selection:
        """Split rows into loss terciles, give each its weighted quota, draw inside by loss or uniformly."""
        k = check_count(num_samples, ctx.num_rows)
        loss = train_signal(ctx, "loss", 1).astype(np.float64)
        buckets = terciles(loss)
        sizes = np.array([b.size for b in buckets])
        quotas = bucket_quotas(k, self.params.weights(), sizes)
        parts = []
        for rows, quota in zip(buckets, quotas):
            if quota == 0:
                continue
            if self.params.within_bucket == "loss":
                finite = np.nan_to_num(loss[rows], nan=0.0, posinf=0.0, neginf=0.0)
                # A tiny floor keeps zero-loss rows drawable once the positive ones are used up.
                w = np.clip(finite, 0.0, None) + 1e-12
            else:
                w = np.ones(rows.size)
            parts.append(rows[weighted_sample(ctx.rng, w, int(quota))])
        indices = np.concatenate(parts)
        extra = {"selected_per_bucket": {b: int(q) for b, q in zip(BUCKETS, quotas)},
                 "bucket_loss_min": {b: float(loss[r].min()) for b, r in zip(BUCKETS, buckets) if r.size}}
        return Selection(indices=indices, scores=loss, info=selection_info(ctx, indices, loss, **extra))
