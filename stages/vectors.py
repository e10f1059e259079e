"""Rows scaled to unit length: the one normalisation the stages and the strategies share."""

from __future__ import annotations

import numpy as np


def unit_rows(x: np.ndarray, dtype=np.float32, *, overwrite: bool = False) -> np.ndarray:
    """Rows (or one vector) scaled to unit L2 norm in ``dtype`` (None: x's own); all-zero rows stay zero. With
    ``overwrite``, an ``x`` already of ``dtype`` is scaled in place (the same values, without a second allocation)."""
    x = np.asarray(x, dtype=dtype)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return np.divide(x, np.where(norms > 0, norms, 1.0), out=x if overwrite else None)


def l2_normalise(x: np.ndarray) -> np.ndarray:
    """float32 rows divided by max(norm, 1e-12) (the embed stage's and the stored clustering's normalisation)."""
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
