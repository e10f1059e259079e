"""Curriculum orderings of rows by a score: pure permutations, no model, no store.

The patterns follow "Demystifying Data Organization for Enhanced LLM Training" (its four guidances:
segment boundaries, cyclic folding, continuity by zigzag, local diversity by jittering). Every
function maps a sequence of row ids to a permutation of it; `order_rows` applies one named pattern
to rows ranked by score, then the optional jitter window.

- `sorting`: the ranked rows.
- `folding(L)`: for l = 0..L-1 the strided slices r[l], r[l+L], r[l+2L], ... one after the other:
  L sweeps over the whole score range.
- `zigzag(L)`: folding with every odd sweep reversed (a triangle wave instead of a sawtooth).
- `segment(x, y)`: a front block of x % and a back block of y % of the rows taken from the chosen
  ends of the ranking, each block and the middle shuffled on their own.
- `stair` / `saw`: the ranking, with a window of radius r * N around each of the S - 1 section
  boundaries replaced by folding (stair) or zigzag (saw) of that window; needs 2 r < 1 / S.
- `shuffle`: a seeded permutation.
- `window_size` w > 1 ("JIT"): shuffle inside consecutive blocks of w rows, after any pattern.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

PATTERNS = ("shuffle", "sorting", "folding", "zigzag", "segment", "stair", "saw")
POLARITIES = ("higher_later", "higher_earlier")
POLARITY_ALIASES = {"higher_is_better": "higher_later", "lower_is_better": "higher_earlier"}


def canonical_polarity(polarity: str) -> str:
    """`higher_later` or `higher_earlier` (DataFlex's `higher_is_better` / `lower_is_better` accepted)."""
    polarity = POLARITY_ALIASES.get(polarity, polarity)
    if polarity not in POLARITIES:
        raise ValueError(f"polarity must be one of {POLARITIES + tuple(POLARITY_ALIASES)}, got {polarity!r}")
    return polarity


def rank_rows(scores: np.ndarray, polarity: str = "higher_later") -> np.ndarray:
    """Row ids ordered by score (stable: equal scores keep row order); higher_later puts high scores last."""
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 1 or not np.isfinite(s).all():
        raise ValueError("scores must be one finite number per row")
    key = s if canonical_polarity(polarity) == "higher_later" else -s
    return np.argsort(key, kind="stable").astype(np.int64)


def _layers(layers: int) -> int:
    if int(layers) < 1:
        raise ValueError(f"layers must be >= 1, got {layers}")
    return int(layers)


def folding(seq: Sequence[int], layers: int) -> np.ndarray:
    """Strided slices seq[l::L] for l = 0..L-1, concatenated."""
    a = np.asarray(seq, dtype=np.int64)
    L = _layers(layers)
    return np.concatenate([a[i::L] for i in range(L)]) if a.size else a


def zigzag(seq: Sequence[int], layers: int) -> np.ndarray:
    """Folding with the odd sweeps reversed."""
    a = np.asarray(seq, dtype=np.int64)
    L = _layers(layers)
    return np.concatenate([a[i::L][::-1] if i % 2 else a[i::L] for i in range(L)]) if a.size else a


def segment(seq: Sequence[int], x_pct: float, y_pct: float, front_is_high: bool, back_is_high: bool,
            rng: np.random.Generator) -> np.ndarray:
    """Front block of x % and back block of y % from the chosen ends of the ranking; each part shuffled."""
    a = np.asarray(seq, dtype=np.int64)
    if x_pct < 0 or y_pct < 0 or x_pct + y_pct > 100:
        raise ValueError(f"x_pct and y_pct must be >= 0 with a sum <= 100, got {x_pct} and {y_pct}")
    n = a.size
    n_front, n_back = int(n * x_pct // 100), int(n * y_pct // 100)
    if front_is_high == back_is_high:  # both blocks from one end: split that end at random
        take = n_front + n_back
        both = a[n - take:] if front_is_high else a[:take]
        rest = a[: n - take] if front_is_high else a[take:]
        both = rng.permutation(both)
        front, back, middle = both[:n_front], both[n_front:], rest
    else:  # the front block from its end, then the back block from the other end of what remains
        front = a[n - n_front:] if front_is_high else a[:n_front]
        rest = a[: n - n_front] if front_is_high else a[n_front:]
        back = rest[rest.size - n_back:] if back_is_high else rest[:n_back]
        middle = rest[: rest.size - n_back] if back_is_high else rest[n_back:]
    return np.concatenate([rng.permutation(front), rng.permutation(middle), rng.permutation(back)])


def boundary_blend(seq: Sequence[int], num_sections: int, ratio: float, layers: int, zig: bool) -> np.ndarray:
    """The ranking with a window of radius ratio * N around each section boundary folded (or zigzagged)."""
    a = np.asarray(seq, dtype=np.int64)
    S = _layers(num_sections)
    if ratio < 0 or (S > 1 and 2 * ratio >= 1 / S):
        raise ValueError(f"folding_ratio must be >= 0 and 2 * folding_ratio < 1 / num_sections "
                         f"({1 / S:.4f}), got {ratio}: windows around section boundaries would overlap")
    n = a.size
    radius = int(round(n * ratio))
    if n == 0 or S == 1 or radius == 0:
        return a.copy()
    out = a.copy()
    blend = zigzag if zig else folding
    for s in range(1, S):
        centre = int(round(n * s / S))
        lo, hi = max(0, centre - radius), min(n, centre + radius)
        out[lo:hi] = blend(a[lo:hi], layers)
    return out


def jitter(seq: Sequence[int], window_size: int, rng: np.random.Generator) -> np.ndarray:
    """Shuffle inside consecutive blocks of window_size rows (nothing for window_size <= 1)."""
    a = np.asarray(seq, dtype=np.int64).copy()
    if window_size > 1:
        for start in range(0, a.size, window_size):
            a[start : start + window_size] = rng.permutation(a[start : start + window_size])
    return a


def order_rows(pattern: str, rows: Sequence[int], scores: np.ndarray | None, *, seed: int,
               polarity: str = "higher_later", layers: int = 2, x_pct: float = 10.0, y_pct: float = 10.0,
               front_is_high: bool = False, back_is_high: bool = True, num_sections: int = 2,
               folding_ratio: float = 0.1, window_size: int = 0) -> np.ndarray:
    """`rows` in the named pattern's order of their `scores` (one per row), then jittered; a permutation."""
    rows = np.asarray(rows, dtype=np.int64)
    rng = np.random.default_rng(seed)
    if pattern == "shuffle":
        out = rng.permutation(rows)
    else:
        if scores is None or len(scores) != rows.size:
            raise ValueError(f"pattern {pattern!r} needs one score per row")
        ranked = rows[rank_rows(scores, polarity)]
        if pattern == "sorting":
            out = ranked
        elif pattern == "folding":
            out = folding(ranked, layers)
        elif pattern == "zigzag":
            out = zigzag(ranked, layers)
        elif pattern == "segment":
            out = segment(ranked, x_pct, y_pct, front_is_high, back_is_high, rng)
        elif pattern in ("stair", "saw"):
            out = boundary_blend(ranked, num_sections, folding_ratio, layers, zig=pattern == "saw")
        else:
            raise ValueError(f"unknown pattern {pattern!r}; use one of {', '.join(PATTERNS)}")
    out = jitter(out, window_size, rng)
    if out.size != rows.size or not np.array_equal(np.sort(out), np.sort(rows)):
        raise AssertionError(f"pattern {pattern!r} did not return a permutation of its rows")
    return out
