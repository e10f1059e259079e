"""The trainer's SignalSource: signals read from the stores, refreshed when stale."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import numpy as np

from stages.base import bind_live_model
from store.errors import FlexfeedError, LockBusy
from store.faiss_index import load_index

from .jobs import Prepared, stages_for
from .strategies import SignalNeed

LOSS_SIGNALS = ("loss", "ref_loss")


def run_signal(stage, store, run_id: str):
    """The run's own copy of a refreshable signal, seeded from the offline signal's committed shards.

    Refreshed values depend on the run's training trajectory, so they are keyed by the run as well
    as by what produced them; the offline (content-keyed) signal is never overwritten by a run.
    """
    desc = stage.signal()
    if not run_id:
        return store.signal(desc.name, desc.spec, dtype=desc.dtype, dim=desc.dim)
    sig = store.signal(desc.name, {**desc.spec, "run": run_id}, dtype=desc.dtype, dim=desc.dim)
    if not sig.records():
        base = store.signal(desc.name, desc.spec, dtype=desc.dtype, dim=desc.dim)
        for shard, rec in sorted(base.records().items()):
            try:
                sig.write_shard(shard, base.read_shard(shard), version=rec.version, model=rec.model,
                                lock_timeout_s=600)
            except LockBusy:
                pass  # another rank is seeding the same shard
    return sig


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
    counts: dict = field(default_factory=dict)

    run_id: str = ""

    def refresh(self, stage, data, store, step: int) -> dict:
        sig = run_signal(stage, store, self.run_id)
        todo = sig.stale_shards(step, self.max_staleness)
        mine = todo[self.rank :: self.world_size]
        t0 = time.perf_counter()
        if mine:
            import torch

            was_training = getattr(self.model, "training", False)
            self.model.eval()
            ctx = self.gather_params() if self.gather_params is not None else contextlib.nullcontext()
            try:
                with ctx, torch.enable_grad() if "grads" in sig.name else torch.no_grad():
                    live = bind_live_model(stage, self.model, self.tokenizer)
                    for shard in mine:
                        start, stop = sig.shard_range(shard)
                        values = live.compute(data.rows(start, stop))
                        sig.write_shard(shard, values, version=step, model=f"live@{step}", lock_timeout_s=600)
            finally:
                if was_training:
                    self.model.train()
        if self.barrier is not None:
            self.barrier()
        info = {"stale": len(todo), "recomputed_here": len(mine), "seconds": round(time.perf_counter() - t0, 3)}
        self.counts[sig.name] = self.counts.get(sig.name, 0) + len(todo)
        return info


class StoreSignals:
    """Signals of the train/target stores for one decision (refreshed before it, then read-only)."""

    def __init__(self, cfg, prepared: Prepared, step: int, refresher: Refresher | None = None):
        self.cfg = cfg
        self.p = prepared
        self.step = step
        self.refresher = refresher
        self.log: dict = {}
        self._cache: dict = {}
        self._scoped: set = set()

    def _split(self, split: str):
        if split == "train":
            return self.p.train, self.p.train_store
        if split == "target":
            if self.p.target is None:
                raise FlexfeedError("this component needs a target set", "set `eval_dataset` in the config")
            return self.p.target, self.p.target_store
        raise FlexfeedError(f"unknown split {split!r}", "use train or target")

    def prepare(self, needs: list[SignalNeed]) -> None:
        """Refresh every needed signal that may be refreshed; the others must be complete already."""
        for need in needs:
            data, store = self._split(need.split)
            for stage in stages_for(self.cfg, need.name, need.split):
                if need.refresh and self.refresher is not None:
                    info = self.refresher.refresh(stage, data, store, self.step)
                    self.log.setdefault("refresh", {})[f"{need.name}/{need.split}"] = info
                    self._scoped.add((need.name, need.split))

    def _signals(self, name: str, split: str):
        key = (name, split)
        if key not in self._cache:
            data, store = self._split(split)
            out = []
            scoped = (name, split) in self._scoped
            for stage in stages_for(self.cfg, name, split):
                desc = stage.signal()
                run_id = self.refresher.run_id if scoped and self.refresher is not None else ""
                out.append((desc.spec, run_signal(stage, store, run_id)))
            self._cache[key] = out
        return self._cache[key]

    def _values(self, name: str, sig) -> np.ndarray:
        arr = sig.read_all().astype(np.float32)
        return arr[:, 0] if name in LOSS_SIGNALS else arr

    def get(self, name: str, split: str = "train") -> np.ndarray:
        return self._values(name, self._signals(name, split)[-1][1])

    def get_all(self, name: str, split: str = "train") -> list[tuple[dict, np.ndarray]]:
        out = []
        for spec, sig in self._signals(name, split):
            meta = {"lr": float(spec.get("lr") or 1.0), "checkpoint": spec.get("checkpoint")}
            out.append((meta, self._values(name, sig)))
        return out

    def search(self, name: str, queries: np.ndarray, k: int, split: str = "train"):
        sig = self._signals(name, split)[-1][1]
        return load_index(sig).search(queries, k)
