"""Window arithmetic and deterministic draws: the sample stream a run trains on.

Training is cut into windows: window 0 covers the first `warmup_step` steps, window k >= 1 the
`update_step` steps after decision k. Every draw is a pure function of the seed and small counters,
so a resumed run (or another rank) reproduces the stream exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def rng_for(seed: int, *path: int) -> np.random.Generator:
    """A generator determined by (seed, path): independent streams without shared state."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, *(int(p) & 0xFFFFFFFF for p in path)])


@dataclass(frozen=True)
class Windows:
    """Where decisions fall, in optimizer steps and in samples."""

    global_batch: int
    max_steps: int
    warmup_step: int
    update_step: int
    update_times: int | None  # None: a decision every update_step until the end

    def start_step(self, w: int) -> int:
        return 0 if w == 0 else self.warmup_step + (w - 1) * self.update_step

    def num_steps(self, w: int) -> int:
        end = self.warmup_step if w == 0 else self.start_step(w) + self.update_step
        return max(0, min(end, self.max_steps) - self.start_step(w))

    def num_samples(self, w: int) -> int:
        return self.num_steps(w) * self.global_batch

    def num_windows(self) -> int:
        if self.max_steps <= self.warmup_step:
            return 1
        return 1 + -(-(self.max_steps - self.warmup_step) // self.update_step)

    def window_of(self, step: int) -> int:
        """The window a training step belongs to."""
        if step < self.warmup_step:
            return 0
        return 1 + (step - self.warmup_step) // self.update_step

    def is_decision(self, w: int) -> bool:
        """Window w >= 1 starts with a decision while update_times allows."""
        return w >= 1 and (self.update_times is None or w <= self.update_times)

    def decision_steps(self) -> list[int]:
        return [self.start_step(w) for w in range(1, self.num_windows()) if self.is_decision(w)]


def permutation_slice(num_rows: int, seed: int, start: int, count: int, stream: int = 0) -> np.ndarray:
    """Samples [start, start+count) of the endless concatenation of seeded epoch permutations."""
    out = np.empty(count, dtype=np.int64)
    filled = 0
    while filled < count:
        epoch, offset = divmod(start + filled, num_rows)
        perm = rng_for(seed, stream, epoch).permutation(num_rows)
        take = min(count - filled, num_rows - offset)
        out[filled : filled + take] = perm[offset : offset + take]
        filled += take
    return out


def split_counts(proportions: np.ndarray, total: int) -> np.ndarray:
    """Integer counts summing to total, closest to proportions (largest remainder, ties by index)."""
    p = np.asarray(proportions, dtype=np.float64)
    raw = p / p.sum() * total
    counts = np.floor(raw).astype(np.int64)
    rest = total - counts.sum()
    if rest > 0:
        order = np.argsort(-(raw - counts), kind="stable")
        counts[order[:rest]] += 1
    return counts


def draw_by_proportions(proportions: np.ndarray, total: int, domain_rows: list[np.ndarray], cursors: np.ndarray,
                        seed: int, window: int) -> tuple[np.ndarray, np.ndarray]:
    """A window of `total` rows with the domains in the given proportions, then shuffled.

    Each domain serves rows from its own endless stream of seeded permutations, so rows repeat only
    after the domain is exhausted. Returns (row ids, updated cursors).
    """
    counts = split_counts(proportions, total)
    cursors = cursors.copy()
    parts = []
    for k, n in enumerate(counts):
        if n == 0:
            continue
        rows = domain_rows[k]
        if len(rows) == 0:
            raise ValueError(f"domain {k} has no rows but proportion {proportions[k]:.3f}")
        local = permutation_slice(len(rows), seed, int(cursors[k]), int(n), stream=1000 + k)
        parts.append(rows[local])
        cursors[k] += n
    out = np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)
    return out[rng_for(seed, 7, window).permutation(len(out))], cursors
