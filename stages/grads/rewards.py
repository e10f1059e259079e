"""Reward functions for NICE's policy-gradient target features, and loading one by import path.

A reward scores one sampled completion of a target prompt against the target's reference answer:

    reward(prompt_ids: list[int], completion_ids: list[int], reference_ids: list[int]) -> float

It may be any function of token ids (exact match, a parsed number, a call to a metric): nothing
is differentiated through it. The completion and the reference exclude the end-of-sequence token.
"""

from __future__ import annotations

import importlib
import math
from collections import Counter
from collections.abc import Callable

from store.errors import FlexfeedError

Reward = Callable[[list[int], list[int], list[int]], float]
DEFAULT_REWARD = "stages.grads.rewards:token_f1"


def token_f1(prompt_ids: list[int], completion_ids: list[int], reference_ids: list[int]) -> float:
    """F1 of the token multisets of completion and reference (1.0 when both are empty)."""
    if not completion_ids or not reference_ids:
        return float(not completion_ids and not reference_ids)
    common = sum((Counter(completion_ids) & Counter(reference_ids)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(completion_ids), common / len(reference_ids)
    return 2 * precision * recall / (precision + recall)


def exact_match(prompt_ids: list[int], completion_ids: list[int], reference_ids: list[int]) -> float:
    """1.0 when the completion's tokens equal the reference's, else 0.0."""
    return float(list(completion_ids) == list(reference_ids))


def load_reward(path: str) -> Reward:
    """The function named by ``package.module:function`` (checked to be callable)."""
    module_name, sep, attr = str(path).partition(":")
    if not sep or not module_name or not attr:
        raise FlexfeedError(f"grads.nice_reward {path!r} is not an import path `package.module:function`",
                            hint=f"e.g. {DEFAULT_REWARD}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise FlexfeedError(f"grads.nice_reward {path!r}: cannot import module {module_name!r} ({exc})",
                            hint="make the module importable (installed, or on PYTHONPATH)") from None
    fn = module
    for part in attr.split("."):
        if not hasattr(fn, part):
            raise FlexfeedError(f"grads.nice_reward {path!r}: module {module_name!r} has no {attr!r}",
                                hint="check the function's name after the colon")
        fn = getattr(fn, part)
    if not callable(fn):
        raise FlexfeedError(f"grads.nice_reward {path!r} is not callable",
                            hint="name a function reward(prompt_ids, completion_ids, reference_ids) -> float")
    return fn


def call_reward(fn: Reward, path: str, prompt_ids: list[int], completion_ids: list[int],
                reference_ids: list[int], row: int) -> float:
    """One reward as a finite float; anything else is an error naming the reward and the row."""
    value = fn(list(prompt_ids), list(completion_ids), list(reference_ids))
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise FlexfeedError(f"reward {path!r} returned {value!r} for target row {row}, not a number",
                            hint="return a float") from None
    if not math.isfinite(value):
        raise FlexfeedError(f"reward {path!r} returned {value} for target row {row}",
                            hint="return a finite float")
    return value
