"""`tsds`: sampling probabilities that match the target distribution, discounted for near-duplicates.

A simplified TSDS (Liu et al. 2024, "TSDS: Data Selection for Task-Specific Model Finetuning").
TSDS solves for sampling probabilities p over candidates that minimise an optimal-transport
distance between p and the target distribution, with a kernel-density regulariser that keeps
near-duplicates from collecting mass, both restricted to kNN graphs. Here:

1. Transport (the coupling restricted to each target's K nearest candidates): target q splits its
   mass among its K neighbours j in proportion to softmax(sim(q, j) / temperature).
2. Diversity: each candidate's kernel density among candidates,
   d_j = sum over its `kde_neighbors` nearest candidates c (itself included) of
   exp(-||x_j - x_c||^2 / (2 h^2)), with ||x_j - x_c||^2 = 2 - 2 cos for unit embeddings.
   Within each target, a neighbour's share is divided by d_j ** alpha and the target's shares are
   renormalised to 1/Q, so a group of n exact duplicates shares about the mass of one row when
   alpha = 1 (alpha = 0: no diversity term), while every target keeps its 1/Q of the selection (TSDS's
   target marginal): a target whose neighbours are duplicates loses no mass to one whose are distinct.
3. `num_samples` rows are drawn without replacement with probability p (Gumbel top-k).

The simplification: one closed-form transport step (no iterative OT solve over the joint
objective), and the density discounts each target's shares instead of entering the objective.
Only the union of the targets' K neighbours can be drawn; beyond that many rows, all of them are
taken once per full pass and the remainder drawn by p.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..base import Selection, Selector, SignalNeed
from ..registry import SELECTORS
from .reading import check_shape
from .sampling import check_count, weighted_sample
from .summary import selection_info


@dataclass(kw_only=True)
class TsdsParams:
    """Parameters of the TSDS selector."""

    num_neighbors: int = 50
    """K: candidates each target sample sends its mass to."""
    temperature: float = 0.1
    """Softmax temperature on cosine similarity; smaller sends more mass to the nearest candidates."""
    alpha: float = 1.0
    """Weight of the diversity term (exponent of the density divisor; 0 turns it off)."""
    kde_neighbors: int = 10
    """Neighbours (self included) summed in a candidate's kernel density."""
    kde_bandwidth: float = 0.1
    """Gaussian kernel bandwidth h on unit-embedding distances."""

    def __post_init__(self):
        for name in ("num_neighbors", "kde_neighbors"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        for name in ("temperature", "kde_bandwidth"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0")
        if self.alpha < 0:
            raise ValueError("alpha must be >= 0")


def knn_coupling(scores: np.ndarray, ids: np.ndarray, temperature: float) -> np.ndarray:
    """(Q, K) share of each target's mass sent to each of its neighbours: softmax(sim / T) over valid ids."""
    logits = np.where(ids >= 0, scores / temperature, -np.inf).astype(np.float64)
    top = logits.max(axis=1, keepdims=True)
    coupling = np.exp(logits - np.where(np.isfinite(top), top, 0.0))
    total = coupling.sum(axis=1, keepdims=True)
    return np.divide(coupling, total, out=np.zeros_like(coupling), where=total > 0)


def kernel_density(sims: np.ndarray, ids: np.ndarray, bandwidth: float) -> np.ndarray:
    """Gaussian KDE of each query from its neighbours' cosine similarities."""
    sq_dist = np.clip(2.0 - 2.0 * sims.astype(np.float64), 0.0, None)
    return np.where(ids >= 0, np.exp(-sq_dist / (2.0 * bandwidth**2)), 0.0).sum(axis=1)


def target_marginal_mass(coupling: np.ndarray, ids: np.ndarray, num_rows: int,
                         discount: np.ndarray | None = None) -> np.ndarray:
    """Mass of each row when every target's share, times `discount` of its neighbours, is renormalised to 1/Q.

    Renormalising per target keeps TSDS's target marginal: each of the Q targets carries 1/Q of the
    selection however dense its neighbourhood is; the discount only moves mass among its own neighbours.
    """
    keep = ids >= 0
    share = coupling * (discount[np.where(keep, ids, 0)] if discount is not None else 1.0) * keep
    total = share.sum(axis=1, keepdims=True)
    share = np.divide(share, total * len(ids), out=np.zeros_like(share), where=total > 0)
    mass = np.zeros(num_rows)
    np.add.at(mass, ids[keep], share[keep])
    return mass


def tsds_probabilities(ctx, params: TsdsParams) -> np.ndarray:
    """Sampling probability of every train row (zero outside the targets' kNN)."""
    queries = np.atleast_2d(np.asarray(ctx.signals.get("embed", "target"), dtype=np.float32))
    k = min(params.num_neighbors, ctx.num_rows)
    scores, ids = ctx.signals.search("embed", queries, k, "train")
    scores, ids = np.asarray(scores), np.asarray(ids)
    coupling = knn_coupling(scores, ids, params.temperature)
    discount = None
    if params.alpha > 0:
        candidates = np.unique(ids[ids >= 0])
        check_shape(tuple(ctx.signals.variants("embed", "train")[-1][1]), "embed", ctx.num_rows, 2)
        # only the candidates' embeddings are read (their shards, one at a time), never the whole train signal
        emb = ctx.signals.get_rows_all("embed", candidates, "train")[-1][1]
        kde_k = min(params.kde_neighbors, ctx.num_rows)
        sims, nbr = ctx.signals.search("embed", np.asarray(emb, dtype=np.float32), kde_k, "train")
        density = kernel_density(np.asarray(sims), np.asarray(nbr), params.kde_bandwidth)
        discount = np.zeros(ctx.num_rows)
        # Density is at least ~1 (a row is its own neighbour); the floor guards a missing self-match.
        discount[candidates] = 1.0 / np.maximum(density, 1e-12) ** params.alpha
    prob = target_marginal_mass(coupling, ids, ctx.num_rows, discount)
    return prob / prob.sum()


@SELECTORS.register("tsds")
class TsdsSelector(Selector):
    """Draws rows so that the selection resembles the target set without piling onto duplicates."""

    Params = TsdsParams
    paper = ("Liu, Karbasi, Rekatsinas, TSDS: Data Selection for Task-Specific Model Finetuning, NeurIPS 2024 "
             "(arXiv 2410.11303)")
    rule = ("kNN-restricted optimal-transport mass to target samples, each keeping 1/M of it, discounted by a KDE "
            "density among its neighbours; a weighted draw")

    def needs(self) -> list[SignalNeed]:
        """Embeddings of train and target rows."""
        return [SignalNeed("embed", "train", refresh=False), SignalNeed("embed", "target", refresh=False)]

    def select(self, ctx, num_samples: int) -> Selection:
        """`num_samples` rows drawn without replacement with the TSDS probabilities."""
        k = check_count(num_samples, ctx.num_rows)
        prob = tsds_probabilities(ctx, self.params)
        indices = weighted_sample(ctx.rng, prob, k)
        extra = {"support_rows": int(np.count_nonzero(prob))}
        return Selection(indices=indices, scores=prob, info=selection_info(ctx, indices, prob, **extra))
