"""Points of the probability simplex the strategies share."""

from __future__ import annotations

import numpy as np


def softmax(z: np.ndarray) -> np.ndarray:
    """exp(z) / sum exp(z), shifted by max(z) for stability."""
    e = np.exp(z - z.max())
    return e / e.sum()
