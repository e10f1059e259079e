"""A run's data and stores: tokenizer, train, target and evaluation rows, one store per dataset fingerprint."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from stages.data import TokenizedData, load_data
from stages.models import hub_access, load_tokenizer
from stages.trained_rows import check_trained_rows
from store.store import Store

from .config import RunConfig
from .evaluation import split_seed, split_validation
from .mixer_eval import mixer_eval_domains


@dataclass
class Prepared:
    """Tokenizer, train, target and evaluation data, and the stores of train and target."""

    tokenizer: object
    train: TokenizedData
    target: TokenizedData | None
    train_store: Store
    target_store: Store | None
    eval: TokenizedData | None = None
    """The evaluation set: eval_dataset's rows or the held-out ones (None when there is none or it was not asked for)."""
    train_rows: np.ndarray | None = None
    """With val_size: the training rows' positions in the loaded datasets (the rest are held out)."""
    run_stores: dict = field(default_factory=dict)
    """refresh.store: the stores of the run's refreshed copies, per split, opened at the first refresh."""
    mixer_eval: TokenizedData | None = None
    """mixer_eval_dataset's rows: what a mixer measures the model on (split `mixer_eval`), never trained on."""
    mixer_eval_store: Store | None = None


def store_for(cfg: RunConfig, data: TokenizedData) -> Store:
    """The store of a dataset lives at `<store>/<dataset fingerprint>`."""
    root = Path(cfg.store.store) / data.fingerprint
    return Store.open_or_create(root, dataset_fingerprint=data.fingerprint, num_rows=len(data),
                                shard_rows=cfg.store.shard_rows, dataset_info={"datasets": data.domain_names})


def run_store(cfg: RunConfig, p: Prepared, split: str) -> Store:
    """Where a run writes its refreshed copies of a split's signals: the split's store, or (refresh.store) its
    twin under that folder, opened once per run and kept in `p.run_stores`."""
    data, store = {"train": (p.train, p.train_store), "target": (p.target, p.target_store),
                   "mixer_eval": (p.mixer_eval, p.mixer_eval_store)}[split]
    if not cfg.refresh.store:
        return store
    if split not in p.run_stores:
        root = Path(cfg.refresh.store) / data.fingerprint
        p.run_stores[split] = Store.open_or_create(
            root, dataset_fingerprint=data.fingerprint, num_rows=len(data), shard_rows=store.meta.shard_rows,
            dataset_info={"datasets": data.domain_names})
    return p.run_stores[split]


def target_names(cfg: RunConfig) -> list[str]:
    """The selectors' target datasets: target_dataset, else eval_dataset."""
    return list(cfg.data.target_dataset or cfg.data.eval_dataset)


def prepare(cfg: RunConfig, *, need_target: bool = True, need_eval: bool = False) -> Prepared:
    """Tokenize the train (and target, and evaluation) datasets and open (or create) their stores.

    With val_size the held-out rows leave the training rows here, so every stage and the trainer see the same
    training set (its own fingerprint, its own store).
    """
    tok = load_tokenizer(cfg.model)
    hub = hub_access(cfg.model)  # cache_dir and token reach hub datasets as well as models
    train = load_data(cfg.data, tok, hub=hub)
    check_trained_rows(train, cfg.data.cutoff_len)  # before any store is opened: losses of 0 train nothing
    held_out = train_rows = None
    if cfg.data.val_size:
        split = split_validation(train, cfg.data.val_size, split_seed(cfg))
        train, held_out, train_rows = split.train, split.held_out, split.kept
    target = None
    names = target_names(cfg)
    if need_target and names:
        target = load_data(cfg.data, tok, names, hub=hub)
    evaluated = None
    if need_eval and held_out is not None:
        evaluated = held_out
    elif need_eval and cfg.data.eval_dataset:
        same = target is not None and names == list(cfg.data.eval_dataset)
        evaluated = target if same else load_data(cfg.data, tok, list(cfg.data.eval_dataset), hub=hub)
    mixer_eval = None
    if cfg.flex.mixer_eval_dataset:
        mixer_eval = load_data(cfg.data, tok, list(cfg.flex.mixer_eval_dataset), hub=hub)
        mixer_eval_domains(train, mixer_eval)  # each names a training dataset: refused now otherwise
    return Prepared(tok, train, target, store_for(cfg, train), store_for(cfg, target) if target is not None else None,
                    eval=evaluated, train_rows=train_rows, mixer_eval=mixer_eval,
                    mixer_eval_store=store_for(cfg, mixer_eval) if mixer_eval is not None else None)
