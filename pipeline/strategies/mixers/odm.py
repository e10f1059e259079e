"""`odm`: online data mixing as an EXP3 bandit over domains (Albalak et al. 2023, Algorithm 1).

Arms are domains; the reward of an arm is the training loss of its data (higher loss = more to learn).
The batches here mix domains, so every domain present in a batch is a played arm, rewarded with the
mean loss of its own samples in that batch. After the t-th observed batch (t = 1, 2, ...):

    R_hat_k  <- alpha * R_hat_k + (1 - alpha) * s * reward_k / p_k        (played arms only)
    eps_t    =  min(1/K, sqrt(ln K / (K * t))),  eps_0 = 1/K
    pi_{t+1} =  (1 - K * eps_{t+1}) * softmax(eps_t * R_hat) + eps_{t+1}

A round is one observed batch: in a trainer, one optimizer step (its micro-batches are observed together
under gradient accumulation), so t counts optimizer steps. p_k is the probability with which the sampler
drew domain k for that batch: the last proportions handed
out. Batches observed before the first decision (warmup, drawn from the run's initial mixture, which the
mixer is not told) are replayed at that decision with p_k = domain k's share of all warmup samples, the
empirical estimate of that mixture. s is `reward_scale`. As in the paper, the softmax uses
the previous step's exploration rate and the mixture term the new one, and pi_1 is uniform.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from store.errors import FlexfeedError

from ..base import Mixer
from ..registry import MIXERS
from ..simplex import softmax
from .grouping import as_batch, check_domain_ids, per_domain_mean


@dataclass(kw_only=True)
class ODMParams:
    """Parameters of the online data mixing bandit."""

    alpha: float = 0.9
    """Smoothing of the estimated rewards: R_hat <- alpha * R_hat + (1 - alpha) * new estimate, in [0, 1)."""
    reward_scale: float = 1.0
    """Factor on each loss before it becomes a reward (the authors' code divides losses by 10: 0.1)."""

    def __post_init__(self):
        if not 0.0 <= self.alpha < 1.0:
            raise FlexfeedError(f"odm alpha must be in [0, 1), got {self.alpha}", "the paper uses alpha: 0.9")
        if not self.reward_scale > 0:
            raise FlexfeedError(f"odm reward_scale must be > 0, got {self.reward_scale}", "use 1.0 (or 0.1)")


def exploration_rate(t: int, k: int) -> float:
    """eps_t = min(1/K, sqrt(ln K / (K t))) for t >= 1, and 1/K for t = 0."""
    if t <= 0:
        return 1.0 / k
    return min(1.0 / k, math.sqrt(math.log(k) / (k * t)))


def exp3_policy(r_hat: np.ndarray, eps_prev: float, eps_next: float) -> np.ndarray:
    """(1 - K eps_next) * softmax(eps_prev * R_hat) + eps_next."""
    return (1.0 - len(r_hat) * eps_next) * softmax(eps_prev * r_hat) + eps_next


@MIXERS.register("odm", "exp3")
class ODMMixer(Mixer):
    """Updates its policy after every observed batch; proportions() hands out the current policy."""

    Params = ODMParams
    paper = ("Albalak, Pan, Raffel, Wang, Efficient Online Data Mixing For Language Model Pre-Training, "
             "arXiv 2312.02406 (2023)")
    rule = ("EXP3 bandit over domains, each rewarded by its own samples' training loss, exploration decaying with "
            "optimizer steps")

    def __init__(self, params=None, seed: int = 0):
        super().__init__(params, seed)
        self.num_domains: int | None = None
        self.t = 0  # batches observed
        self.r_hat: np.ndarray | None = None
        self.policy: np.ndarray | None = None  # pi_{t+1}
        self.sampling: np.ndarray | None = None  # proportions the sampler is drawing with now
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []  # batches seen before K was known

    def _start(self, k: int) -> None:
        self.num_domains = k
        self.r_hat = np.zeros(k)
        self.policy = np.full(k, 1.0 / k)
        self.sampling = self.policy.copy()

    def _update(self, domains: np.ndarray, losses: np.ndarray) -> None:
        k = self.num_domains
        check_domain_ids(domains, k)
        rewards, counts = per_domain_mean(losses, domains, k)
        played = counts > 0
        # importance weights use the proportions the batch was drawn with, when the trainer knows them
        drawn = self.drawn_with if self.drawn_with is not None and len(self.drawn_with) == k else self.sampling
        estimate = self.params.reward_scale * rewards[played] / drawn[played]
        self.r_hat[played] = self.params.alpha * self.r_hat[played] + (1.0 - self.params.alpha) * estimate
        self.t += 1
        self.policy = exp3_policy(self.r_hat, exploration_rate(self.t, k), exploration_rate(self.t + 1, k))

    def observe(self, domains, losses, rows, step: int) -> None:
        """Credit each domain in the batch with its own samples' mean loss and update the policy."""
        domains, losses, _ = as_batch(domains, losses, rows)
        if self.num_domains is None:  # K arrives with the first decision context; replay then
            self._pending.append((domains, losses))
            return
        self._update(domains, losses)

    def proportions(self, ctx) -> np.ndarray:
        """The current policy; it also becomes the sampling distribution used for importance weights."""
        if self.num_domains is None:
            self._start(ctx.num_domains)
            if self._pending:
                seen = np.concatenate([d for d, _ in self._pending])
                check_domain_ids(seen, ctx.num_domains)
                self.sampling = np.bincount(seen, minlength=ctx.num_domains) / len(seen)
            for domains, losses in self._pending:
                self._update(domains, losses)
            self._pending.clear()
        elif self.num_domains != ctx.num_domains:
            raise FlexfeedError(f"odm state has {self.num_domains} domains but the run has {ctx.num_domains}",
                                "resume only with the same datasets")
        self.sampling = self.policy.copy()
        ctx.log.update({"odm/r_hat": self.r_hat.tolist(), "odm/eps": exploration_rate(self.t + 1, self.num_domains),
                        "odm/policy": self.policy.tolist()})
        return self.policy.copy()

    def state_dict(self) -> dict:
        arr = lambda x: None if x is None else x.copy()  # noqa: E731
        return {
            "num_domains": self.num_domains, "t": self.t, "r_hat": arr(self.r_hat), "policy": arr(self.policy),
            "sampling": arr(self.sampling),
            "pending_sizes": np.array([len(d) for d, _ in self._pending], dtype=np.int64),
            "pending_domains": np.concatenate([d for d, _ in self._pending]) if self._pending else np.zeros(0, np.int64),
            "pending_losses": np.concatenate([v for _, v in self._pending]) if self._pending else np.zeros(0),
        }

    def load_state_dict(self, state: dict) -> None:
        arr = lambda key: None if state.get(key) is None else np.array(state[key], dtype=np.float64)  # noqa: E731
        self.num_domains = None if state.get("num_domains") is None else int(state["num_domains"])
        self.t = int(state.get("t", 0))
        self.r_hat, self.policy, self.sampling = arr("r_hat"), arr("policy"), arr("sampling")
        # Pending batches keep their boundaries: each batch is one bandit round.
        bounds = np.cumsum(np.asarray(state.get("pending_sizes", np.zeros(0)), dtype=np.int64))[:-1]
        domains = np.split(np.asarray(state.get("pending_domains", np.zeros(0)), dtype=np.int64), bounds)
        losses = np.split(np.asarray(state.get("pending_losses", np.zeros(0)), dtype=np.float64), bounds)
        sizes = state.get("pending_sizes", np.zeros(0))
        self._pending = [(d, v) for d, v in zip(domains, losses)] if len(sizes) else []
