"""icons, rho_loss and dsir end to end on the tiny model: alone (their first selection checked against the stored
signals) and as the draw stage of a composed plan behind a loss filter."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.config import load_config
from pipeline.prepared import prepare
from pipeline.signal_stages import stages_for
from pipeline.stage_job import run_stage_job
from pipeline.state_io import load_state
from pipeline.strategies.selectors.rho_loss import RhoLossSelector
from pipeline.train import train
from stages.runner import existing_signal


def _decisions(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "flexfeed_decisions.jsonl").read_text().splitlines()]


def _stored(cfg, name: str, split: str) -> np.ndarray:
    p = prepare(cfg)
    store = p.train_store if split == "train" else p.target_store
    (stage,) = stages_for(cfg, name, split)
    return existing_signal(stage, store).read_all().astype(np.float64)


def _select_run(path, out, component: str, *extra: str):
    cfg = load_config(path, [f"output_dir={out}", "train_type=select", f"component={component}", "warmup_step=4",
                             "update_step=4", *extra])
    train(cfg)
    decided = [d for d in _decisions(out) if d["decision"]]
    assert [d["step"] for d in decided] == [4, 8]
    plans = load_state(out)["plans"]
    first, second = plans["1"], plans["2"]
    assert len(first) == len(second) == 16
    assert not set(first.tolist()) & set(second.tolist())  # consume_once: the second window takes other rows
    return cfg, first, decided


def _plan_run(root: Path, out: Path, component: str, *extra: str) -> list[dict]:
    """A loss filter keeping half the rows, then the component drawing each window from that pool."""
    text = (root / "cfg.yaml").read_text().replace(f"output_dir: {root}/out", f"output_dir: {out}") + f"""
train_type: plan
warmup_step: 4
update_step: 4
plan:
  - {{family: select, component: loss, mode: filter, keep_ratio: 0.5, every: 100}}
  - {{family: select, component: {component}}}
"""
    path = out.parent / f"{out.name}.yaml"
    path.write_text(text)
    train(load_config(path, list(extra)))
    decided = [d for d in _decisions(out) if d["decision"]]
    assert [d["step"] for d in decided] == [4, 8]
    assert decided[0]["filter"][0]["pool"] == 32
    assert [s["fired"] for s in decided[0]["stages"]] == [True, True]
    assert all(d["info"]["num_selected"] == 16 for d in decided)
    return decided


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_icons_alone_selects_the_stored_gradients_top_rows(run_cfg, tmp_path):
    path, _ = run_cfg
    cfg, first, decided = _select_run(path, tmp_path / "alone", "icons")
    # one target task: every row's influence is its mean cosine to the target rows; the task votes for its
    # top 16 of 64, so the selection is those 16 rows
    influence = (_unit(_stored(cfg, "grads", "train")) @ _unit(_stored(cfg, "grads_sgd", "target")).T).mean(axis=1)
    assert set(first.tolist()) == set(np.argsort(-influence, kind="stable")[:16].tolist())
    assert decided[0]["info"]["num_tasks"] == 1


def test_icons_draws_inside_a_plan(run_cfg, tmp_path):
    _, root = run_cfg
    decided = _plan_run(root, tmp_path / "plan", "icons")
    assert decided[0]["info"]["num_tasks"] == 1


@pytest.fixture(scope="module")
def reference(run_cfg, tmp_path_factory) -> list[str]:
    """Overrides naming a reference adapter: a short static run's last checkpoint, scoring ref_loss."""
    path, _ = run_cfg
    out = tmp_path_factory.mktemp("reference")
    train(load_config(path, [f"output_dir={out}", "train_type=static", "max_steps=4", "save_steps=4"]))
    return ["loss.signal=ref_loss", f"loss.adapter_name_or_path={out / 'checkpoint-4'}"]


