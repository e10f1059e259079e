"""`loss`: per-sample weights from the batch's losses (Sow et al. 2025, dynamic loss-based reweighting).

For the global batch's per-sample losses l_1..l_B:

    x_i = delta * (2 l_i - l_max - l_min) / (l_max - l_min)      in [-delta, delta]  (0 if all equal)
    f(x) = linupper:  min(x + delta, delta)     rises with the loss, flat above the batch's mid-range
           uniform:   0                         every weight 1 (the unweighted baseline)
           quadratic: 1 - x^2 / delta^2         favours medium losses, damps both ends
           extremes:  |x|                       favours the easiest and the hardest samples
    w_i  = B * exp(f(x_i) / r) / sum_j exp(f(x_j) / r)           average 1

The weights are plain numbers (no gradient flows through them).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

import numpy as np

from store.errors import FlexfeedError

from ..base import Weighter
from ..registry import WEIGHTERS
from ..simplex import softmax

STRATEGIES = ("linupper", "uniform", "quadratic", "extremes")


@dataclass(kw_only=True)
class LossWeightParams:
    """Parameters of the loss-based weighter."""

    strategy: str = "linupper"
    """Shape f of the weight over normalised losses: linupper, uniform, quadratic or extremes."""
    delta: float = 1.0
    """Half-width of the range the losses are min-max normalised to: [-delta, delta]."""
    r: float = 1.0
    """Softmax temperature: smaller r separates weights more, large r tends to all-ones."""

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            close = difflib.get_close_matches(str(self.strategy), STRATEGIES, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"choose one of: {', '.join(STRATEGIES)}"
            raise FlexfeedError(f"unknown loss weighting strategy {self.strategy!r}", hint)
        if not self.delta > 0:
            raise FlexfeedError(f"loss weighter delta must be > 0, got {self.delta}", "the paper uses delta: 1.0")
        if not self.r > 0:
            raise FlexfeedError(f"loss weighter temperature r must be > 0, got {self.r}", "use r: 1.0")


def normalise_losses(losses: np.ndarray, delta: float) -> np.ndarray:
    """Min-max map of the losses onto [-delta, delta]; all zeros when they are all equal."""
    lo, hi = losses.min(), losses.max()
    if hi <= lo:
        return np.zeros_like(losses)
    return delta * (2.0 * losses - hi - lo) / (hi - lo)


def strategy_curve(x: np.ndarray, strategy: str, delta: float) -> np.ndarray:
    """f(x) of the chosen strategy on normalised losses."""
    if strategy == "linupper":
        return np.minimum(x + delta, delta)
    if strategy == "uniform":
        return np.zeros_like(x)
    if strategy == "quadratic":
        return 1.0 - x**2 / delta**2
    return np.abs(x)


def softmax_weights(scores: np.ndarray, temperature: float) -> np.ndarray:
    """B * softmax(scores / temperature): positive weights averaging 1."""
    return len(scores) * softmax(scores / temperature)


@WEIGHTERS.register("loss")
class LossWeighter(Weighter):
    """Reweights each batch from its own losses; keeps no state."""

    Params = LossWeightParams
    paper = ("Sow et al., Dynamic Loss-Based Sample Reweighting for Improved Large Language Model Pretraining, ICLR "
             "2025 (arXiv 2502.06733)")
    rule = ("the batch's losses normalised to [-delta, delta], a linupper / uniform / quadratic / extremes score, "
            "softmax with temperature, mean 1")

    def weights(self, losses, rows, domains, step: int) -> np.ndarray:
        """Weights (B,) averaging 1 from the normalised losses through the strategy and a softmax."""
        losses = np.asarray(losses, dtype=np.float64).reshape(-1)
        if losses.size == 0:
            return np.ones(0)
        if not np.all(np.isfinite(losses)):
            raise FlexfeedError(f"the batch at step {step} has non-finite per-sample losses",
                                "lower the learning rate or check the data; loss weights need finite losses")
        x = normalise_losses(losses, self.params.delta)
        return softmax_weights(strategy_curve(x, self.params.strategy, self.params.delta), self.params.r)
