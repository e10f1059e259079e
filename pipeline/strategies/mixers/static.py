"""`static`: fixed domain proportions (uniform, by domain size, an explicit list, or a doremi weights file)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from store.errors import FlexfeedError

from ..base import Mixer
from ..registry import MIXERS
from .grouping import check_domain_ids
from .weights_file import normalise, read_domain_weights

NAMED = ("uniform", "stratified")


@dataclass(kw_only=True)
class StaticParams:
    """Parameters of the static mixer."""

    proportions: str | list[float] = "uniform"
    """`uniform`, `stratified` (by domain size), a list with one weight per domain, or a domain_weights.json path."""

    def __post_init__(self):
        if isinstance(self.proportions, (list, tuple)):
            values = list(self.proportions)
            if not values or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                raise FlexfeedError(f"static proportions must be numbers, got {values!r}",
                                    "write one number per domain, e.g. proportions: [0.7, 0.3]")
            if any(v < 0 for v in values):
                raise FlexfeedError(f"static proportions must be non-negative, got {values!r}",
                                    "a domain's weight is a share of the samples: use 0 to leave it out")
            normalise(np.array(values, dtype=np.float64), "static proportions")
            self.proportions = [float(v) for v in values]
        elif not isinstance(self.proportions, str):
            raise FlexfeedError(f"static proportions must be a name, a list or a path, got {self.proportions!r}",
                                "use uniform, stratified, a list of weights or a domain_weights.json path")


def resolve_proportions(spec: str | list[float], ctx) -> np.ndarray:
    """The (K,) proportions described by `spec` for the context's domains."""
    k = ctx.num_domains
    if isinstance(spec, list):
        if len(spec) != k:
            raise FlexfeedError(f"static proportions have {len(spec)} values but the run has {k} domains "
                                f"({', '.join(ctx.domain_names)})", "give one weight per dataset, in dataset order")
        return normalise(np.array(spec), "static proportions")
    if spec == "uniform":
        return np.full(k, 1.0 / k)
    if spec == "stratified":
        ids = np.asarray(ctx.domain_ids, dtype=np.int64)
        check_domain_ids(ids, k)
        sizes = np.bincount(ids, minlength=k)
        return normalise(sizes.astype(np.float64), "domain sizes")
    return read_domain_weights(spec, list(ctx.domain_names))


@MIXERS.register("static")
class StaticMixer(Mixer):
    """Returns the same proportions at every decision."""

    Params = StaticParams
    rule = "fixed proportions: uniform, stratified by domain size, a list, or a domain_weights.json"

    def __init__(self, params=None, seed: int = 0):
        super().__init__(params, seed)
        self._resolved: np.ndarray | None = None

    def proportions(self, ctx) -> np.ndarray:
        """The configured proportions, resolved once (a weights file is read at the first decision)."""
        if self._resolved is None or len(self._resolved) != ctx.num_domains:
            self._resolved = resolve_proportions(self.params.proportions, ctx)
        return self._resolved.copy()

    def state_dict(self) -> dict:
        # Keep the resolved values so a resumed run does not depend on the weights file still being there.
        return {"resolved": None if self._resolved is None else self._resolved.copy()}

    def load_state_dict(self, state: dict) -> None:
        resolved = state.get("resolved")
        self._resolved = None if resolved is None else np.asarray(resolved, dtype=np.float64).copy()
