"""What a strategy sees at a decision: step, domains, a seeded rng, and the signals it needs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from store.errors import FlexfeedError

from .row_maps import RowMap, apply_blocks


class SignalSource(Protocol):
    """Read access to fresh signals (the trainer backs it with the store; tests with arrays)."""

    def get(self, name: str, split: str = "train") -> np.ndarray:
        """The signal's values for every row of the split: (N,) or (N, d)."""

    def get_all(self, name: str, split: str = "train") -> list[tuple[dict, np.ndarray]]:
        """Several variants of a signal (e.g. one per checkpoint) with their metadata (`lr`, ...)."""

    def get_rows_all(self, name: str, rows: np.ndarray, split: str = "train") -> list[tuple[dict, np.ndarray]]:
        """Like get_all, for the given rows only (a `probe` need: only these rows are computed)."""

    def variants(self, name: str, split: str = "train") -> list[tuple[dict, tuple[int, ...]]]:
        """Metadata and shape of each variant of a signal (as get_all lists them), without reading its values."""

    def map_rows(self, name: str, fn: RowMap, split: str = "train", variant: int = -1) -> np.ndarray:
        """``fn`` over every row of one variant, block by block: (N, ...) per-row results. The store-backed source
        streams shards (never the whole signal in memory), splits them across ranks or Dask workers, and caches
        the results while the signal and the rule are unchanged."""

    def search(self, name: str, queries: np.ndarray, k: int, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
        """Inner-product kNN over the split's signal (FAISS): (scores, row ids), each (Q, k)."""

    def derived(self, stage, source: str, split: str = "train") -> np.ndarray:
        """A signal computed from the whole of signal `source` (`stages.derived.DerivedStage`), one value per row:
        stored under the source's key and the stage's parameters, computed once and reused."""


@dataclass
class DecisionContext:
    """Handed to a strategy at each decision; identical on every rank."""

    step: int
    num_rows: int
    domain_ids: np.ndarray
    domain_names: list[str]
    rng: np.random.Generator
    signals: SignalSource
    target_domain_ids: np.ndarray | None = None
    log: dict = field(default_factory=dict)
    init_proportions: np.ndarray | None = None
    """The mixture the run started with (what warm-up windows were drawn from)."""

    @property
    def num_domains(self) -> int:
        return len(self.domain_names)


class InMemorySignals:
    """A SignalSource over arrays (tests, custom scripts); `search` is exact brute force."""

    def __init__(self, train: dict | None = None, target: dict | None = None, variants: dict | None = None):
        self._data = {"train": dict(train or {}), "target": dict(target or {})}
        self._variants = dict(variants or {})  # (name, split) -> [(meta, array)]
        self.rows_read: list[tuple[str, str, np.ndarray]] = []  # what get_rows_all was asked for
        self._derived: dict[tuple, np.ndarray] = {}  # derived once per stage, as the store keeps them

    def get(self, name: str, split: str = "train") -> np.ndarray:
        try:
            return np.asarray(self._data[split][name])
        except KeyError:
            if (name, split) in self._variants:
                return np.asarray(self._variants[(name, split)][-1][1])
            raise FlexfeedError(f"signal {name!r} of the {split} split is not available",
                                "run the stage that produces it") from None

    def get_all(self, name: str, split: str = "train") -> list[tuple[dict, np.ndarray]]:
        if (name, split) in self._variants:
            return [(dict(m), np.asarray(a)) for m, a in self._variants[(name, split)]]
        return [({"lr": 1.0}, self.get(name, split))]

    def get_rows_all(self, name: str, rows: np.ndarray, split: str = "train") -> list[tuple[dict, np.ndarray]]:
        rows = np.asarray(rows, dtype=np.int64)
        self.rows_read.append((name, split, rows.copy()))
        return [(meta, values[rows]) for meta, values in self.get_all(name, split)]

    def variants(self, name: str, split: str = "train") -> list[tuple[dict, tuple[int, ...]]]:
        return [(meta, np.shape(values)) for meta, values in self.get_all(name, split)]

    def map_rows(self, name: str, fn: RowMap, split: str = "train", variant: int = -1) -> np.ndarray:
        return apply_blocks(fn, self.get_all(name, split)[variant][1])

    def search(self, name: str, queries: np.ndarray, k: int, split: str = "train"):
        return exact_search(self.get(name, split), queries, k)

    def derived(self, stage, source: str, split: str = "train") -> np.ndarray:
        key = (stage, source, split)
        if key not in self._derived:
            self._derived[key] = np.asarray(stage.derive(self.get(source, split)))
        return self._derived[key]


def exact_search(values: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force inner-product kNN: (scores, row ids), each (Q, min(k, N)), ties by row id."""
    base = np.asarray(values, dtype=np.float32)
    q = np.atleast_2d(np.asarray(queries, dtype=np.float32))
    scores = q @ base.T
    k = min(k, base.shape[0])
    ids = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, ids, axis=1), ids
