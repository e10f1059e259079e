"""`random`: fresh Dirichlet-distributed proportions at every decision (a baseline for dynamic mixing)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from store.errors import FlexfeedError

from ..base import Mixer
from ..registry import MIXERS


@dataclass(kw_only=True)
class RandomMixParams:
    """Parameters of the random mixer."""

    alpha: float = 1.0
    """Dirichlet concentration: 1.0 draws uniformly over the simplex, larger values stay nearer uniform."""

    def __post_init__(self):
        if not self.alpha > 0:
            raise FlexfeedError(f"random mixer alpha must be > 0, got {self.alpha}",
                                "use 1.0 for proportions uniform over the simplex")


@MIXERS.register("random")
class RandomMixer(Mixer):
    """Draws p ~ Dirichlet(alpha, ..., alpha) from the context's seeded rng at each decision."""

    Params = RandomMixParams
    rule = "fresh Dirichlet proportions at each decision"

    def proportions(self, ctx) -> np.ndarray:
        """A new draw; the same on every rank because ctx.rng is seeded identically."""
        p = ctx.rng.dirichlet(np.full(ctx.num_domains, self.params.alpha))
        return p / p.sum()
