"""`dynamic_moe`: domain proportions from how differently a mixture-of-experts model routes each domain (Zhu et al.
2024, Algorithm 1).

Each domain d is measured on up to `eval_rows` rows: those of its mixer evaluation dataset (`mixer_eval_dataset`,
`<dataset>_eval`), else rows held out of its training rows (seeded; at most half the domain), never trained on.
At a decision the live model routes their tokens (the `gate_load` signal: per row, the top-k token counts per
expert of every MoE layer, computed for these rows only), and

    O_d     = sum of the counts of d's measured rows, L1-normalised            (d's expert load profile)
    Delta_d = mean_j ||O_d - O_j||_2                                          (how far d routes from the rest)
    w       <- (1 - c) softmax(log w + eta Delta) + c / D

so a domain whose tokens go to experts the others do not use gains weight, and redundant domains lose it;
the smoothing c keeps every domain sampled. w starts from the run's initial mixture (uniform by default).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stages.moe import moe_layout
from store.errors import FlexfeedError

from ..base import Mixer, SignalNeed
from ..registry import MIXERS
from ..simplex import softmax

HELD_OUT_STREAM = 7_000
"""Seeds the choice of each domain's held-out rows (with the run's seed and the domain's index)."""


@dataclass(kw_only=True)
class DynamicMoEParams:
    """Parameters of the expert-load mixer."""

    eta: float = 10.0
    """Step size on the redundancy Delta in log-weight space: larger moves the proportions faster."""
    c: float = 0.05
    """Smoothing towards uniform, in [0, 1): every domain keeps at least c / D of the mixture."""
    eval_rows: int = 1000
    """Rows held out of each domain (at most half of it) whose expert loads stand for the domain; never trained on."""

    def __post_init__(self):
        if not self.eta >= 0:
            raise FlexfeedError(f"dynamic_moe eta must be >= 0, got {self.eta}", "the paper's code uses eta: 10.0")
        if not 0 <= self.c < 1:
            raise FlexfeedError(f"dynamic_moe c must be in [0, 1), got {self.c}", "use c: 0.05")
        if self.eval_rows < 1:
            raise FlexfeedError(f"dynamic_moe eval_rows must be >= 1, got {self.eval_rows}", "use eval_rows: 1000")


def held_out_rows(domain_ids: np.ndarray, num_domains: int, eval_rows: int, seed: int,
                  skip: np.ndarray | None = None) -> np.ndarray:
    """min(eval_rows, n_d // 2) seeded rows of each domain d not in `skip`, sorted; a domain of one row is refused."""
    out = [np.empty(0, dtype=np.int64)]
    for d in range(num_domains):
        if skip is not None and d in skip:
            continue
        rows = np.flatnonzero(domain_ids == d)
        take = min(eval_rows, rows.size // 2)
        if take == 0:
            raise FlexfeedError(f"dataset {d} (in `dataset` order) has {rows.size} row(s): dynamic_moe holds rows of "
                                "each dataset out of training to measure its expert loads, and needs at least 2",
                                "give every dataset at least 2 rows, or a mixer evaluation set <dataset>_eval "
                                "(mixer_eval_dataset), or choose another mixer")
        rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, HELD_OUT_STREAM, d])
        out.append(np.sort(rng.choice(rows, size=take, replace=False)))
    return np.concatenate(out)


def eval_set_rows(eval_domains: np.ndarray, eval_rows: int, seed: int) -> np.ndarray:
    """Up to eval_rows seeded rows of the mixer evaluation split per domain it measures, sorted."""
    out = [np.empty(0, dtype=np.int64)]
    for d in np.unique(eval_domains):
        rows = np.flatnonzero(eval_domains == d)
        rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, HELD_OUT_STREAM + 1, int(d)])
        out.append(np.sort(rng.choice(rows, size=min(eval_rows, rows.size), replace=False)))
    return np.concatenate(out)


def load_profiles(counts: np.ndarray, domains: np.ndarray, num_domains: int) -> np.ndarray:
    """(D, layers x experts): each domain's summed expert counts, L1-normalised."""
    sums = np.zeros((num_domains, counts.shape[1]))
    np.add.at(sums, domains, counts)
    totals = sums.sum(axis=1, keepdims=True)
    if (totals <= 0).any():
        empty = [int(d) for d in np.flatnonzero(totals[:, 0] <= 0)]
        raise FlexfeedError(f"no token of dataset(s) {empty} was routed to any expert",
                            "check that the held-out rows have tokens (cutoff_len) and the model routes them")
    return sums / totals


