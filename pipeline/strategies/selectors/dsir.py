"""`dsir`: DSIR importance resampling (Xie et al. 2023) on hashed n-gram counts, no model involved.

Two bag-of-hashed-n-grams models, theta_target and theta_raw (bucket probabilities: the summed counts of the target
rows, and of the train rows, normalised), give every train row x with counts c(x) the log importance weight

    log w(x) = log p_target(x) - log p_raw(x) = sum_j c_j(x) * (log(theta_target_j + s) - log(theta_raw_j + s)),

s the `smoothing` floor (DSIR's code: 1e-8). A decision draws its rows without replacement with probability
proportional to w by Gumbel top-k: the k largest log w(x) + Gumbel noise, the noise from the decision context's
seeded rng (the same on every rank). theta_raw is fit once, at the stage's first decision, on the rows it sees
then (every train row, or the pool a filter before it kept) and kept in the state, so the weights do not drift
as the pool is consumed; drawn pass after pass over the pool, the windows are one importance resample of it.

The train counts are never held whole: theta_raw sums them block by block (`get_rows_all`), and log w is a
per-row rule the signal source applies shard by shard (`map_rows`, cached while the counts and theta do not
change), so a decision holds O(N) values and one block of counts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from store.errors import FlexfeedError

from ..base import Selection, Selector, SignalNeed
from ..registry import SELECTORS
from ..row_maps import BLOCK_ROWS, array_digest
from .reading import check_shape
from .sampling import check_count, ranking, take_ranked
from .summary import selection_info


@dataclass(kw_only=True)
class DsirParams:
    """Parameters of the DSIR selector."""

    smoothing: float = 1e-8
    """Added to every bucket probability before its log (DSIR's code: 1e-8): a bucket the target never uses then costs a row about log(1e-8) = -18 per count."""
    top_k: bool = False
    """Take the rows of largest importance weight instead of resampling (DSIR's `top_k`): deterministic, and no longer a sample of the target distribution."""

    def __post_init__(self):
        if not 0 < self.smoothing < 1:
            raise ValueError(f"smoothing must be in (0, 1), got {self.smoothing}")


def bucket_probs(total: np.ndarray) -> np.ndarray:
    """A bag-of-n-grams model: summed bucket counts, normalised to sum to 1."""
    total = np.asarray(total, dtype=np.float64)
    if total.sum() <= 0:
        raise FlexfeedError("the rows have no n-grams at all (every count is 0)",
                            "check that the rows have text, and recompute the ngram signal")
    return total / total.sum()


def log_ratio(target_probs: np.ndarray, raw_probs: np.ndarray, smoothing: float) -> np.ndarray:
    """Per bucket, log(theta_target + s) - log(theta_raw + s)."""
    return np.log(target_probs + smoothing) - np.log(raw_probs + smoothing)


def summed_counts(ctx, num_buckets: int) -> np.ndarray:
    """The train rows' bucket counts summed, reading BLOCK_ROWS rows at a time."""
    total = np.zeros(num_buckets, dtype=np.float64)
    for start in range(0, ctx.num_rows, BLOCK_ROWS):
        rows = np.arange(start, min(start + BLOCK_ROWS, ctx.num_rows))
        (_, block), = ctx.signals.get_rows_all("ngram", rows, "train")
        total += np.asarray(block).sum(axis=0, dtype=np.float64)
    return total


@dataclass(frozen=True, eq=False)
class CountScore:
    """counts @ weights: each row's bag-of-n-grams log-likelihood ratio (a RowMap, applied shard by shard)."""

    weights: np.ndarray
    """(num_buckets,) per-bucket log ratio."""

    @property
    def dim(self) -> int:
        return int(self.weights.shape[0])

    @property
    def key(self) -> str:
        return f"dsir_count_score/{array_digest(self.weights)}"

    def __call__(self, block: np.ndarray) -> np.ndarray:
        return np.asarray(block, dtype=np.float64) @ self.weights


def gumbel_top_k(rng: np.random.Generator, log_weights: np.ndarray, k: int) -> np.ndarray:
    """Every row ranked by log w + Gumbel noise: its first k are a draw of k rows without replacement with
    probability proportional to w (the ranking repeats when k exceeds the rows)."""
    keys = np.asarray(log_weights, dtype=np.float64) + rng.gumbel(size=len(log_weights))
    return take_ranked(ranking(keys), k)


@SELECTORS.register("dsir")
class DsirSelector(Selector):
    """Resamples train rows by hashed-n-gram importance weights toward the target set."""

    Params = DsirParams
    paper = ("Xie, Santurkar, Ma, Liang, Data Selection for Language Models via Importance Resampling, "
             "NeurIPS 2023")
    rule = "draw rows by Gumbel top-k on log p_target(x) - log p_raw(x), bag-of-hashed-n-gram models (no model)"
    consume_once = True  # each pass over the pool is one resample without replacement

    def __init__(self, params=None, seed: int = 0):
        super().__init__(params, seed)
        self.raw_probs: np.ndarray | None = None

    def needs(self) -> list[SignalNeed]:
        """The ngram counts of the train and target rows (computed offline, no model: never refreshed)."""
        return [SignalNeed("ngram", "train", refresh=False), SignalNeed("ngram", "target", refresh=False)]

    def log_weights(self, ctx) -> np.ndarray:
        """log w(x) of every row of the context (theta_raw fit at the first call)."""
        (_, shape), = ctx.signals.variants("ngram", "train")
        shape = check_shape(tuple(shape), "ngram", ctx.num_rows, 2)
        target = np.asarray(ctx.signals.get("ngram", "target"), dtype=np.float64)
        if target.ndim != 2 or target.shape[1] != shape[1]:
            raise FlexfeedError(f"target 'ngram' has shape {target.shape}, train 'ngram' {shape}",
                                "compute both with the same ngram settings (num_buckets, max_n)")
        if self.raw_probs is None or self.raw_probs.shape[0] != shape[1]:
            self.raw_probs = bucket_probs(summed_counts(ctx, shape[1]))
        ratio = log_ratio(bucket_probs(target.sum(axis=0)), self.raw_probs, self.params.smoothing)
        return np.asarray(ctx.signals.map_rows("ngram", CountScore(ratio), "train"), dtype=np.float64)

    def select(self, ctx, num_samples: int) -> Selection:
        """`num_samples` rows by importance resampling (or the top weights with `top_k`)."""
        k = check_count(num_samples, ctx.num_rows)
        logw = self.log_weights(ctx)
        indices = take_ranked(ranking(logw), k) if self.params.top_k else gumbel_top_k(ctx.rng, logw, k)
        return Selection(indices=indices, scores=logw, info=selection_info(ctx, indices, logw))

    def state_dict(self) -> dict:
        """The raw model fit at the first decision."""
        return {"raw_probs": None if self.raw_probs is None else self.raw_probs.copy()}

    def load_state_dict(self, state: dict) -> None:
        """Restore the raw model saved by :meth:`state_dict`."""
        raw = state.get("raw_probs")
        self.raw_probs = None if raw is None else np.asarray(raw, dtype=np.float64).copy()
