"""The small interface each strategy family shares.

A strategy is built from a ``Params`` dataclass (its `component_args`, validated: unknown keys are
errors) and a seed. It declares the store signals it reads (:class:`SignalNeed`); the trainer makes
those fresh before each decision and hands them over through a :class:`DecisionContext`. Everything a
strategy needs to continue identically after a restart goes through ``state_dict``.
Decisions must depend only on the context (signals, step, the context's seeded rng) and the state,
so every rank computes the same result.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np


@dataclass(frozen=True)
class SignalNeed:
    """A signal a strategy reads: name in the store, which split, and whether to refresh it."""

    name: str
    """Store signal name: `embed`, `hidden`, `ngram`, `loss`, `ref_loss`, `grads`, `grads_sgd`, `grads_nice`, `gate_load`."""
    split: str = "train"
    """`train` (the rows being scheduled), `target` (the eval/target set) or `mixer_eval` (mixer_eval_dataset)."""
    refresh: bool = True
    """Recompute shards older than max_staleness with the current model (False: offline only)."""
    live: bool = False
    """The method is defined on the live model's values at every decision (e.g. a loss change): refreshed
    at each decision unless `refresh.max_staleness` says otherwise; a config that cannot refresh it is
    refused before training starts."""
    rows: str = "all"
    """`all` (every row, made fresh before the decision) or `probe` (only the rows the strategy asks
    for through `get_rows_all` are computed, e.g. a few rows per cluster)."""

    def __post_init__(self):
        if self.rows not in ("all", "probe"):
            raise ValueError(f"SignalNeed.rows must be 'all' or 'probe', got {self.rows!r}")
        if self.live and not self.refresh:
            raise ValueError(f"signal {self.name!r} cannot be live and never refreshed")


@dataclass(kw_only=True)
class NoParams:
    """A strategy without parameters."""


@dataclass
class Selection:
    """A selector's decision: rows for the next window, plus what to log."""

    indices: np.ndarray
    scores: np.ndarray | None = None
    info: dict = field(default_factory=dict)


class Strategy:
    """Base of all strategies: params, seed, needs, state."""

    family: ClassVar[str] = ""
    name: ClassVar[str] = ""
    Params: ClassVar[type] = NoParams
    paper: ClassVar[str] = ""
    """The method's source: authors, title, venue or arXiv id (empty for a plain baseline)."""
    rule: ClassVar[str] = ""
    """One line: what the component decides and how (the component table's `rule` column)."""

    def __init__(self, params=None, seed: int = 0):
        self.params = params if params is not None else self.Params()
        self.seed = int(seed)

    def needs(self) -> list[SignalNeed]:
        """Signals read at decisions (default: none)."""
        return []

    def derivations(self) -> list[tuple]:
        """(derived stage, source signal, split) of each signal the strategy derives from the whole of a stored one
        (`stages.derived`, read with `ctx.signals.derived`): `flexfeed stage all` computes them ahead. Default: none."""
        return []

    def check(self, num_rows: int, row_field=None) -> None:
        """Refuse inputs the strategy reads from outside the store (e.g. a score file) before training starts;
        `row_field(name)` gives the raw train rows' field `name` in row order. Default: nothing to check."""

    @classmethod
    def check_config(cls, cfg) -> None:
        """Refuse, when the run config loads, a config the component cannot run under (e.g. no model to compute a
        signal it reads with); `cfg` is the RunConfig. Default: nothing to check."""

    def state_dict(self) -> dict:
        """Everything needed to resume identically (numpy arrays allowed)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned."""


class Selector(Strategy):
    """Chooses which rows the model trains on during the next window."""

    family = "select"

    #: The default of a draw stage's per-window rule: True takes each decision's rows among those not yet
    #: served in the current pass over the pool (DataFlex's `consume_once`), so fixed scores do not serve the
    #: same top rows in every window; False lets every decision choose from the whole pool. The run's
    #: `allow_repeats` overrides it.
    consume_once: ClassVar[bool] = False

    def select(self, ctx, num_samples: int) -> Selection:
        """Return `num_samples` row ids (repeats allowed only if the rule asks for them)."""
        raise NotImplementedError


class Mixer(Strategy):
    """Sets the sampling proportions of the domains for the next window."""

    family = "mix"

    #: Set by the trainer before each observe(): the proportions the observed batch was drawn with
    #: (None outside a trainer). Data loaders fetch ahead, so this can differ from the latest decision.
    drawn_with: np.ndarray | None = None

    #: Set by the run before training when `mixer_eval_dataset` is given: the training-domain index of each row of
    #: the `mixer_eval` split, for a mixer that measures the model on rows of its own; None otherwise.
    eval_domains: np.ndarray | None = None

    def observe(self, domains: np.ndarray, losses: np.ndarray, rows: np.ndarray, step: int) -> None:
        """Per-sample token-mean losses of one (global) training batch, with each row's domain."""

    def proportions(self, ctx) -> np.ndarray:
        """Domain proportions (K,), non-negative, summing to 1."""
        raise NotImplementedError

    def held_out_rows(self, domain_ids: np.ndarray, num_domains: int) -> np.ndarray:
        """Train rows the mixer measures the model on at its decisions, kept out of every window (never trained
        on); a pure function of the domains and the seed, so a resumed run holds out the same rows. Default none."""
        return np.empty(0, dtype=np.int64)

    #: a mixer acting in loss space (per-sample weights) rather than on the window's draw
    loss_space: bool = False

    @property
    def importance_weighted(self) -> bool:
        """A mixer that draws the window and also weights each sample's loss (DoReMi's paper form):
        the trainer then applies its `weights` as a weight stage."""
        return False

    def weights(self, losses: np.ndarray, rows: np.ndarray, domains: np.ndarray, step: int) -> np.ndarray:
        """Loss-space mixers: a weight per sample of the global batch."""
        raise NotImplementedError


class Weighter(Strategy):
    """Turns the per-sample losses of a batch into weights inside `compute_loss`."""

    family = "weight"

    #: The weighter reads each batch's pooled hidden states from the training forward (the `embed:` section's
    #: layer and pooling): the trainer then sets `batch_hidden` (B, d), rows in the order of the losses, before
    #: each weights() call.
    reads_batch_hidden: ClassVar[bool] = False
    batch_hidden: np.ndarray | None = None

    def update(self, ctx) -> None:
        """Called at decision steps (e.g. to read embeddings); default nothing."""

    def weights(self, losses: np.ndarray, rows: np.ndarray, domains: np.ndarray, step: int) -> np.ndarray:
        """Weights (B,) for the global batch's per-sample losses; they average 1."""
        raise NotImplementedError

    def batch_log(self) -> dict:
        """Numbers about the last weights() call for the weight log (e.g. a solver's iterations); default none."""
        return {}


class Reorderer(Strategy):
    """Orders rows by a score: the order in which a window's (or the run's) rows are served."""

    family = "reorder"

    def scores(self, ctx, rows: np.ndarray) -> np.ndarray:
        """One finite score per row of `rows` (higher is later under the default polarity)."""
        raise NotImplementedError

    def order(self, rows: np.ndarray, scores: np.ndarray, seed: int) -> np.ndarray:
        """A permutation of `rows` under the component's pattern."""
        raise NotImplementedError

