"""The domain-weights JSON file: written by a `doremi` proxy run, read by a `static` final run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from store.atomic import atomic_write_json
from store.errors import FlexfeedError

from ...run_files import DOMAIN_WEIGHTS_FILE

WEIGHTS_FILE = DOMAIN_WEIGHTS_FILE
"""File name a doremi run writes into its output_dir (one name for the writer and the readers)."""


def write_domain_weights(path, names: list[str], weights: np.ndarray, **extra) -> Path:
    """Write {"domain_weights": {name: w}} (plus `extra` keys) atomically; returns the path."""
    path = Path(path)
    obj = {"domain_weights": {str(n): float(w) for n, w in zip(names, weights)}}
    obj.update(extra)
    atomic_write_json(path, obj)
    return path


def read_domain_weights(path, names: list[str]) -> np.ndarray:
    """The weights of `names`, in that order, from a domain-weights file; normalised to sum to 1."""
    path = Path(path)
    if not path.is_file():
        raise FlexfeedError(f"domain weights file {str(path)!r} does not exist",
                            "run the doremi proxy step first (it writes domain_weights.json to its output_dir), "
                            "or set proportions to uniform, stratified or a list")
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise FlexfeedError(f"cannot read domain weights file {str(path)!r}: {exc}",
                            "the file must be JSON like {\"domain_weights\": {\"name\": 0.5, ...}}") from None
    table = obj.get("domain_weights") if isinstance(obj, dict) else None
    if not isinstance(table, dict):
        raise FlexfeedError(f"{str(path)!r} has no 'domain_weights' mapping",
                            "the file must be JSON like {\"domain_weights\": {\"name\": 0.5, ...}}")
    missing = [n for n in names if n not in table]
    extra = [n for n in table if n not in names]
    if missing or extra:
        raise FlexfeedError(f"{str(path)!r} has weights for {sorted(table)} but the run's domains are {list(names)}",
                            "use the same datasets as the doremi proxy run, or edit the file's domain names")
    try:
        weights = np.array([float(table[n]) for n in names])
    except (TypeError, ValueError):
        raise FlexfeedError(f"{str(path)!r} has a non-numeric weight", "every weight must be a number") from None
    return normalise(weights, f"weights in {str(path)!r}")


def normalise(weights: np.ndarray, where: str) -> np.ndarray:
    """Non-negative finite weights with a positive sum, scaled to sum to 1."""
    weights = np.asarray(weights, dtype=np.float64)
    if not np.all(np.isfinite(weights)) or np.any(weights < 0):
        raise FlexfeedError(f"{where} must be finite and non-negative, got {weights.tolist()}",
                            "give one non-negative weight per domain")
    total = weights.sum()
    if total <= 0:
        raise FlexfeedError(f"{where} sum to 0", "give at least one domain a positive weight")
    return weights / total
