"""`doremi`: Group DRO domain weights from the excess loss over a reference model (DoReMi, Xie et al. 2023).

At each decision, with the samples observed since the previous one:

    excess_k = mean over samples x of domain k of max(loss_proxy(x) - loss_ref(x), 0)   (0 if none seen)
    alpha'   = alpha * exp(eta * excess), normalised to sum 1
    alpha    = (1 - eps) * alpha' + eps / K
    avg      = (alpha_1 + ... + alpha_T) / T

`loss_proxy(x)` is the token-mean loss the trainer observed for row x; `loss_ref(x)` is the stored
`ref_loss` signal (the reference model's token-mean loss on the same row, computed offline).
DoReMi clips per token and averages over a domain's tokens; here the clip is applied to each sample's
mean loss, because per-token reference losses are not stored. Negative token excesses inside a sample
therefore offset positive ones, so this excess is never above the per-token one (for equal lengths).

Sampling uses the current alpha_t, not the average. DoReMi trains the proxy on the alpha_t-weighted
domain losses; drawing the batch's domains with probabilities alpha_t optimises the same objective in
expectation, and it is the form a mixer can act on. The iterates oscillate, so the run's output (what
the final run samples with) is their average, as in DoReMi. A decision with no batch observed since the
previous one makes no update and does not count toward the average.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from store.errors import FlexfeedError

from ..base import Mixer, SignalNeed
from ..registry import MIXERS
from .grouping import as_batch, check_domain_ids, per_domain_mean
from .weights_file import write_domain_weights


@dataclass(kw_only=True)
class DoReMiParams:
    """Parameters of the DoReMi mixer (names as in DataFlex's doremi component)."""

    reweight_eta: float = 1.0
    """Step size eta of the exponentiated-gradient update (DoReMi uses 1.0)."""
    reweight_eps: float = 1e-3
    """Smoothing eps toward uniform after each update, in [0, 1] (DoReMi's c = 1e-3)."""
    form: Literal["sample", "reweight"] = "sample"
    """`sample`: draw each window's domains with alpha_t (takes the budget); `reweight`: DoReMi's own form,
    batches drawn without it and each sample's loss weighted so the batch loss is sum_k alpha_k * mean loss_k
    (a loss-space stage: it multiplies with weighters)."""

    def __post_init__(self):
        if not self.reweight_eta > 0:
            raise FlexfeedError(f"doremi reweight_eta must be > 0, got {self.reweight_eta}",
                                "DoReMi uses reweight_eta: 1.0")
        if not 0.0 <= self.reweight_eps <= 1.0:
            raise FlexfeedError(f"doremi reweight_eps must be in [0, 1], got {self.reweight_eps}",
                                "DoReMi uses reweight_eps: 0.001")


def doremi_step(alpha: np.ndarray, excess: np.ndarray, eta: float, eps: float) -> np.ndarray:
    """One exponentiated-gradient step with smoothing: (1-eps) * normalise(alpha * exp(eta*excess)) + eps/K."""
    with np.errstate(divide="ignore"):
        logits = np.log(alpha) + eta * excess  # log space: exp(eta * excess) alone can overflow
    logits -= logits.max()
    prime = np.exp(logits)
    prime /= prime.sum()
    return (1.0 - eps) * prime + eps / len(alpha)


@MIXERS.register("doremi")
class DoReMiMixer(Mixer):
    """Online Group DRO over domains; samples with the current weights, outputs their running average."""

    Params = DoReMiParams

    def __init__(self, params=None, seed: int = 0):
        super().__init__(params, seed)
        self._buffer: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # (domains, losses, rows) per batch
        self.alpha: np.ndarray | None = None  # current weights alpha_t, used for sampling
        self.alpha_sum: np.ndarray | None = None  # sum of alpha_1..alpha_T, for the average
        self.num_updates = 0
        self.domain_names: list[str] = []
        self.last_excess: np.ndarray | None = None  # per domain, carried over for unsampled domains

    def needs(self) -> list[SignalNeed]:
        """The reference model's per-sample losses, computed once offline."""
        return [SignalNeed("ref_loss", "train", refresh=False)]

    @property
    def loss_space(self) -> bool:
        """In its reweighting form DoReMi weights losses instead of drawing domains."""
        return self.params.form == "reweight"

    def weights(self, losses, rows, domains, step: int) -> np.ndarray:
        """Reweighting form: w_i = alpha_{d(i)} / (share of domain d(i) in the batch), so that the batch loss
        mean_i(w_i l_i) is sum_k alpha_k * (mean loss of domain k); ones before the first decision."""
        domains = np.asarray(domains, dtype=np.int64)
        if self.alpha is None:
            return np.ones(len(domains))
        share = np.bincount(domains, minlength=len(self.alpha))[domains] / len(domains)
        return self.alpha[domains] / share

    def observe(self, domains, losses, rows, step: int) -> None:
        """Buffer the batch; excess losses are computed at the next decision, where ref_loss is read."""
        self._buffer.append(as_batch(domains, losses, rows))

    def _excess(self, ctx) -> tuple[np.ndarray, np.ndarray]:
        domains = np.concatenate([b[0] for b in self._buffer])
        losses = np.concatenate([b[1] for b in self._buffer])
        rows = np.concatenate([b[2] for b in self._buffer])
        check_domain_ids(domains, ctx.num_domains)
        ref = np.asarray(ctx.signals.get("ref_loss", "train"), dtype=np.float64).reshape(-1)
        if len(rows) and (rows.min() < 0 or rows.max() >= len(ref)):
            raise FlexfeedError(f"row {int(rows.max())} was trained on but ref_loss has {len(ref)} rows",
                                "compute ref_loss with the loss stage on this run's train data")
        excess = np.maximum(losses - ref[rows], 0.0)
        return per_domain_mean(excess, domains, ctx.num_domains)

    def proportions(self, ctx) -> np.ndarray:
        """Update alpha from the excess losses since the last decision; return the current alpha."""
        k = ctx.num_domains
        if self.alpha is None:
            self.alpha, self.alpha_sum = np.full(k, 1.0 / k), np.zeros(k)
        elif len(self.alpha) != k:
            raise FlexfeedError(f"doremi state has {len(self.alpha)} domains but the run has {k}",
                                "resume only with the same datasets")
        self.domain_names = list(ctx.domain_names)
        if not self._buffer:  # nothing observed: no evidence, no step (the average is not diluted either)
            return self.alpha.copy()
        excess, counts = self._excess(ctx)
        # A domain the sampler gave no rows since the last decision keeps its last measured excess:
        # counting it as 0 would lock it out (its weight only shrinks, so it is never sampled again).
        if self.last_excess is None:
            self.last_excess = np.zeros(k)
        excess = np.where(counts > 0, excess, self.last_excess)
        self.last_excess = excess.copy()
        self.alpha = doremi_step(self.alpha, excess, self.params.reweight_eta, self.params.reweight_eps)
        self.alpha_sum += self.alpha
        self.num_updates += 1
        self._buffer.clear()
        ctx.log.update({"doremi/excess": excess.tolist(), "doremi/counts": counts.tolist(),
                        "doremi/alpha": self.alpha.tolist(), "doremi/average": self.average().tolist()})
        return self.alpha.copy()

    def average(self) -> np.ndarray:
        """Running average of alpha over the updates so far (uniform before the first)."""
        if self.num_updates == 0:
            k = len(self.alpha) if self.alpha is not None else max(len(self.domain_names), 1)
            return np.full(k, 1.0 / k)
        avg = self.alpha_sum / self.num_updates
        return avg / avg.sum()

    def final_weights(self, domain_names: list[str] | None = None) -> dict[str, float]:
        """The run's output: the averaged domain weights as {domain name: weight} (uniform if no update ran)."""
        names = list(domain_names) if domain_names is not None else self.domain_names
        if not names:
            raise FlexfeedError("doremi does not know the domain names yet", "pass the run's domain names")
        if self.alpha is not None and len(names) != len(self.alpha):
            raise FlexfeedError(f"doremi has weights for {len(self.alpha)} domains, got {len(names)} names",
                                "pass the run's domain names, in dataset order")
        weights = self.average() if self.num_updates else np.full(len(names), 1.0 / len(names))
        return {n: float(w) for n, w in zip(names, weights)}

    def write_final_weights(self, path, domain_names: list[str] | None = None) -> Path:
        """Write final_weights() as domain_weights.json (the static mixer of the final run reads it)."""
        weights = self.final_weights(domain_names)
        last = {} if self.alpha is None else {n: float(a) for n, a in zip(weights, self.alpha)}
        return write_domain_weights(path, list(weights), np.array(list(weights.values())),
                                    num_updates=self.num_updates, last_alpha=last)

    def state_dict(self) -> dict:
        # Batch boundaries do not matter to the update, so the buffer is kept as three flat arrays.
        domains, losses, rows = (np.concatenate([b[i] for b in self._buffer]) if self._buffer
                                 else np.zeros(0, dtype) for i, dtype in enumerate((np.int64, np.float64, np.int64)))
        return {
            "alpha": None if self.alpha is None else self.alpha.copy(),
            "alpha_sum": None if self.alpha_sum is None else self.alpha_sum.copy(),
            "num_updates": self.num_updates,
            "domain_names": list(self.domain_names),
            "last_excess": None if self.last_excess is None else self.last_excess.copy(),
            "buffer_domains": domains, "buffer_losses": losses, "buffer_rows": rows,
        }

    def load_state_dict(self, state: dict) -> None:
        self.alpha = None if state.get("alpha") is None else np.array(state["alpha"], dtype=np.float64)
        self.alpha_sum = None if state.get("alpha_sum") is None else np.array(state["alpha_sum"], dtype=np.float64)
        self.num_updates = int(state.get("num_updates", 0))
        self.domain_names = list(state.get("domain_names", []))
        last = state.get("last_excess")
        self.last_excess = None if last is None else np.array(last, dtype=np.float64)
        batch = as_batch(state["buffer_domains"], state["buffer_losses"], state["buffer_rows"])
        self._buffer = [batch] if len(batch[0]) else []
