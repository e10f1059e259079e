"""`delta_loss`: rows whose loss moved most between decisions (top fraction) plus a random fill."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..base import Selection, Selector, SignalNeed
from ..registry import SELECTORS
from .reading import train_signal
from .sampling import check_count, ranking, take_ranked, uniform_sample
from .summary import selection_info

MODES = ("drop", "learnable", "forgotten")


@dataclass(kw_only=True)
class DeltaLossParams:
    """Parameters of the loss-change selector."""

    window_decisions: int = 0
    """Compare with the loss this many decisions ago (0: with the first decision's loss)."""
    mode: str = "drop"
    """`drop`: largest decrease; `learnable`: decrease times current loss; `forgotten`: largest increase."""
    top_fraction: float = 0.8
    """Share of the selection taken by score; the rest is a uniform fill from the other rows."""

    def __post_init__(self):
        if self.window_decisions < 0:
            raise ValueError("window_decisions must be >= 0 (0 compares with the first decision)")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if not 0.0 <= self.top_fraction <= 1.0:
            raise ValueError(f"top_fraction must be in [0, 1], got {self.top_fraction}")


def delta_scores(baseline: np.ndarray, current: np.ndarray, mode: str) -> np.ndarray:
    """Score of each row from its baseline and current loss, higher = preferred."""
    drop = baseline - current
    if mode == "drop":
        return drop
    if mode == "learnable":
        # Still-high loss that is coming down: the model is learning the row but has not learned it yet.
        return np.clip(drop, 0.0, None) * current
    return -drop


@SELECTORS.register("delta_loss")
class DeltaLossSelector(Selector):
    """Ranks rows by how their loss changed since a baseline decision."""

    Params = DeltaLossParams
    rule = ("largest loss change since a baseline decision (the first, or a moving window), top fraction plus a "
            "uniform fill")

    def __init__(self, params=None, seed: int = 0):
        super().__init__(params, seed)
        self.first_loss: np.ndarray | None = None
        self.history: list[np.ndarray] = []  # losses at the last `window_decisions` decisions, oldest first

    def needs(self) -> list[SignalNeed]:
        """The current model's per-sample loss, recomputed at every decision (forward passes only)."""
        return [SignalNeed("loss", "train", live=True)]

    def baseline(self) -> np.ndarray | None:
        """The loss the current one is compared with (None at the first decision)."""
        if self.first_loss is None:
            return None
        if self.params.window_decisions == 0 or not self.history:
            return self.first_loss
        return self.history[0]

    def select(self, ctx, num_samples: int) -> Selection:
        """Top `top_fraction` rows by loss change, the rest uniformly from the others; all uniform at first."""
        k = check_count(num_samples, ctx.num_rows)
        current = train_signal(ctx, "loss", 1).astype(np.float64)
        if self.first_loss is not None and self.first_loss.shape != current.shape:
            self.first_loss, self.history = None, []  # a different train set: start over
        base = self.baseline()
        if base is None:
            scores = np.zeros_like(current)
            num_top = 0  # no change is known yet: every row is equally informative
        else:
            scores = delta_scores(base, current, self.params.mode)
            num_top = int(round(self.params.top_fraction * k))
        order = ranking(scores)
        top = take_ranked(order, num_top) if num_top else np.empty(0, dtype=np.int64)
        rest = np.setdiff1d(np.arange(ctx.num_rows), top)
        # With the whole set already in the top part, the fill draws from every row again.
        fill = uniform_sample(ctx.rng, rest if rest.size else order, k - top.size)
        indices = np.concatenate([top, fill])
        self._remember(current)
        extra = {"num_top": int(top.size), "num_fill": int(fill.size), "first_decision": base is None}
        return Selection(indices=indices, scores=scores, info=selection_info(ctx, indices, scores, **extra))

    def _remember(self, current: np.ndarray) -> None:
        if self.first_loss is None:
            self.first_loss = current.copy()
        if self.params.window_decisions:
            self.history.append(current.copy())
            self.history = self.history[-self.params.window_decisions:]

    def state_dict(self) -> dict:
        """First-decision losses and the moving window of recent losses."""
        return {"first_loss": None if self.first_loss is None else self.first_loss.copy(),
                "history": np.stack(self.history) if self.history else None}

    def load_state_dict(self, state: dict) -> None:
        """Restore the losses saved by :meth:`state_dict`."""
        first = state.get("first_loss")
        self.first_loss = None if first is None else np.asarray(first, dtype=np.float64).copy()
        hist = state.get("history")
        self.history = [] if hist is None else [np.asarray(h, dtype=np.float64).copy() for h in hist]