def test_rho_loss_alone_takes_the_top_reducible_loss_of_the_live_model(run_cfg, reference, tmp_path, monkeypatch):
    seen = []
    original = RhoLossSelector.select

    def recording(self, ctx, num_samples):
        res = original(self, ctx, num_samples)
        seen.append((np.array(ctx.signals.get("loss", "train")), np.array(ctx.signals.get("ref_loss", "train")),
                     res.indices.copy()))
        return res

    monkeypatch.setattr(RhoLossSelector, "select", recording)
    path, _ = run_cfg
    cfg, first, decided = _select_run(path, tmp_path / "alone", "rho_loss", *reference)
    assert len(seen) == 2
    # the reference loss is the reference adapter's, scored offline; both decisions see every row (rho_loss does
    # not consume the pool: its live loss moves). Each takes the top 16 of live loss minus reference loss.
    ref_stored = _stored(cfg, "ref_loss", "train")[:, 0]
    for loss, ref, indices in seen:
        np.testing.assert_allclose(ref, ref_stored, rtol=1e-6)
        reducible = loss.astype(np.float64) - ref
        assert indices.tolist() == np.argsort(-reducible, kind="stable")[:16].tolist()
    assert not np.allclose(seen[0][0], ref_stored)  # the training model is not the reference
    assert not np.allclose(seen[0][0], seen[1][0])  # the second decision saw the refreshed live loss
    assert set(first.tolist()) == set(seen[0][2].tolist())
    assert decided[0]["refresh"]["loss/train"]["stale"] == 4  # every shard of the live loss recomputed


def test_rho_loss_draws_inside_a_plan(run_cfg, reference, tmp_path):
    _, root = run_cfg
    decided = _plan_run(root, tmp_path / "plan", "rho_loss", *reference)
    assert "ref_loss_mean" in decided[0]["info"]


def test_stage_all_counts_ngrams_only_for_a_component_that_reads_them(run_cfg):
    path, _ = run_cfg
    assert not [r for r in run_stage_job(load_config(path), "all", progress=False) if r.signal == "ngram"]
    done = [r for r in run_stage_job(load_config(path, ["train_type=select", "component=dsir"]), "all",
                                     progress=False) if r.signal == "ngram"]
    assert len(done) == 2 and sum(len(r.computed) for r in done) == 4 + 1  # 64 train rows, 6 target, 16 a shard


def test_flexfeed_stage_ngram_computes_train_and_target_once(run_cfg):
    path, _ = run_cfg
    first = CliRunner().invoke(main, ["stage", "ngram", str(path), "ngram.num_buckets=256"])
    assert first.exit_code == 0, first.output
    assert "recomputed_shards=5" in first.output  # 4 train shards of 16 rows, 1 target shard
    again = CliRunner().invoke(main, ["stage", "ngram", str(path), "ngram.num_buckets=256"])
    assert again.exit_code == 0 and "recomputed_shards=0" in again.output  # same counting rule, same data: reused


def test_dsir_alone_takes_the_largest_importance_weights_of_the_stored_counts(run_cfg, tmp_path):
    path, _ = run_cfg
    # 512 buckets: counts the store does not hold yet, computed by the ngram stage when the first decision reads them
    cfg, first, decided = _select_run(path, tmp_path / "alone", "dsir", "component_args.top_k=true",
                                      "ngram.num_buckets=512")
    assert "ngram" in decided[0]["offline_filled"] and "offline_filled" not in decided[1]
    counts, target = _stored(cfg, "ngram", "train"), _stored(cfg, "ngram", "target")
    p_raw, p_target = counts.sum(0) / counts.sum(), target.sum(0) / target.sum()
    logw = counts @ (np.log(p_target + 1e-8) - np.log(p_raw + 1e-8))
    assert set(first.tolist()) == set(np.argsort(-logw, kind="stable")[:16].tolist())
    # the target adds numbers like domain a: its rows outweigh domain b's repetitions
    assert logw[:40].mean() > logw[40:].mean()


def test_dsir_resamples_inside_a_plan(run_cfg, tmp_path):
    _, root = run_cfg
    decided = _plan_run(root, tmp_path / "plan", "dsir")
    assert decided[0]["signals"]["ngram/train"][0]["source"] == "offline"
