"""Per-domain summaries of a batch, shared by the mixers."""

from __future__ import annotations

import numpy as np

from store.errors import FlexfeedError


def as_batch(domains, losses, rows) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The three per-sample arrays of one batch as flat numpy arrays of equal length."""
    domains = np.asarray(domains, dtype=np.int64).reshape(-1)
    losses = np.asarray(losses, dtype=np.float64).reshape(-1)
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    if not (len(domains) == len(losses) == len(rows)):
        raise FlexfeedError(f"observe() got {len(domains)} domains, {len(losses)} losses and {len(rows)} rows",
                            "pass one domain id, loss and row id per sample of the batch")
    return domains, losses, rows


def check_domain_ids(domains: np.ndarray, num_domains: int) -> None:
    """Refuse domain ids outside [0, num_domains)."""
    if len(domains) and (domains.min() < 0 or domains.max() >= num_domains):
        bad = int(domains.max() if domains.max() >= num_domains else domains.min())
        raise FlexfeedError(f"a batch has domain id {bad} but the run has {num_domains} domains",
                            "domain ids must index ctx.domain_names; check the dataset list of the run")


def per_domain_mean(values: np.ndarray, domains: np.ndarray, num_domains: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean of `values` over each domain's samples (0 where a domain has none) and the sample counts."""
    counts = np.bincount(domains, minlength=num_domains).astype(np.float64)
    sums = np.bincount(domains, weights=values, minlength=num_domains)
    means = np.divide(sums, counts, out=np.zeros(num_domains), where=counts > 0)
    return means, counts.astype(np.int64)
