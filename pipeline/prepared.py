"""A run's data and stores: tokenizer, train and target rows, one store per dataset fingerprint."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from stages.data import TokenizedData, load_data
from stages.models import load_tokenizer
from store.store import Store

from .config import RunConfig


@dataclass
class Prepared:
    """Tokenizer, train and target data, and their stores (one store per dataset fingerprint)."""

    tokenizer: object
    train: TokenizedData
    target: TokenizedData | None
    train_store: Store
    target_store: Store | None


def store_for(cfg: RunConfig, data: TokenizedData) -> Store:
    """The store of a dataset lives at `<store>/<dataset fingerprint>`."""
    root = Path(cfg.store.store) / data.fingerprint
    return Store.open_or_create(root, dataset_fingerprint=data.fingerprint, num_rows=len(data),
                                shard_rows=cfg.store.shard_rows, dataset_info={"datasets": data.domain_names})


def prepare(cfg: RunConfig, *, need_target: bool = True) -> Prepared:
    """Tokenize the train (and target) datasets and open (or create) their stores."""
    tok = load_tokenizer(cfg.model)
    train = load_data(cfg.data, tok)
    target = None
    if need_target and cfg.data.eval_dataset:
        target = load_data(cfg.data, tok, list(cfg.data.eval_dataset))
    return Prepared(tok, train, target, store_for(cfg, train), store_for(cfg, target) if target is not None else None)
