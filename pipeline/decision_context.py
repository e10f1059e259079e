"""What a decision sees during training: the run's signals made ready at the live training state.

`DecisionContexts` is built with the run (config, data, signal routes) and bound to the
Trainer once it exists; the scheduler calls it at each decision. It owns what only a live Trainer
has: the unwrapped model, the optimizer (Adam moments, learning rate), the ranks, ZeRO-3 gathering.
"""

from __future__ import annotations

import contextlib
import time
import uuid

import numpy as np
import torch.distributed as dist
from transformers import TrainerCallback

from stages.runner import INLINE
from store.errors import FlexfeedError
from store.runs import mark_finished, mark_running

from .config import RunConfig
from .live_state import live_adam_state, live_lr
from .plan import rng_for
from .prepared import Prepared, run_store
from .refresh import Refresher, SignalRoute, StoreSignals, ValueCache
from .shard_scoring import ShardScorer, all_gather_objects
from .strategies import DecisionContext


def new_run_id() -> str:
    """A fresh id for this run's refreshed signals, the same on every rank (rank 0's, broadcast).

    Refreshed values depend on the run's trajectory, so they are keyed by the run; the id is random
    rather than derived from the output folder (no path in a key) and is saved in every checkpoint, so
    a resumed run continues with the signals it refreshed.
    """
    box = [uuid.uuid4().hex]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(box, src=0)
    return box[0]


class DecisionContexts:
    """Makes the DecisionContext of each decision; `bind` it to the Trainer and scheduler before training."""

    def __init__(self, cfg: RunConfig, prepared: Prepared, routes: dict[tuple, SignalRoute],
                 *, seed: int, init_proportions: np.ndarray):
        self.cfg = cfg
        self.p = prepared
        self.routes = routes
        self.seed = seed
        self.init_proportions = init_proportions
        self.domain_ids = prepared.train.domain_ids()
        self.target_domain_ids = prepared.target.domain_ids() if prepared.target is not None else None
        self.cache = ValueCache()  # float32 copies reused across decisions while no shard changes
        self.scorer: ShardScorer | None = None  # per-row results, split across the ranks (made when bound)
        self.trainer = None
        self.scheduler = None

    def bind(self, trainer, scheduler) -> None:
        """The Trainer (model, optimizer, ranks) and the scheduler (whose checkpointed run id keys refreshes)."""
        self.trainer = trainer
        self.scheduler = scheduler
        acc = trainer.accelerator
        dask = self.cfg.runner.scheduler if self.cfg.runner.scheduler != INLINE else None
        self.scorer = ShardScorer(rank=acc.process_index, world_size=acc.num_processes, gather=all_gather_objects,
                                  scheduler=dask)
        if dask:
            trainer.add_callback(ScorerDisconnect(self.scorer))
        if any(r.live for r in self.routes.values()):
            trainer.add_callback(RunCopyMarks(self))

    def stores(self) -> list:
        """The stores the run's refreshed copies go to (refresh.store's, else the train and target stores)."""
        return [run_store(self.cfg, self.p, split) for split, store in (("train", self.p.train_store),
                                                                         ("target", self.p.target_store))
                if store is not None]

    def __call__(self, step: int, window: int) -> DecisionContext:
        if self.trainer is None:
            raise FlexfeedError("a decision was asked for before the trainer was bound",
                                "call DecisionContexts.bind(trainer, scheduler) before training")
        acc = self.trainer.accelerator
        source = StoreSignals(self.cfg, self.p, step, self.routes, self._refresher(), cache=self.cache,
                              rank=acc.process_index, world_size=acc.num_processes, barrier=acc.wait_for_everyone,
                              live_lr=lambda: live_lr(self.trainer), scorer=self.scorer)
        # signals are made ready when a stage first reads them: only the stages that fire pay, and one
        # refresh serves every stage of the decision that reads the same signal
        return DecisionContext(step=step, num_rows=len(self.p.train), domain_ids=self.domain_ids,
                               domain_names=self.p.train.domain_names, rng=rng_for(self.seed, 99, window),
                               signals=source, target_domain_ids=self.target_domain_ids, log=source.log,
                               init_proportions=self.init_proportions)

    def _refresher(self) -> Refresher | None:
        if not any(r.live for r in self.routes.values()):
            return None
        trainer, acc = self.trainer, self.trainer.accelerator
        model = acc.unwrap_model(trainer.model)
        return Refresher(model=model, tokenizer=self.p.tokenizer, max_staleness=self.cfg.refresh.max_staleness,
                         rank=acc.process_index, world_size=acc.num_processes, barrier=acc.wait_for_everyone,
                         gather_params=zero3_gather(trainer), run_id=self.scheduler.run_id,
                         live_state=live_state_of(trainer, model))


class RunCopyMarks(TrainerCallback):
    """Marks the run's copies in its stores as in use while it trains and finished when training ends, so that
    `flexfeed store gc --finished-runs` can drop them (store/runs.py); a killed run leaves them marked in use."""

    def __init__(self, contexts: DecisionContexts):
        self.contexts = contexts

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:  # the run id is the checkpoint's by now, when resumed
            for store in self.contexts.stores():
                mark_running(store, self.contexts.scheduler.run_id)

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            for store in self.contexts.stores():
                mark_finished(store, self.contexts.scheduler.run_id, output_dir=str(args.output_dir),
                              steps=state.global_step, finished_at=time.time())


class ScorerDisconnect(TrainerCallback):
    """Disconnects the decisions' Dask client when training ends (the cluster itself keeps running)."""

    def __init__(self, scorer: ShardScorer):
        self.scorer = scorer

    def on_train_end(self, args, state, control, **kwargs):
        self.scorer.close()


def live_state_of(trainer, model):
    """Named live training state for stages that read it (the optimizer's Adam moments)."""
    def get(key: str):
        if key == "adam_state":
            return live_adam_state(trainer, model)
        raise FlexfeedError(f"unknown live training state {key!r}", "a stage may read adam_state")
    return get


def zero3_gather(trainer):
    """A context factory gathering ZeRO-3 parameters for a refresh (None without ZeRO-3)."""
    ds = getattr(trainer, "is_deepspeed_enabled", False) and trainer.accelerator.state.deepspeed_plugin
    if not ds or trainer.accelerator.state.deepspeed_plugin.zero_stage != 3:
        return None
    import deepspeed  # only under DeepSpeed

    model = trainer.model
    return lambda: _zero3_computing(deepspeed, model)


@contextlib.contextmanager
def _zero3_computing(deepspeed, engine):
    """Every ZeRO-3 parameter gathered while a refresh computes, handed back partitioned afterwards.

    A refresh's backward stops at the per-sample gradient leaves, so ZeRO-3's post-backward hooks never
    release the modules its forward marked active; they are released here, before re-partitioning.
    """
    params = list(engine.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        try:
            yield
        finally:
            for p in params:
                active = getattr(p, "ds_active_sub_modules", None)
                if active:
                    active.clear()
            offload = getattr(getattr(engine, "optimizer", None), "parameter_offload", None)
            if offload is not None:
                offload.get_param_coordinator().reset_step()
