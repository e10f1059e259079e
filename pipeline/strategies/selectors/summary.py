"""What a selection logs: score statistics and how many rows each domain received."""

from __future__ import annotations

import numpy as np


def per_domain_counts(ctx, indices: np.ndarray) -> dict[str, int]:
    """Selected rows per domain name (repeats counted)."""
    names = list(ctx.domain_names)
    if not names or ctx.domain_ids is None:
        return {}
    domains = np.asarray(ctx.domain_ids)[np.asarray(indices, dtype=np.int64)]
    counts = np.bincount(domains, minlength=len(names))
    return {name: int(counts[i]) for i, name in enumerate(names)}


def score_stats(values: np.ndarray, prefix: str = "score") -> dict[str, float]:
    """Mean, std, min and max of the finite values (JSON floats; NaN-free)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return {}
    return {f"{prefix}_mean": float(v.mean()), f"{prefix}_std": float(v.std()),
            f"{prefix}_min": float(v.min()), f"{prefix}_max": float(v.max())}


def selection_info(ctx, indices: np.ndarray, scores: np.ndarray | None = None, **extra) -> dict:
    """The `Selection.info` every selector returns, plus selector-specific extras."""
    indices = np.asarray(indices, dtype=np.int64)
    info: dict = {"num_selected": int(indices.size), "num_unique": int(np.unique(indices).size)}
    if scores is not None:
        info.update(score_stats(np.asarray(scores)[indices]))
        info.update(score_stats(scores, prefix="all_score"))
    info["selected_per_domain"] = per_domain_counts(ctx, indices)
    info.update(extra)
    return info