def redundancy(profiles: np.ndarray) -> np.ndarray:
    """Delta_d = mean over every domain j (d itself included, at distance 0) of ||O_d - O_j||_2."""
    return np.linalg.norm(profiles[:, None, :] - profiles[None, :, :], axis=2).mean(axis=1)


def next_weights(w: np.ndarray, delta: np.ndarray, eta: float, c: float) -> np.ndarray:
    """(1 - c) softmax(log w + eta Delta) + c / D."""
    return (1 - c) * softmax(np.log(np.maximum(w, 1e-300)) + eta * delta) + c / len(w)


@MIXERS.register("dynamic_moe")
class DynamicMoEMixer(Mixer):
    """Reads the live model's routing of each domain's held-out rows at every decision."""

    Params = DynamicMoEParams
    paper = ("Zhu, Dong, Qu, Ruan, Chen, Cheng, Dynamic Data Mixing Maximizes Instruction Tuning for Mixture-of-Experts, "
             "NAACL 2025 (arXiv 2406.11256)")
    rule = ("domains routed to experts unlike the others' (mean L2 distance of L1-normalised expert loads of "
            "measured rows, every MoE layer) gain weight: w <- (1 - c) softmax(log w + eta Delta) + c / D")

    def __init__(self, params=None, seed: int = 0):
        super().__init__(params, seed)
        self.w: np.ndarray | None = None

    @classmethod
    def check_config(cls, cfg) -> None:
        """Refuse, at load, a model without a mixture-of-experts router (when its config.json is at hand; a hub id
        is checked when the run plans its signals, still before training)."""
        config = Path(cfg.model.model_name_or_path).expanduser() / "config.json"
        if config.is_file():
            moe_layout(json.loads(config.read_text()))

    def needs(self) -> list[SignalNeed]:
        """Expert loads of the measured rows only (held-out train rows, mixer evaluation rows), routed by the live
        model at each decision."""
        return [SignalNeed("gate_load", "train", live=True, rows="probe"),
                SignalNeed("gate_load", "mixer_eval", live=True, rows="probe")]

    def held_out_rows(self, domain_ids: np.ndarray, num_domains: int) -> np.ndarray:
        """`eval_rows` seeded rows of each domain without a mixer evaluation set (at most half of it): measured at
        decisions, never trained on."""
        return held_out_rows(np.asarray(domain_ids), num_domains, self.params.eval_rows, self.seed, self.eval_domains)

    def measured_loads(self, ctx) -> tuple[np.ndarray, np.ndarray]:
        """(expert counts, training-domain index) of every measured row, at the live model."""
        rows = self.held_out_rows(ctx.domain_ids, ctx.num_domains)
        counts, domains = [], []
        if rows.size:
            counts.append(ctx.signals.get_rows_all("gate_load", rows)[-1][1])
            domains.append(np.asarray(ctx.domain_ids)[rows])
        if self.eval_domains is not None:
            own = eval_set_rows(self.eval_domains, self.params.eval_rows, self.seed)
            counts.append(ctx.signals.get_rows_all("gate_load", own, "mixer_eval")[-1][1])
            domains.append(self.eval_domains[own])
        return np.concatenate(counts).astype(np.float64), np.concatenate(domains)

    def proportions(self, ctx) -> np.ndarray:
        k = ctx.num_domains
        counts, domains = self.measured_loads(ctx)
        profiles = load_profiles(counts, domains, k)
        delta = redundancy(profiles)
        if self.w is None:
            start = ctx.init_proportions if ctx.init_proportions is not None else np.full(k, 1.0 / k)
            self.w = np.asarray(start, dtype=np.float64) / np.sum(start)
        self.w = next_weights(self.w, delta, self.params.eta, self.params.c)
        ctx.log["dynamic_moe"] = {"delta": dict(zip(ctx.domain_names, map(float, delta), strict=True)),
                                  "measured_rows": dict(zip(ctx.domain_names, map(int, np.bincount(domains, minlength=k)),
                                                            strict=True))}
        return self.w.copy()

    def state_dict(self) -> dict:
        return {"w": None if self.w is None else self.w.copy()}

    def load_state_dict(self, state: dict) -> None:
        w = state.get("w")
        self.w = None if w is None else np.array(w, dtype=np.float64)
