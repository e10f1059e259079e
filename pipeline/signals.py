"""The trainer's SignalSource: signals read from the stores, refreshed when stale."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import numpy as np

from stages.base import bind_live_model
from stages.runner import stage_signal
from store.errors import FlexfeedError
from store.faiss_index import load_index

from .jobs import Prepared, stages_for
from .strategies import SignalNeed

LOSS_SIGNALS = ("loss", "ref_loss")


def run_signal(stage, store, run_id: str):
    """The run's own copy of a refreshable signal (created empty if new).

    Refreshed values depend on the run's training trajectory, so they are keyed by the run as well
    as by what produced them; the offline (content-keyed) signal is never overwritten by a run.
    """
    desc = stage.signal()
    return store.signal(desc.name, {**desc.spec, "run": run_id}, dtype=desc.dtype, dim=desc.dim)


def seed_from(sig, base) -> None:
    """Copy the offline signal's committed shards into an empty run signal, as of the run's step 0.

    Offline versions count steps of whatever produced them (e.g. a warm-up run's checkpoint step),
    not of this run: in the run's copy they start at 0 and age from there.
    """
    for shard, rec in sorted(base.records().items()):
        sig.write_shard(shard, base.read_shard(shard), version=0, model=rec.model, lock_timeout_s=600)


@dataclass
class Refresher:
    """Recomputes stale shards with the live model, split across ranks, committed with the step as version."""

    model: object
    tokenizer: object
    max_staleness: int | None
    rank: int = 0
    world_size: int = 1
    barrier: object = None
    gather_params: object = None  # context manager factory for ZeRO-3 (parameters gathered to compute)
    run_id: str = ""
    counts: dict = field(default_factory=dict)

    def _sync(self) -> None:
        if self.barrier is not None:
            self.barrier()

    def refresh(self, stage, data, store, step: int):
        """Make the stage's signal fresh for `step`; returns (info, the signal to read)."""
        t0 = time.perf_counter()
        base = stage_signal(stage, store)
        if self.max_staleness is None and base.is_complete():
            # nothing can go stale: read the offline signal as it is, no copy
            return {"stale": 0, "recomputed_here": 0, "seconds": 0.0, "source": "offline"}, base
        sig = run_signal(stage, store, self.run_id) if self.run_id else base
        if self.run_id and self.rank == 0 and not sig.records():
            seed_from(sig, base)
        self._sync()  # every rank lists the stale shards from the same state
        todo = sig.stale_shards(step, self.max_staleness)
        mine = todo[self.rank :: self.world_size]
        if mine:
            self._recompute(stage, data, sig, mine, step)
        self._sync()
        info = {"stale": len(todo), "recomputed_here": len(mine), "seconds": round(time.perf_counter() - t0, 3),
                "source": "run"}
        self.counts[sig.name] = self.counts.get(sig.name, 0) + len(todo)
        return info, sig

    def _recompute(self, stage, data, sig, shards: list[int], step: int) -> None:
        import torch

        was_training = getattr(self.model, "training", False)
        self.model.eval()
        ctx = self.gather_params() if self.gather_params is not None else contextlib.nullcontext()
        try:
            with ctx, torch.enable_grad() if "grads" in sig.name else torch.no_grad():
                live = bind_live_model(stage, self.model, self.tokenizer)
                for shard in shards:
                    start, stop = sig.shard_range(shard)
                    values = live.compute(data.rows(start, stop))
                    sig.write_shard(shard, values, version=step, model=f"live@{step}", lock_timeout_s=600)
        finally:
            if was_training:
                self.model.train()


class ValueCache:
    """float32 copies of signals, reused while no shard of the signal changes (keyed by state hash)."""

    def __init__(self):
        self._values: dict[str, tuple[str, np.ndarray]] = {}

    def get(self, sig, name: str) -> np.ndarray:
        state = sig.state_hash()
        hit = self._values.get(sig.key)
        if hit is not None and hit[0] == state:
            return hit[1]
        arr = sig.read_all().astype(np.float32)
        arr = arr[:, 0].copy() if name in LOSS_SIGNALS else arr
        arr.setflags(write=False)  # shared between decisions: strategies must not modify it
        self._values[sig.key] = (state, arr)
        return arr


class StoreSignals:
    """Signals of the train/target stores for one decision (refreshed before it, then read-only)."""

    def __init__(self, cfg, prepared: Prepared, step: int, refresher: Refresher | None = None,
                 cache: ValueCache | None = None, stages: dict | None = None):
        self.cfg = cfg
        # stage objects per (signal, split), shared across a run's decisions: building one hashes the
        # model and checkpoint files its key depends on, which must not happen at every decision
        self.stages = stages if stages is not None else {}
        self.p = prepared
        self.step = step
        self.refresher = refresher
        self.cache = cache or ValueCache()
        self.log: dict = {}
        self._chosen: dict[tuple[str, str], list] = {}

    def _split(self, split: str):
        if split == "train":
            return self.p.train, self.p.train_store
        if split == "target":
            if self.p.target is None:
                raise FlexfeedError("this component needs a target set", "set `eval_dataset` in the config")
            return self.p.target, self.p.target_store
        raise FlexfeedError(f"unknown split {split!r}", "use train or target")

    def prepare(self, needs: list[SignalNeed]) -> None:
        """Refresh every needed signal that may be refreshed; the others are read as stored."""
        for need in needs:
            data, store = self._split(need.split)
            chosen = []
            for stage in self._stages(need.name, need.split):
                if need.refresh and self.refresher is not None:
                    info, sig = self.refresher.refresh(stage, data, store, self.step)
                    self.log.setdefault("refresh", {})[f"{need.name}/{need.split}"] = info
                else:
                    sig = stage_signal(stage, store)
                chosen.append((stage.signal().spec, sig))
            self._chosen[(need.name, need.split)] = chosen

    def _signals(self, name: str, split: str):
        key = (name, split)
        if key not in self._chosen:
            _, store = self._split(split)
            self._chosen[key] = [(s.signal().spec, stage_signal(s, store)) for s in self._stages(name, split)]
        return self._chosen[key]

    def _stages(self, name: str, split: str) -> list:
        if (name, split) not in self.stages:
            self.stages[(name, split)] = stages_for(self.cfg, name, split)
        return self.stages[(name, split)]

    def get(self, name: str, split: str = "train") -> np.ndarray:
        return self.cache.get(self._signals(name, split)[-1][1], name)

    def get_all(self, name: str, split: str = "train") -> list[tuple[dict, np.ndarray]]:
        out = []
        for spec, sig in self._signals(name, split):
            meta = {"lr": float(spec.get("lr") or 1.0), "checkpoint": spec.get("checkpoint")}
            out.append((meta, self.cache.get(sig, name)))
        return out

    def search(self, name: str, queries: np.ndarray, k: int, split: str = "train"):
        sig = self._signals(name, split)[-1][1]
        return load_index(sig).search(queries, k)
