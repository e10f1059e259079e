"""`flexfeed stage WHICH CONFIG`: compute the signals a config's strategy reads that the store lacks."""

from __future__ import annotations

import time

from stages.base import Stage
from stages.data import TokenizedData
from stages.derived import derive_signal, derived_spec
from stages.runner import RunResult, existing_signal, run_stage
from store.errors import FlexfeedError
from store.faiss_index import build_index, index_status
from store.store import Store

from .config import RunConfig
from .config.groups import training_fields
from .prepared import Prepared, prepare
from .refresh import live_adam_without_checkpoints
from .scheduler import configured_stages
from .signal_stages import stages_for
from .strategies import SignalNeed

STAGES = ("embed", "loss", "grads", "hidden", "ngram", "index")


def run_stage_job(cfg: RunConfig, which: str, *, progress: bool = True, prepared: Prepared | None = None) -> list[RunResult]:
    """`flexfeed stage WHICH CONFIG`: compute what is missing, for train and (where used) target rows."""
    if which not in (*STAGES, "all"):
        raise FlexfeedError(f"unknown stage {which!r}", f"use one of {', '.join(STAGES)} or all")
    p = prepared or prepare(cfg)
    results: list[RunResult] = []
    todo = STAGES if which == "all" else (which,)
    for name in todo:
        if name == "index":
            results.extend(index_job(cfg, p))
            continue
        plan: list[tuple[Stage, TokenizedData, Store]] = []
        if name == "embed":
            plan += [(s, p.train, p.train_store) for s in stages_for(cfg, "embed", "train")]
            if p.target is not None:
                plan += [(s, p.target, p.target_store) for s in stages_for(cfg, "embed", "target")]
        elif name == "loss":
            plan += [(s, p.train, p.train_store) for s in stages_for(cfg, cfg.loss.signal, "train")]
        elif name == "hidden":  # for a component that reads it (asked for by name: at least the train rows)
            splits = {n.split for n in component_needs(cfg) if n.name == "hidden"} | ({"train"} if which == name else set())
            for split, data, store in (("train", p.train, p.train_store), ("target", p.target, p.target_store)):
                if split in splits and data is not None:
                    plan += [(s, data, store) for s in stages_for(cfg, "hidden", split)]
        elif name == "ngram":  # for a component that reads it (asked for by name: train and target rows)
            splits = {n.split for n in component_needs(cfg) if n.name == "ngram"} | (
                {"train", "target"} if which == name else set())
            for split, data, store in (("train", p.train, p.train_store), ("target", p.target, p.target_store)):
                if split in splits and data is not None:
                    plan += [(s, data, store) for s in stages_for(cfg, "ngram", split)]
        elif name == "grads":
            for signal, split in gradient_signals(cfg, everything=which == "grads"):
                data, store = (p.train, p.train_store) if split == "train" else (p.target, p.target_store)
                if data is not None:
                    plan += [(s, data, store) for s in stages_for(cfg, signal, split)]
        for stage, data, store in plan:
            results.append(run_stage(stage, data, store, cfg.runner, progress=progress))
    if which == "all":
        results.extend(derived_job(cfg, p))
    return results


def derived_job(cfg: RunConfig, p: Prepared) -> list[RunResult]:
    """The derived signals the configured components read (a clustering, a keep mask), from their stored sources,
    with the seed training will give the components; reused when stored for the sources' current values."""
    seed = int(cfg.training.get("seed", training_fields()["seed"].default))
    out = []
    for plan_stage in configured_stages(cfg, seed):
        for derived, source, split in plan_stage.strategy.derivations():
            store = p.train_store if split == "train" else p.target_store
            for stage in stages_for(cfg, source, split):
                sig = existing_signal(stage, store) if store is not None else None
                if sig is None or not sig.is_complete():
                    out.append(RunResult(signal=derived.name, key="", note=f"not derived: {source} is not complete"))
                    continue
                t0 = time.perf_counter()
                _, computed = derive_signal(derived, sig, store)
                key = store.signal_key(derived.name, derived_spec(derived, sig), derived.dtype, None)
                seconds = time.perf_counter() - t0
                note = (f"derived from {source} ({sig.key}) in {seconds:.1f} s" if computed
                        else f"derived from {source} ({sig.key}): reused from the store")
                out.append(RunResult(signal=derived.name, key=key, seconds=seconds, note=note,
                                     computed=list(range(sig.num_shards)) if computed else [],
                                     skipped=0 if computed else sig.num_shards))
    return out


def component_needs(cfg: RunConfig) -> list[SignalNeed]:
    """What the configured components declare they read: the component's, or every enabled plan stage's."""
    return [need for stage in configured_stages(cfg, seed=0) for need in stage.strategy.needs()]


def gradient_signals(cfg: RunConfig, *, everything: bool = False) -> list[tuple[str, str]]:
    """(signal, split) of the gradients to compute offline: those the component reads for every row.

    Without such a component, configured checkpoints (or `flexfeed stage grads`, `everything`) ask
    for LESS's pair: train `grads` and target `grads_sgd`. Probe needs (`cluster`) are computed
    at decisions for their rows only.
    """
    needs = component_needs(cfg)
    if live_adam_without_checkpoints(cfg, needs):
        return []  # computed by the training run at each decision, with its live optimizer
    wanted = [(n.name, n.split) for n in needs if n.name.startswith("grads") and n.rows == "all"]
    if not any(split == "train" for _, split in wanted) and (everything or cfg.grads.checkpoints):
        wanted = [("grads", "train"), ("grads_sgd", "target"), *wanted]
    return list(dict.fromkeys(wanted))


def index_job(cfg: RunConfig, p: Prepared) -> list[RunResult]:
    """Build the FAISS index of every complete signal of that name whose index is missing or stale."""
    out = []
    for store in [s for s in (p.train_store, p.target_store) if s is not None]:
        for sig in store.find(cfg.index.signal):
            name = f"index:{sig.name}"
            if index_status(sig) == "fresh":
                out.append(RunResult(signal=name, key=sig.key, skipped=1, note="index up to date, reused"))
                continue
            committed = len(sig.records())
            if committed < sig.num_shards:
                out.append(RunResult(signal=name, key=sig.key, note=f"not built: {sig.name} has {committed} of "
                                     f"{sig.num_shards} shards (run `flexfeed stage embed CONFIG`)"))
                continue
            t0 = time.perf_counter()
            index = build_index(sig, cfg.index.rule())
            seconds = time.perf_counter() - t0
            if not index.built:
                out.append(RunResult(signal=name, key=sig.key, skipped=1,
                                     note="index up to date, reused (another job built it meanwhile)"))
                continue
            out.append(RunResult(signal=name, key=sig.key, computed=[0], rows=sig.num_rows, seconds=seconds,
                                 note=f"built {index.describe()} in {seconds:.1f} s"))
    return out
