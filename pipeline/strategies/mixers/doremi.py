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

DoReMi measures every domain on every batch: it draws batches from the reference mixture and trains
the proxy on the alpha_t-weighted domain losses. Three forms (`form`):

    reweight (default, DoReMi's own): windows drawn by the reference proportions q (the run's initial
        mixture: uniform unless configured), with exact quotas, so every domain with q_k * window >= 1
        is measured at every update; each sample's loss is weighted alpha_t[d] / q[d], so the batch loss
        estimates sum_k alpha_k * (mean loss of domain k).
    sample: windows drawn by alpha_t itself, the counts drawn at random (multinomial over one batch,
        scaled to the window) so each domain's expected count is alpha_k * B and a low-weight domain is
        still measured now and then; each sample's loss is weighted alpha_t[d] / (the alpha its window
        was drawn with)[d] (1 unless a batch was drawn before the latest update).
    weights_only: the draw is left to the plan (uniform rows, or another stage); each sample is weighted
        alpha[d] / (share of domain d in the batch). Composes with a drawing select stage.

The iterates oscillate, so the run's output (what the final run samples with) is their average, as in
DoReMi. A decision with no batch observed since the previous one makes no update and does not count
toward the average.
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
    form: Literal["reweight", "sample", "weights_only"] = "reweight"
    """`reweight` (DoReMi's): windows drawn by the reference (initial) mixture, each loss weighted alpha/q;
    `sample`: windows drawn by alpha_t with random counts, importance-weighted; `weights_only`: the draw left to
    the plan, each loss weighted alpha over its domain's batch share (composes with a drawing select stage)."""

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


def random_counts(rng: np.random.Generator, p: np.ndarray, num_samples: int) -> np.ndarray:
    """Multinomial counts of `num_samples` draws with probabilities p, as proportions (counts / num_samples).

    A window is a whole number of batches, so the scheduler's exact quotas turn these proportions into the
    drawn counts times the number of batches: each domain's expected count is p_k times the window."""
    return rng.multinomial(num_samples, p / p.sum()) / num_samples


@MIXERS.register("doremi")
class DoReMiMixer(Mixer):
    """Online Group DRO over domains: measures every domain, weights losses by alpha, outputs alpha's average."""

    Params = DoReMiParams
    paper = ("Xie et al., DoReMi: Optimizing Data Mixtures Speeds Up Language Model Pretraining, NeurIPS 2023 "
             "(arXiv 2305.10429)")
    rule = ("Group DRO: exponentiated gradient on each domain's excess loss over the reference model, smoothed, the "
            "running average as output; losses weighted alpha over the draw share")

    def __init__(self, params=None, seed: int = 0):
        super().__init__(params, seed)
        self._buffer: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # (domains, losses, rows) per batch
        self.alpha: np.ndarray | None = None  # current weights alpha_t, used for sampling
        self.alpha_sum: np.ndarray | None = None  # sum of alpha_1..alpha_T, for the average
        self.num_updates = 0
        self.domain_names: list[str] = []
        self.last_excess: np.ndarray | None = None  # per domain, carried over for unsampled domains
        self.batch_samples = 0  # samples of the last observed batch: the unit of the sample form's random draw
        self.drawn: list[tuple[int, np.ndarray]] = []  # (decision step, distribution its windows are drawn from)

    def needs(self) -> list[SignalNeed]:
        """The reference model's per-sample losses, computed once offline."""
        return [SignalNeed("ref_loss", "train", refresh=False)]

    @property
    def loss_space(self) -> bool:
        """Only `weights_only` leaves the draw to the plan and acts in loss space alone."""
        return self.params.form == "weights_only"

    @property
    def importance_weighted(self) -> bool:
        """`reweight` and `sample` draw the window and weight each loss by alpha over its draw probability."""
        return self.params.form != "weights_only"

    def weights(self, losses, rows, domains, step: int) -> np.ndarray:
        """Per-sample loss weights (ones before the first decision).

        `reweight`/`sample`: alpha_t[d] / q[d], q the distribution the sample's window was drawn from, so the batch
        loss mean_i(w_i l_i) estimates sum_k alpha_k * (mean loss of domain k) without bias;
        `weights_only`: alpha[d] / (share of d in the batch), so it is that sum over the domains present."""
        domains = np.asarray(domains, dtype=np.int64)
        if self.alpha is None:
            return np.ones(len(domains))
        if self.loss_space:
            share = np.bincount(domains, minlength=len(self.alpha))[domains] / len(domains)
            return self.alpha[domains] / share
        drawn = [q for s, q in self.drawn if s <= step]
        if not drawn:  # a warm-up window, drawn from the initial mixture before any decision
            return np.ones(len(domains))
        return self.alpha[domains] / drawn[-1][domains]

    def observe(self, domains, losses, rows, step: int) -> None:
        """Buffer the batch; excess losses are computed at the next decision, where ref_loss is read."""
        batch = as_batch(domains, losses, rows)
        self.batch_samples = len(batch[0]) or self.batch_samples
        self._buffer.append(batch)

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
        """Update alpha from the excess losses since the last decision; return the proportions to draw with."""
        k = ctx.num_domains
        if self.alpha is None:
            self.alpha, self.alpha_sum = np.full(k, 1.0 / k), np.zeros(k)
        elif len(self.alpha) != k:
            raise FlexfeedError(f"doremi state has {len(self.alpha)} domains but the run has {k}",
                                "resume only with the same datasets")
        self.domain_names = list(ctx.domain_names)
        if self._buffer:  # nothing observed: no evidence, no step (the average is not diluted either)
            self._update(ctx)
        return self._draw(ctx)

    def _update(self, ctx) -> None:
        k = ctx.num_domains
        excess, counts = self._excess(ctx)
        # A domain that got no rows since the last decision keeps its last measured excess: counting it
        # as 0 would shrink its weight on no evidence.
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

    def _draw(self, ctx) -> np.ndarray:
        """The proportions of the next window: alpha (weights_only: the plan ignores them), the reference
        mixture (reweight), or a random draw of alpha (sample); what it is drawn from is kept for weights()."""
        form = self.params.form
        if form == "weights_only":
            return self.alpha.copy()
        if form == "reweight":
            ref = ctx.init_proportions
            q = np.full(ctx.num_domains, 1.0 / ctx.num_domains) if ref is None else np.asarray(ref, np.float64)
            q = q / q.sum()
            out = q
        else:
            q = self.alpha.copy()
            # before any batch the unit is unknown: exact quotas of alpha_0 (uniform) measure every domain
            out = random_counts(ctx.rng, q, self.batch_samples) if self.batch_samples else q
        self.drawn = [*[d for d in self.drawn if d[0] < ctx.step][-3:], (int(ctx.step), q.copy())]
        ctx.log["doremi/drawn_from"] = q.tolist()
        return out.copy()

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
            "batch_samples": self.batch_samples,
            "drawn_steps": np.array([d[0] for d in self.drawn], dtype=np.int64),
            "drawn_from": np.array([d[1] for d in self.drawn]) if self.drawn else np.zeros((0, 0)),
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
        self.batch_samples = int(state.get("batch_samples", 0))
        steps = np.asarray(state.get("drawn_steps", np.zeros(0)), dtype=np.int64).reshape(-1)
        dists = np.asarray(state.get("drawn_from", np.zeros((0, 0))), dtype=np.float64)
        self.drawn = [(int(s), dists[i].copy()) for i, s in enumerate(steps)]
