"""`joint_update_aware`: batch weights that favour rows aligned with a target set and not redundant with each other.

For the B rows of a (global) batch, z_i is the L2-normalised pooled hidden state of row i, taken from the
training forward itself (the `embed:` section's layer and pooling; no second forward), and u the normalised
mean of the target set's embeddings under the same layer and pooling, read from the store's `embed` signal
of the target split and refreshed at the live model whenever the weight stage fires. With s = Z u (how much
each row points at the target) and S = Z Z^T (cosine Gram matrix: how much rows repeat each other), the
weights are the maximiser on the simplex of

    J(w) = s^T w - (beta / 2) w^T S w + tau H(w),        H(w) = -sum_i w_i log w_i.

J is strictly concave (S is positive semi-definite, H strictly concave), so the maximiser is unique and
interior; setting the gradient equal on every coordinate gives the fixed point w = softmax((s - beta S w) /
tau), reached by damped iteration w <- (1 - rho) w + rho softmax(...), halving rho whenever the residual
|T(w) - w|_1 grows, until it is below `tol`. Modes drop a term: `align_only` (beta = 0, closed form
softmax(s / tau)), `diverse_only` (s = 0), `uniform` (all equal). The returned weights are B w, averaging 1
(DataFlex's weights sum to 1 and scale the summed loss: the same objective).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from stages.embed import resolve_backend
from stages.vectors import unit_rows
from store.errors import FlexfeedError

from ..base import SignalNeed, Weighter
from ..registry import WEIGHTERS
from ..simplex import effective_sample_size, softmax

MODES = ("full", "align_only", "diverse_only", "uniform")


@dataclass(kw_only=True)
class JointUpdateAwareParams:
    """Parameters of the joint-update-aware weighter."""

    beta: float = 0.1
    """Strength of the redundancy penalty (beta / 2) w^T S w: larger spreads weight away from similar rows."""
    tau: float = 0.05
    """Entropy temperature: smaller makes the weights sharper, larger brings them towards uniform."""
    objective_mode: Literal["full", "align_only", "diverse_only", "uniform"] = "full"
    """`full`: both terms; `align_only`: target alignment only; `diverse_only`: redundancy only; `uniform`: all 1."""
    damping: float = 1.0
    """Initial damping rho in (0, 1] of the fixed-point step (halved whenever the residual grows)."""
    max_iters: int = 200
    """Most fixed-point iterations per batch; a batch that has not converged by then is counted in the log."""
    tol: float = 1e-8
    """Convergence: stop once |softmax((s - beta S w) / tau) - w|_1 is below this."""

    def __post_init__(self):
        if not self.tau > 0:
            raise FlexfeedError(f"joint_update_aware tau must be > 0, got {self.tau}", "use tau: 0.05")
        if not self.beta >= 0:
            raise FlexfeedError(f"joint_update_aware beta must be >= 0, got {self.beta}", "use beta: 0.1")
        if not 0 < self.damping <= 1:
            raise FlexfeedError(f"joint_update_aware damping must be in (0, 1], got {self.damping}", "use damping: 1.0")
        if self.max_iters < 1 or not self.tol > 0:
            raise FlexfeedError(f"joint_update_aware needs max_iters >= 1 and tol > 0, got {self.max_iters}, "
                                f"{self.tol}", "use max_iters: 200, tol: 1.0e-8")
        if self.objective_mode not in MODES:
            raise FlexfeedError(f"unknown joint_update_aware objective_mode {self.objective_mode!r}",
                                f"choose one of: {', '.join(MODES)}")


@dataclass
class Solution:
    """Simplex weights of one batch and how the iteration got there."""

    w: np.ndarray
    """Weights on the simplex (sum 1)."""
    iters: int
    """Fixed-point iterations run."""
    residual: float
    """|T(w) - w|_1 at the returned w."""
    converged: bool


def solve_weights(s: np.ndarray, gram: np.ndarray, p: JointUpdateAwareParams) -> Solution:
    """The maximiser of s^T w - (beta/2) w^T S w + tau H(w) on the simplex, per objective_mode."""
    n = s.size
    uniform = np.full(n, 1.0 / n)
    if p.objective_mode == "uniform" or n == 1:
        return Solution(uniform, 0, 0.0, True)
    if p.objective_mode == "align_only" or p.beta == 0:
        return Solution(softmax(s / p.tau), 0, 0.0, True)
    lin = np.zeros(n) if p.objective_mode == "diverse_only" else s

    def step(w: np.ndarray) -> np.ndarray:
        return softmax((lin - p.beta * (gram @ w)) / p.tau)

    w, rho, last = uniform, p.damping, np.inf
    for it in range(p.max_iters):
        proposal = step(w)
        residual = float(np.abs(proposal - w).sum())
        if residual < p.tol:
            return Solution(w, it, residual, True)
        if residual > last:  # oscillating around the fixed point: take smaller steps
            rho /= 2
        last = residual
        w = (1 - rho) * w + rho * proposal
    residual = float(np.abs(step(w) - w).sum())
    return Solution(w, p.max_iters, residual, residual < p.tol)


@WEIGHTERS.register("joint_update_aware", "jua")
class JointUpdateAwareWeighter(Weighter):
    """Weights each batch by target alignment against redundancy, from the training forward's hidden states."""

    Params = JointUpdateAwareParams
    reads_batch_hidden = True
    paper = ("Liang et al., DataFlex: A Unified Framework for Data-Centric Dynamic Training of Large Language Models, "
             "arXiv 2603.26164 (joint-update-aware reweighting)")
    rule = ("argmax on the simplex of s^T w - (beta/2) w^T S w + tau H(w), s = Z u (alignment of the batch's "
            "pooled hidden states to the target mean), S = Z Z^T (redundancy); damped fixed point, mean 1")

    def __init__(self, params=None, seed: int = 0):
        super().__init__(params, seed)
        self.target: np.ndarray | None = None  # u: unit mean of the target set's embeddings at the last update
        self.last: dict = {}

    @classmethod
    def check_config(cls, cfg) -> None:
        """Refuse an `embed:` other than the training model's pooled hidden states: the batch rows (training forward)
        and the target rows (embed signal) would then live in different spaces."""
        embed = cfg.embed
        if embed.model_name_or_path is not None or resolve_backend(embed.backend) != "hf":
            raise FlexfeedError(
                f"component 'joint_update_aware' compares each batch's hidden states (training model) with the target "
                f"set's `embed` signal, but embed uses backend {embed.backend!r}"
                + (f" and model {embed.model_name_or_path!r}" if embed.model_name_or_path else ""),
                "set embed.backend: hf and leave embed.model_name_or_path unset, so both are the training model's "
                "pooled hidden states (embed.layer, embed.pooling)")

    def needs(self) -> list[SignalNeed]:
        """The target set's embeddings (training model, `embed:` layer and pooling), at the live model."""
        return [SignalNeed("embed", "target", live=True)]

    def update(self, ctx) -> None:
        """u = the unit mean of the target embeddings as they are at this decision."""
        target = np.asarray(ctx.signals.get("embed", "target"), dtype=np.float64)
        if target.ndim != 2 or len(target) == 0:
            raise FlexfeedError(f"the target embed signal has shape {target.shape}",
                                "set eval_dataset (or target_dataset) and embed it with the training model")
        mean = unit_rows(target, None).mean(axis=0)
        self.target = unit_rows(mean, None)
        # 1 when every target row points the same way, near 0 when they cancel out (u is then a weak direction)
        ctx.log["joint_update_aware/target_mean_norm"] = float(np.linalg.norm(mean))

    def weights(self, losses, rows, domains, step: int) -> np.ndarray:
        """B x the simplex maximiser for this batch's hidden states (all ones before the first update)."""
        n = np.asarray(losses).reshape(-1).size
        if self.target is None or n == 0:
            return np.ones(n)
        z = np.asarray(self.batch_hidden, dtype=np.float64) if self.batch_hidden is not None else None
        if z is None or z.shape != (n, self.target.size):
            raise FlexfeedError(f"joint_update_aware got batch hidden states of shape "
                                f"{None if z is None else z.shape} for {n} rows and a {self.target.size}-dim target",
                                "embed the target set with the training model (embed.backend: hf, no "
                                "embed.model_name_or_path)")
        z = unit_rows(z, None)
        sol = solve_weights(z @ self.target, z @ z.T, self.params)
        w = n * sol.w
        self.last = {"ess": effective_sample_size(w), "iters": sol.iters, "residual": sol.residual,
                     "converged": sol.converged}
        return w

    def batch_log(self) -> dict:
        return dict(self.last)

    def state_dict(self) -> dict:
        return {"target": None if self.target is None else self.target.copy()}

    def load_state_dict(self, state: dict) -> None:
        target = state.get("target")
        self.target = None if target is None else np.array(target, dtype=np.float64)
