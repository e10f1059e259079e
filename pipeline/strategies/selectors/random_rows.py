"""`random`: uniform rows, without replacement while the train set allows."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..base import Selection, Selector
from ..registry import SELECTORS
from .sampling import check_count, uniform_sample
from .summary import selection_info


@dataclass(kw_only=True)
class RandomParams:
    """Parameters of the random selector."""

    replacement: bool = False
    """Draw every row independently (repeats possible) instead of without replacement."""


@SELECTORS.register("random", "uniform")
class RandomSelector(Selector):
    """Uniform baseline: every row equally likely."""

    Params = RandomParams
    rule = "uniform rows, without replacement while the train set allows"

    def select(self, ctx, num_samples: int) -> Selection:
        """`num_samples` uniform rows (full permutations first when more than N are asked)."""
        k = check_count(num_samples, ctx.num_rows)
        if self.params.replacement:
            indices = ctx.rng.integers(0, ctx.num_rows, size=k, dtype=np.int64)
        else:
            indices = uniform_sample(ctx.rng, np.arange(ctx.num_rows), k)
        return Selection(indices=indices, info=selection_info(ctx, indices))
