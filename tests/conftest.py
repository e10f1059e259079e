"""Shared fixtures: a tiny tokenizer and Llama checkpoint made on the spot, strategies' decision contexts,
one torch thread. Tests sit by package (store/, stages/, pipeline/, demo/), whole-system ones in system/,
shared modules in helpers/."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    has_gpu = torch.cuda.is_available()
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """Path of a saved tiny Llama + trained tokenizer (session-wide, built once)."""
    from demo.tiny import SAMPLE_TEXTS, make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny_llama"), SAMPLE_TEXTS, vocab_size=300)


def decision_context(num_rows: int | None = None, *, train: dict | None = None, target: dict | None = None,
                     signals=None, domain_ids=None, domain_names: list[str] | None = None,
                     num_domains: int | None = None, target_domain_ids=None, seed: int = 0, step: int = 0):
    """A strategy's DecisionContext over in-memory signals.

    Rows go round-robin over the domains (`num_domains`, else as many as `domain_names`, else one; named
    d0, d1, ... unless `domain_names` says) unless `domain_ids` gives them; `signals` replaces the
    InMemorySignals made from the `train` and `target` arrays; the rng is `default_rng(seed)`.
    """
    # here, not at the top: the store and stages tests run without importing pipeline
    from pipeline.strategies.context import DecisionContext, InMemorySignals

    if num_domains is None:
        num_domains = len(domain_names) if domain_names is not None else 1
    if domain_names is None:
        domain_names = [f"d{i}" for i in range(num_domains)]
    domain_ids = np.arange(num_rows) % num_domains if domain_ids is None else np.asarray(domain_ids)
    if signals is None:
        signals = InMemorySignals(train={k: np.asarray(v) for k, v in (train or {}).items()},
                                  target={k: np.asarray(v) for k, v in (target or {}).items()})
    return DecisionContext(step=step, num_rows=len(domain_ids) if num_rows is None else num_rows,
                           domain_ids=domain_ids, domain_names=list(domain_names), rng=np.random.default_rng(seed),
                           signals=signals, target_domain_ids=target_domain_ids)


@pytest.fixture(scope="session")
def make_ctx():
    """`make_ctx(num_rows, train=..., ...)` builds a DecisionContext (see `decision_context`)."""
    return decision_context
