"""`nice`: LESS scoring against NICE's policy-gradient target features, top rows selected.

NICE (non-differentiable evaluation metric-based data selection) keeps LESS's rule and changes
only the target side: instead of the SGD gradient of the target rows' reference answers
(`grads_sgd`), each target row contributes the reward-weighted policy gradient of completions
sampled from the model (`grads_nice`, split `target`; see stages/grads/nice.py). So

score(x) = reduce over target tasks t of  sum_i lr_i * mean_{z in t} cos(g_i(x), g_i^nice(z)).
"""

from __future__ import annotations

import dataclasses

from ..registry import SELECTORS
from .less import LessParams, LessSelector


@dataclasses.dataclass(kw_only=True)
class NiceParams:
    """Parameters of the NICE selector."""

    task_reduce: str = "max"
    """How per-task scores combine: `max` (as LESS and NICE) or `mean`."""

    def __post_init__(self):
        LessParams.__post_init__(self)


@SELECTORS.register("nice")
class NiceSelector(LessSelector):
    """Selects the rows whose gradients best align with the targets' reward-weighted policy gradients."""

    Params = NiceParams
    paper = ("Wang et al., NICE Data Selection for Instruction Tuning in LLMs with Non-differentiable Evaluation "
             "Metric, ICML 2025")
    rule = ("LESS's rule against policy-gradient target features: reward-weighted gradients of the model's own "
            "sampled answers")
    target_signal = "grads_nice"
