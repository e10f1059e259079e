"""Points of the probability simplex the strategies share."""

from __future__ import annotations

import numpy as np


def softmax(z: np.ndarray) -> np.ndarray:
    """exp(z) / sum exp(z), shifted by max(z) for stability."""
    e = np.exp(z - z.max())
    return e / e.sum()


def effective_sample_size(w: np.ndarray) -> float:
    """(sum w)^2 / sum w^2 of non-negative weights: their count when equal, 1 when one row takes everything."""
    w = np.asarray(w, dtype=np.float64)
    return float(w.sum() ** 2 / max(float(np.square(w).sum()), 1e-300))
