"""`nice`: LESS scoring against NICE's policy-gradient target features, top rows selected.

NICE (non-differentiable evaluation metric-based data selection) keeps LESS's rule and changes
only the target side: instead of the SGD gradient of the target rows' reference answers
(`grads_sgd`), each target row contributes the reward-weighted policy gradient of completions
sampled from the model (`grads_nice`, split `target`; see stages/grads/nice.py). So

score(x) = reduce over target tasks t of  sum_i lr_i * mean_{z in t} cos(g_i(x), g_i^nice(z)).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ..base import Selection, Selector, SignalNeed
from ..registry import SELECTORS
from .less import LessParams, less_scores
from .sampling import check_count, ranking, take_ranked
from .summary import selection_info

NICE_NEEDS = [SignalNeed("grads", "train"), SignalNeed("grads_nice", "target")]


@dataclasses.dataclass(kw_only=True)
class NiceParams:
    """Parameters of the NICE selector."""

    task_reduce: str = "max"
    """How per-task scores combine: `max` (as LESS and NICE) or `mean`."""

    def __post_init__(self):
        LessParams.__post_init__(self)


class _PolicyTargets:
    """A view of the signals in which the target gradients LESS reads are NICE's policy gradients."""

    def __init__(self, signals):
        self._signals = signals

    def _name(self, name: str, split: str) -> str:
        return "grads_nice" if (name, split) == ("grads_sgd", "target") else name

    def get(self, name: str, split: str = "train") -> np.ndarray:
        return self._signals.get(self._name(name, split), split)

    def get_all(self, name: str, split: str = "train") -> list[tuple[dict, np.ndarray]]:
        return self._signals.get_all(self._name(name, split), split)

    def search(self, name: str, queries: np.ndarray, k: int, split: str = "train"):
        return self._signals.search(self._name(name, split), queries, k, split)


def nice_scores(ctx, rows: np.ndarray | None = None, task_reduce: str = "max") -> np.ndarray:
    """NICE score of every train row (or of `rows` only): LESS's score with `grads_nice` targets."""
    return less_scores(dataclasses.replace(ctx, signals=_PolicyTargets(ctx.signals)), rows, task_reduce)


@SELECTORS.register("nice")
class NiceSelector(Selector):
    """Selects the rows whose gradients best align with the targets' reward-weighted policy gradients."""

    Params = NiceParams

    def needs(self) -> list[SignalNeed]:
        """Train gradient features per checkpoint and the target set's policy-gradient features."""
        return list(NICE_NEEDS)

    def select(self, ctx, num_samples: int) -> Selection:
        """The `num_samples` highest-scoring rows (ties by row id; the ranking repeats beyond N)."""
        k = check_count(num_samples, ctx.num_rows)
        scores = nice_scores(ctx, task_reduce=self.params.task_reduce)
        indices = take_ranked(ranking(scores), k)
        return Selection(indices=indices, scores=scores, info=selection_info(ctx, indices, scores))
