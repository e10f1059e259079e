"""StoreSignals.search: the index is loaded once per process while the signal is unchanged, with index.nprobe."""

from __future__ import annotations

import numpy as np

import store.faiss_index as faiss_index
from pipeline.config import RunConfig
from pipeline.config.groups import FlexArgs, RefreshArgs
from pipeline.prepared import Prepared
from pipeline.refresh import SignalRoute, StoreSignals
from stages.args import DataArgs, EmbedArgs, GradsArgs, IndexArgs, LossArgs, ModelArgs, RunnerArgs, StoreArgs
from stages.base import SignalDesc
from stages.runner import stage_signal
from tests.helpers.store_helpers import make_store


class StoredEmbeddings:
    """The stage a committed `embed` signal was written by (only its signal description is read)."""

    def signal(self) -> SignalDesc:
        return SignalDesc("embed", {"test": "search"}, dtype="float16", dim=8)


def test_search_loads_the_index_once_and_probes_the_configured_lists(tmp_path, monkeypatch):
    store = make_store(tmp_path / "s", num_rows=300, shard_rows=64)
    rng = np.random.default_rng(0)
    base = rng.standard_normal((300, 8)).astype(np.float16)
    sig = stage_signal(StoredEmbeddings(), store)
    for shard in range(sig.num_shards):
        sig.write_shard(shard, base[slice(*sig.shard_range(shard))])
    cfg = RunConfig(model=ModelArgs(), data=DataArgs(), store=StoreArgs(), runner=RunnerArgs(), embed=EmbedArgs(),
                    loss=LossArgs(), grads=GradsArgs(), index=IndexArgs(flat_max_rows=100, nprobe=3), training={},
                    flex=FlexArgs(), refresh=RefreshArgs())
    p = Prepared(tokenizer=None, train=None, target=None, train_store=store, target_store=None)
    routes = {("embed", "train"): SignalRoute("embed", "train", live=False, stages=[StoredEmbeddings()])}
    loads = []
    real_load = faiss_index.load_index
    monkeypatch.setattr(faiss_index, "load_index", lambda *a, **k: loads.append(1) or real_load(*a, **k))
    faiss_index.forget_shared()
    queries = base[:5].astype(np.float32)
    for step in range(3):  # three decisions, each with its own StoreSignals, as the trainer makes them
        scores, ids = StoreSignals(cfg, p, step, routes).search("embed", queries, 4)
        assert ids.shape == (5, 4)
    assert len(loads) == 1
    index = faiss_index.shared_index(sig)
    assert index.kind == "ivf" and index.index.nprobe == 3  # the configured lists, not the default rule
    faiss_index.forget_shared()
