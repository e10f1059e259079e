"""The trainer's SignalSource: where each signal a strategy reads comes from, refreshed when stale.

A run plans one *route* per signal a strategy needs (`plan_routes`, before training starts):

- **live**: the method's definition at the live training state. One stage (the training model, for
  `grads` with the live optimizer's Adam moments), whose shards older than the route's staleness are
  recomputed before a decision into the run's own copy of the signal.
- **offline**: the configured stages as they are (for `grads`, one variant per checkpoint: LESS's
  ensemble). Missing shards are computed by those same stages, never by the live model.

Every decision logs, per signal, the model versions its shards come from, and refuses a signal whose
shards were computed by models further apart than its route allows.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from stages.args import RunnerArgs
from stages.base import Stage, bind_live_model
from stages.derived import check_complete, derive_signal
from stages.runner import INLINE, existing_signal, run_stage, stage_signal
from store.errors import CorruptShard, FlexfeedError, StoreError
from store.faiss_index import shared_index
from store.store import is_read_only

from .config import RunConfig
from .prepared import Prepared, run_store
from .shard_scoring import ShardScorer
from .signal_stages import live_stage_for, stages_for
from .strategies import SignalNeed
from .strategies.row_maps import RowMap

LOSS_SIGNALS = ("loss", "ref_loss")
_UNSET = object()


@dataclass
class SignalRoute:
    """Where one signal of one split comes from during a run."""

    name: str
    split: str
    live: bool
    stages: list[Stage]
    max_staleness: int | None = None
    """Live routes: shards computed more than this many steps before a decision are recomputed."""
    rows: str = "all"

    @property
    def label(self) -> str:
        return f"{self.name}/{self.split}"


def _refreshable(cfg: RunConfig, need: SignalNeed) -> bool:
    if not need.refresh or not cfg.refresh.enabled or need.name == "ref_loss":
        return False
    return cfg.refresh.signals is None or need.name in cfg.refresh.signals


def live_adam_without_checkpoints(cfg: RunConfig, needs: list[SignalNeed]) -> bool:
    """Adam gradients with no checkpoint to read moments from: the live optimizer's moments, as DataFlex.

    LESS's offline definition needs Trainer checkpoints with optimizer state (`grads.checkpoints`);
    without them the only Adam state there is is the training run's own, so every gradient signal the
    component reads is computed with the live model and optimizer at each decision (DataFlex's
    `gradient_type: adam` recomputes every train row's gradient at every selection the same way).
    """
    return (cfg.grads.grad_type == "adam" and not cfg.grads.checkpoints
            and any(n.name == "grads" and n.split == "train" for n in needs))


def plan_routes(cfg: RunConfig, needs: list[SignalNeed], component: str = "") -> dict[tuple[str, str], SignalRoute]:
    """One route per needed signal, with every error the config implies raised now, before training."""
    routes: dict[tuple[str, str], SignalRoute] = {}
    who = f"component {component!r}" if component else "the component"
    live_grads = live_adam_without_checkpoints(cfg, needs)
    for need in needs:
        refresh = _refreshable(cfg, need)
        staleness = cfg.refresh.max_staleness
        if live_grads and need.name.startswith("grads") and not refresh:
            raise FlexfeedError(
                f"{who} reads Adam gradients (grads.grad_type adam) with no grads.checkpoints, so they can only come "
                f"from the live optimizer at each decision, but the config never refreshes {need.name!r}",
                "set refresh.enabled: true (and keep the gradient signals in refresh.signals), or list Trainer "
                "checkpoints under grads.checkpoints, or use grads.grad_type: sgd")
        if need.live or (live_grads and need.name.startswith("grads")):
            if not refresh:
                raise FlexfeedError(
                    f"{who} ranks the live {need.name!r} of every decision, but the config never refreshes it, so "
                    f"every decision would rank unchanged values",
                    f"set refresh.enabled: true and keep {need.name!r} in refresh.signals (or unset refresh.signals)")
            # a live Adam gradient may be reused for a while (a cost the user chose); a loss change may not
            if need.live and staleness is not None and staleness >= cfg.flex.update_step:
                raise FlexfeedError(
                    f"refresh.max_staleness ({staleness}) >= update_step ({cfg.flex.update_step}): {who} would rank "
                    f"{need.name!r} values unchanged since the previous decision",
                    "unset refresh.max_staleness (fresh values at every decision) or make it smaller than update_step")
            staleness = 0 if staleness is None else staleness
        live = refresh and staleness is not None
        stages = [live_stage_for(cfg, need.name, need.split)] if live else stages_for(cfg, need.name, need.split)
        for stage in stages:
            stage.signal()  # builds the key: missing files and bad settings fail here, not mid-training
        routes[(need.name, need.split)] = SignalRoute(need.name, need.split, live, stages,
                                                      staleness if live else None, need.rows)
    grads = {r.live for r in routes.values() if r.name.startswith("grads")}
    if len(grads) > 1:
        raise FlexfeedError(
            f"{who} compares gradients of the train and target rows, but only some of them are refreshed: "
            f"{', '.join(f'{r.label} ' + ('live' if r.live else 'offline') for r in routes.values())}",
            "refresh all gradient signals (unset refresh.signals) or none (refresh.enabled: false)")
    check_writable(cfg, routes, who)
    return routes


def check_writable(cfg: RunConfig, routes: dict[tuple[str, str], SignalRoute], who: str) -> None:
    """A run that refreshes writes its copy of the signal into the store: on a read-only store, say so now."""
    live = [r.label for r in routes.values() if r.live]
    target = cfg.refresh.store or cfg.store.store
    if live and is_read_only(target):
        where = "refresh.store" if cfg.refresh.store else "store"
        raise FlexfeedError(
            f"{where} {target} is read-only, but {who} refreshes {', '.join(live)} during training, which "
            "writes the run's copy of it there",
            "set refresh.enabled: false to read the stored signals as they are, or set refresh.store: PATH, a "
            "writable folder for the run's refreshed copies (offline signals are still read from `store`)")


def run_signal(stage, store, run_id: str):
    """The run's own copy of a refreshable signal (created empty if new).

    Refreshed values depend on the run's training trajectory, so they are keyed by the run as well
    as by what produced them; the offline (content-keyed) signal is never overwritten by a run.
    """
    if not run_id:
        raise FlexfeedError("a refresh needs the run's id", "pass run_id to the Refresher")
    desc = stage.signal()
    return store.signal(desc.name, {**desc.spec, "run": run_id}, dtype=desc.dtype, dim=desc.dim,
                        sources=desc.sources)


def offline_twin(stage, store):
    """The offline signal with exactly the stage's spec, when the store holds one (None otherwise)."""
    desc = stage.signal()
    try:
        return store.get(store.signal_key(desc.name, desc.spec, desc.dtype, desc.dim))
    except StoreError:
        return None


def seed_from(sig, base) -> None:
    """Copy the offline signal's committed shards into an empty run signal, as of the run's step 0.

    Only an offline signal with the live stage's own spec qualifies: the same definition evaluated
    at the model the run starts from. Its versions count steps of whatever produced it, not of this
    run: in the run's copy they start at 0 and age from there. A damaged offline shard is left out: the
    run computes it live, like any shard its copy lacks.
    """
    for shard, rec in sorted(base.records().items()):
        try:
            values = base.read_shard(shard)
        except CorruptShard:
            continue
        sig.write_shard(shard, values, version=0, model=rec.model, lock_timeout_s=600)


@dataclass
class Refresher:
    """Recomputes stale shards at the live training state, split across ranks, committed with the step."""

    model: object
    tokenizer: object
    max_staleness: int | None
    rank: int = 0
    world_size: int = 1
    barrier: object = None
    gather_params: object = None  # context manager factory for ZeRO-3 (parameters gathered to compute)
    run_id: str = ""
    live_state: Callable[[str], object] | None = None
    """Named live training state a stage's definition reads (`adam_state`), e.g. from the Trainer."""

    def _sync(self) -> None:
        if self.barrier is not None:
            self.barrier()

    def refresh(self, stage, data, store, step: int, max_staleness=_UNSET, run_store=None):
        """Make the stage's signal fresh for `step` in the run's copy (in `run_store`, default `store`, where
        the offline signals are); returns (info, the signal to read)."""
        staleness = self.max_staleness if max_staleness is _UNSET else max_staleness
        t0 = time.perf_counter()
        sig = run_signal(stage, store if run_store is None else run_store, self.run_id)
        if self.rank == 0 and not sig.records():
            base = offline_twin(stage, store)
            if base is not None:
                seed_from(sig, base)
        self._sync()  # every rank lists the stale shards from the same state
        stale = set(sig.stale_shards(step, staleness))
        # a live route recomputes a damaged shard of its copy instead of failing the decision on it
        todo = sorted(stale | set(sig.damaged_shards(sorted(set(range(sig.num_shards)) - stale))))
        self._sync()  # every rank has its list before any rank commits a shard (which would drop it from a list)
        mine = todo[self.rank :: self.world_size]
        if todo:
            # gathering optimizer state is collective under ZeRO: every rank does it, even with no shard
            state = self._state_for(stage)
            if mine:
                self._recompute(stage, data, sig, mine, step, state)
        self._sync()
        info = {"stale": len(todo), "recomputed_here": len(mine), "seconds": round(time.perf_counter() - t0, 3),
                "source": "live"}
        return info, sig

    def _state_for(self, stage) -> dict:
        keys = stage.live_state_keys()
        if keys and self.live_state is None:
            raise FlexfeedError(f"signal {stage.signal().name!r} is defined by live training state {list(keys)}",
                                "refresh it from inside a training run")
        return {k: self.live_state(k) for k in keys}

    @contextlib.contextmanager
    def _live(self, stage, state: dict):
        was_training = getattr(self.model, "training", False)
        self.model.eval()
        ctx = self.gather_params() if self.gather_params is not None else contextlib.nullcontext()
        try:
            with ctx, torch.enable_grad() if stage.needs_grad else torch.no_grad():
                yield bind_live_model(stage, self.model, self.tokenizer, **state)
        finally:
            if was_training:
                self.model.train()

    def _recompute(self, stage, data, sig, shards: list[int], step: int, state: dict) -> None:
        with self._live(stage, state) as live:
            for shard in shards:
                start, stop = sig.shard_range(shard)
                values = live.compute(data.rows(start, stop))
                sig.write_shard(shard, values, version=step, model=f"live@{step}", lock_timeout_s=600)

    def compute_rows(self, stage, rows: dict) -> np.ndarray:
        """The stage's values for the given rows at the live state (every rank computes the same rows)."""
        state = self._state_for(stage)
        with self._live(stage, state) as live:
            return live.compute(rows)


class ValueCache:
    """float32 copies of the small signals a strategy reads whole, reused while no shard changes (keyed by state hash).

    Only what `keep` allows is kept for the run: one value per row (losses) and target-split signals. A train
    signal of (N, d) values is read whole only for the strategy that asks (`get`), then dropped; strategies
    that score every row of one stream it instead (`map_rows`, whose per-row results the ShardScorer caches).
    """

    def __init__(self):
        self._values: dict[str, tuple[str, np.ndarray]] = {}

    @staticmethod
    def keeps(sig, name: str, split: str) -> bool:
        """Whether a signal's float32 copy is small enough to keep: O(N) values, or the target set's."""
        return split != "train" or sig.dim is None or name in LOSS_SIGNALS

    def get(self, sig, name: str, split: str) -> np.ndarray:
        keep = self.keeps(sig, name, split)
        state = sig.state_hash() if keep else None
        hit = self._values.get(sig.key)
        if hit is not None and hit[0] == state:
            return hit[1]
        arr = sig.read_all().astype(np.float32)
        arr = arr[:, 0].copy() if name in LOSS_SIGNALS else arr
        arr.setflags(write=False)  # shared between decisions: strategies must not modify it
        if keep:
            self._values[sig.key] = (state, arr)
        return arr


def version_summary(sig) -> dict:
    """The model versions a signal's committed shards were computed with (what a decision logs)."""
    records = sig.records()
    versions = [r.version for r in records.values()]
    models = sorted({r.model for r in records.values()})
    return {"key": sig.key, "shards": len(records), "of": sig.num_shards,
            "versions": [min(versions), max(versions)] if versions else [], "models": models[:4],
            "num_models": len(models)}


def check_versions(route: SignalRoute, summary: dict) -> None:
    """Refuse a signal whose shards were computed by models further apart than the route allows."""
    if summary["shards"] < summary["of"]:
        raise FlexfeedError(f"signal {route.label} has {summary['shards']} of {summary['of']} shards committed",
                            "run `flexfeed stage all CONFIG` (or let the run compute them)")
    if route.live:
        lo, hi = summary["versions"]
        if hi - lo > route.max_staleness:
            raise FlexfeedError(
                f"signal {route.label} mixes shards of model versions {lo} to {hi}, more than "
                f"max_staleness={route.max_staleness} steps apart", "refresh its stale shards before deciding")
    elif summary["num_models"] > 1:
        raise FlexfeedError(
            f"offline signal {route.label} holds shards of {summary['num_models']} different models "
            f"({', '.join(summary['models'])})", "recompute it with one model: delete it and run `flexfeed stage all`")


class StoreSignals:
    """Signals of the train/target stores for one decision (made fresh before it, then read-only)."""

    def __init__(self, cfg: RunConfig, prepared: Prepared, step: int, routes: dict, refresher: Refresher | None = None,
                 cache: ValueCache | None = None, *, rank: int = 0, world_size: int = 1, barrier=None,
                 live_lr: Callable[[], float] | None = None, scorer: ShardScorer | None = None):
        self.cfg = cfg
        self.p = prepared
        self.step = step
        # routes (and their stage objects) are planned once per run: building a stage hashes the model
        # and checkpoint files its key depends on, which must not happen at every decision
        self.routes = routes
        self.refresher = refresher
        self.cache = cache or ValueCache()
        self.scorer = scorer or ShardScorer()  # per-row results, shard by shard (ranks, Dask), cached for the run
        self.rank, self.world_size, self.barrier = rank, world_size, barrier
        self.live_lr = live_lr
        self.log: dict = {}
        self._chosen: dict[tuple[str, str], list] = {}

    def _split(self, split: str):
        if split == "train":
            return self.p.train, self.p.train_store
        if split == "target":
            if self.p.target is None:
                raise FlexfeedError("this component needs a target set", "set `eval_dataset` in the config")
            return self.p.target, self.p.target_store
        if split == "mixer_eval":
            if self.p.mixer_eval is None:
                raise FlexfeedError("this mixer reads the mixer_eval split, but the run has none",
                                    "set mixer_eval_dataset in the config")
            return self.p.mixer_eval, self.p.mixer_eval_store
        raise FlexfeedError(f"unknown split {split!r}", "use train, target or mixer_eval")

    def _route(self, name: str, split: str) -> SignalRoute:
        route = self.routes.get((name, split))
        if route is None:
            raise FlexfeedError(f"signal {name}/{split} was not declared by the component's needs()",
                                "list every signal a strategy reads in its needs()")
        return route

    def _meta(self, route: SignalRoute, stage) -> dict:
        if route.live:
            lr = self.live_lr() if self.live_lr is not None else 1.0
            return {"lr": float(lr), "checkpoint": None, "source": "live"}
        spec = stage.signal().spec
        return {"lr": float(spec.get("lr") or 1.0), "checkpoint": spec.get("checkpoint"), "source": "offline"}

    def prepare(self, needs: list[SignalNeed]) -> None:
        """Make every needed signal ready: live ones refreshed, offline ones completed by their own stages."""
        for need in needs:
            route = self._route(need.name, need.split)
            if route.rows == "probe":
                continue  # computed row by row when the strategy asks (get_rows_all)
            data, store = self._split(need.split)
            chosen = []
            for stage in route.stages:
                if route.live:
                    if self.refresher is None:
                        raise FlexfeedError(f"signal {route.label} is refreshed but the run has no refresher",
                                            "build StoreSignals with a Refresher")
                    info, sig = self.refresher.refresh(stage, data, store, self.step, route.max_staleness,
                                                       run_store=run_store(self.cfg, self.p, need.split))
                    self.log.setdefault("refresh", {})[route.label] = info
                else:
                    sig = self._offline(stage, data, store)
                summary = version_summary(sig)
                check_versions(route, summary)
                self.log.setdefault("signals", {}).setdefault(route.label, []).append(
                    {"source": "live" if route.live else "offline", **summary})
                chosen.append((self._meta(route, stage), sig))
            self._chosen[(need.name, need.split)] = chosen

    def _offline(self, stage, data, store):
        """The offline signal, its missing shards first computed by its own stage (split across ranks)."""
        sig = stage_signal(stage, store)
        missing = sig.stale_shards()
        if missing:
            mine = missing[self.rank :: self.world_size]
            if mine:
                run_stage(stage, data, store, RunnerArgs(scheduler=INLINE), shards=mine, progress=False)
            if self.barrier is not None:
                self.barrier()
            self.log.setdefault("offline_filled", {})[sig.name] = len(missing)
        return sig

    def _signals(self, name: str, split: str):
        key = (name, split)
        if key not in self._chosen:
            self.prepare([SignalNeed(name, split, refresh=self._route(name, split).live)])
        return self._chosen[key]

    def get(self, name: str, split: str = "train") -> np.ndarray:
        return self.cache.get(self._signals(name, split)[-1][1], name, split)

    def get_all(self, name: str, split: str = "train") -> list[tuple[dict, np.ndarray]]:
        return [(meta, self.cache.get(sig, name, split)) for meta, sig in self._signals(name, split)]

    def variants(self, name: str, split: str = "train") -> list[tuple[dict, tuple[int, ...]]]:
        # the shapes get_all returns (a loss signal's first column only), without reading values
        return [(meta, (sig.num_rows,) if name in LOSS_SIGNALS else (sig.num_rows, *sig.meta.row_shape))
                for meta, sig in self._signals(name, split)]

    def map_rows(self, name: str, fn: RowMap, split: str = "train", variant: int = -1) -> np.ndarray:
        return self.scorer.map_rows(self._signals(name, split)[variant][1], fn)

    def get_rows_all(self, name: str, rows: np.ndarray, split: str = "train") -> list[tuple[dict, np.ndarray]]:
        """Values of the given rows only: read where committed, else computed for those rows alone."""
        route = self._route(name, split)
        if route.rows != "probe":  # committed: the rows' shards are read (a kept small signal from the cache)
            return [(meta, self.cache.get(sig, name, split)[np.asarray(rows)] if self.cache.keeps(sig, name, split)
                     else sig.read_rows(rows).astype(np.float32)) for meta, sig in self._signals(name, split)]
        data, store = self._split(split)
        rows = np.asarray(rows, dtype=np.int64)
        batch = data.dataset[rows.tolist()]
        out = []
        for stage in route.stages:
            if route.live:
                values = self.refresher.compute_rows(stage, batch)
            else:
                sig = existing_signal(stage, store)  # a probe reads the store, never creates an empty signal in it
                done = set(sig.committed_shards()) if sig is not None else set()
                if sig is not None and all(int(s) in done for s in np.unique(rows // sig.shard_rows)):
                    values = sig.read_rows(rows)
                else:  # the offline stage on these rows alone (its model loads once: routes live as long as the run)
                    values = stage.compute(batch)
            out.append((self._meta(route, stage), np.asarray(values, dtype=np.float32)))
            self.log.setdefault("probe_rows", {})[route.label] = int(rows.size)
        return out

    def search(self, name: str, queries: np.ndarray, k: int, split: str = "train"):
        sig = self._signals(name, split)[-1][1]
        # loaded once per process while the signal is unchanged: a decision that widens k searches it again
        return shared_index(sig, self.cfg.index.rule()).search(queries, k, nprobe=self.cfg.index.nprobe)

    def derived(self, stage, source: str, split: str = "train") -> np.ndarray:
        """Derived from the whole of `source` (stages.derived), stored in the split's store (refresh.store's twin when
        set): rank 0 computes and commits, the other ranks then read it; a read-only store is derived in memory."""
        sig = self._signals(source, split)[-1][1]
        store = run_store(self.cfg, self.p, split)
        if store.read_only:
            check_complete(sig)
            values, computed, where = np.asarray(stage.derive(sig.read_all()), dtype=stage.dtype), True, "memory"
        else:
            if self.rank == 0:
                values, computed = derive_signal(stage, sig, store)
            if self.barrier is not None:
                self.barrier()
            if self.rank != 0:
                values, computed = derive_signal(stage, sig, store)
            where = "store"
        self.log.setdefault("derived", {})[f"{stage.name}/{split}"] = {"source": sig.key, "computed": computed,
                                                                       "in": where}
        return values
