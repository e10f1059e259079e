"""The online trainer end to end on a tiny model: static parity, selectors, resume, staleness."""

from __future__ import annotations

import json

import numpy as np
import pytest
from transformers import TrainerCallback

from pipeline.config import load_config
from pipeline.prepared import prepare
from pipeline.signal_stages import stages_for
from pipeline.stage_job import run_stage_job
from pipeline.state_io import load_state
from pipeline.train import train


def _losses(out_dir):
    run = json.loads((out_dir / "flexfeed_run.json").read_text())
    return [h["loss"] for h in run["log_history"] if "loss" in h]


def test_static_run_matches_a_plain_trainer(run_cfg, tmp_path):
    from transformers import Trainer

    from pipeline.config import to_training_arguments
    from pipeline.rows import RowCollator, RowsDataset
    from stages.models import load_model

    path, _ = run_cfg
    cfg = load_config(path, [f"output_dir={tmp_path / 'flex'}", "train_type=static"])
    train(cfg)
    flex_losses = _losses(tmp_path / "flex")

    plain_cfg = load_config(path, [f"output_dir={tmp_path / 'plain'}", "train_type=static"])
    p = prepare(plain_cfg, need_target=False)
    args = to_training_arguments(plain_cfg, remove_unused_columns=False)
    trainer = Trainer(model=load_model(plain_cfg.model), args=args, train_dataset=RowsDataset(p.train),
                      data_collator=RowCollator(p.tokenizer.pad_token_id, with_ids=False))
    trainer.train()
    plain_losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(flex_losses) == len(plain_losses) == 6
    np.testing.assert_allclose(flex_losses, plain_losses, rtol=1e-6)


@pytest.mark.parametrize("component", ["random", "loss", "delta_loss", "near", "tsds", "cluster", "less"])
def test_each_selector_trains_end_to_end(run_cfg, tmp_path, component, seen_rows):
    path, _ = run_cfg
    cfg = load_config(path, [f"output_dir={tmp_path}", "train_type=select", f"component={component}",
                             "warmup_step=4", "update_step=4"])
    summary = train(cfg)
    assert summary["steps"] == 12
    decisions = [json.loads(x) for x in (tmp_path / "flexfeed_decisions.jsonl").read_text().splitlines()]
    assert [d["step"] for d in decisions if d["decision"]] == [4, 8]
    for d in decisions:
        assert sum(d["per_domain"].values()) == 16
    # the batches trained on are exactly the plans, in order
    stream = [r for batch in seen_rows for r in batch]
    state = load_state(tmp_path)  # the plans are arrays beside the JSON
    plans = [state["plans"][str(w)].tolist() for w in range(3)]
    assert [len(p) for p in plans] == [16, 16, 16] and len(state["plans"]) == 3
    assert stream == [r for p in plans for r in p]


def test_near_selects_the_targets_nearest_rows(tiny_checkpoint, tmp_path):
    """The target set is 16 exact copies of train rows (8 per domain): each target's nearest train row
    (cosine 1) is its copy, so a decision for 16 rows takes exactly those 16, whatever the model.

    Under random selection the chance that 16 of the 64 train rows are exactly those is 1 / C(64, 16) =
    1 / 4.9e14 ~ 2e-15 (< 1e-6); even containing them all is that. One decision, with allow_repeats pinned
    true, so the rows served in warm-up do not enter (the rule for consume_once is tested elsewhere).
    """
    from tests.helpers.run_fixtures import make_run_dir

    path = make_run_dir(tmp_path / "run", tiny_checkpoint)
    data = tmp_path / "run" / "data"
    a, b = (json.loads((data / f"{n}.json").read_text()) for n in "ab")
    copies = [a[i] for i in range(2, 40, 5)] + [b[i] for i in range(1, 24, 3)]
    (data / "t.json").write_text(json.dumps(copies))
    cfg = load_config(path, [f"output_dir={tmp_path / 'out'}", "train_type=select", "component=near",
                             "warmup_step=4", "update_step=4", "max_steps=8", "allow_repeats=true"])
    run_stage_job(cfg, "all", progress=False)
    # the copies' row ids, found by their tokens (not by embeddings)
    p = prepare(cfg)
    train_rows = p.train.rows(0, len(p.train))["input_ids"]
    target_rows = p.target.rows(0, len(p.target))["input_ids"]
    expected = sorted(train_rows.index(t) for t in target_rows)
    assert len(set(expected)) == 16
    train(cfg)
    assert sorted(load_state(tmp_path / "out")["plans"]["1"].tolist()) == expected


class StopAt(TrainerCallback):
    """Ends training right after the checkpoint of a given step, as a crash would."""

    def __init__(self, step):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True
        return control


def test_resume_gives_identical_next_batches_and_state(run_cfg, tmp_path, seen_rows):
    path, _ = run_cfg
    common = ["train_type=select", "component=loss", "warmup_step=2", "update_step=3", "save_steps=5",
              "refresh.max_staleness=2"]
    train(load_config(path, [f"output_dir={tmp_path / 'full'}", *common]))
    full = list(seen_rows)
    seen_rows.clear()
    # a second run stopped after its checkpoint at step 5, then resumed from it
    train(load_config(path, [f"output_dir={tmp_path / 'cut'}", *common]), extra_callbacks=[StopAt(5)])
    assert seen_rows == full[: len(seen_rows)]
    seen_rows.clear()
    train(load_config(path, [f"output_dir={tmp_path / 'cut'}", *common,
                             f"resume_from_checkpoint={tmp_path / 'cut' / 'checkpoint-5'}"]))
    assert seen_rows == full[5:]
    a = json.loads((tmp_path / "full" / "flexfeed_state.json").read_text())
    b = json.loads((tmp_path / "cut" / "flexfeed_state.json").read_text())
    assert a["strategy"] == b["strategy"]
    assert [d["per_domain"] for d in a["decisions"]] == [d["per_domain"] for d in b["decisions"]]


def test_refresh_recomputes_exactly_the_stale_shards(run_cfg, tmp_path):
    from pipeline.refresh import Refresher, run_signal

    path, _ = run_cfg
    cfg = load_config(path, [f"store={tmp_path / 'store'}"])
    run_stage_job(cfg, "loss", progress=False)
    p = prepare(cfg, need_target=False)
    stage = stages_for(cfg, "loss", "train")[0]
    from stages.models import load_model

    model = load_model(cfg.model)
    refresher = Refresher(model=model, tokenizer=p.tokenizer, max_staleness=2, run_id="r1")
    # the run's copy starts as the offline signal (shards 0..3 at step 0); move shards 1 and 3 to step 9
    sig = run_signal(stage, p.train_store, "r1")
    info, _ = refresher.refresh(stage, p.train, p.train_store, 0)
    assert info["stale"] == 0 and {r.version for r in sig.records().values()} == {0}
    for shard in (1, 3):
        sig.write_shard(shard, stage.compute(p.train.rows(*sig.shard_range(shard))), version=9)
    before = {s: r.generation for s, r in sig.records().items()}
    info, _ = refresher.refresh(stage, p.train, p.train_store, 10)
    after = {s: r.generation for s, r in sig.records().items()}
    assert info["stale"] == 2
    assert sorted(s for s in after if after[s] != before[s]) == [0, 2]
    assert all(sig.record(s).version == 10 for s in (0, 2))
    info, _ = refresher.refresh(stage, p.train, p.train_store, 10)
    assert info["stale"] == 0
    offline = p.train_store.signal(stage.signal().name, stage.signal().spec, dtype="float32", dim=2)
    assert {r.version for r in offline.records().values()} == {0}  # the offline signal is never written


def test_less_with_refresh_recomputes_gradients_with_the_live_model(run_cfg, tmp_path):
    path, _ = run_cfg
    cfg = load_config(path, [f"output_dir={tmp_path}", "train_type=select", "component=less", "warmup_step=4",
                             "update_step=4", "refresh.max_staleness=3"])
    run_stage_job(cfg, "grads", progress=False)
    train(cfg)
    decisions = [json.loads(x) for x in (tmp_path / "flexfeed_decisions.jsonl").read_text().splitlines()]
    refreshed = [d["refresh"] for d in decisions if d["decision"]]
    # sgd features of the model as loaded are the live definition at step 0: the run's copy starts from
    # them, stale at step 4 and again at step 8 (4 shards of train rows)
    assert [r["grads/train"]["stale"] for r in refreshed] == [4, 4]
    assert [r["grads_sgd/target"]["stale"] for r in refreshed] == [1, 1]
    read = [d["signals"]["grads/train"] for d in decisions if d["decision"]]
    assert [[v["versions"] for v in r] for r in read] == [[[4, 4]], [[8, 8]]]  # one live variant
    p = prepare(cfg)
    run_sig = p.train_store.get(read[-1][0]["key"])
    assert {r.version for r in run_sig.records().values()} == {8} and run_sig.meta.spec.get("run")
    offline = [s for s in p.train_store.signals() if s.name == run_sig.name and "run" not in s.meta.spec
               and s.records()]
    assert offline and all({r.version for r in s.records().values()} == {0} for s in offline)  # untouched


@pytest.mark.parametrize("component,args", [
    ("static", ["component_args.proportions=stratified"]),
    ("random", []),
    ("doremi", []),
    ("odm", []),
])
def test_each_mixer_trains_end_to_end(run_cfg, tmp_path, component, args):
    path, _ = run_cfg
    cfg = load_config(path, [f"output_dir={tmp_path}", "train_type=mix", f"component={component}", *args,
                             "warmup_step=4", "update_step=4", "loss.signal=ref_loss"])
    if component == "doremi":
        run_stage_job(cfg, "loss", progress=False)  # reference losses (here: the initial model)
    summary = train(cfg)
    decisions = [json.loads(x) for x in (tmp_path / "flexfeed_decisions.jsonl").read_text().splitlines()]
    for d in decisions:
        assert sum(d["proportions"].values()) == pytest.approx(1.0)
        assert sum(d["per_domain"].values()) == 16
    assert set(summary["final_weights"]) == {"a", "b"}
    if component == "static":
        assert decisions[1]["proportions"] == pytest.approx({"a": 40 / 64, "b": 24 / 64})
    if component == "doremi":
        written = json.loads((tmp_path / "domain_weights.json").read_text())["domain_weights"]
        assert written == pytest.approx(summary["final_weights"])


@pytest.mark.parametrize("component,args", [
    ("loss", ["component_args.strategy=linupper"]),
    ("loss", ["component_args.strategy=uniform"]),
    ("loss", ["component_args.strategy=quadratic"]),
    ("loss", ["component_args.strategy=extremes"]),
    ("adapt", []),
])
def test_each_weighter_trains_end_to_end(run_cfg, tmp_path, component, args):
    path, _ = run_cfg
    cfg = load_config(path, [f"output_dir={tmp_path}", "train_type=weight", f"component={component}", *args,
                             "warmup_step=4", "update_step=4"])
    train(cfg)
    records = [json.loads(x) for x in (tmp_path / "flexfeed_weights.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(4, 12))  # the plain loss before warmup_step, as DataFlex
    for r in records:
        assert np.mean(r["weights"]) == pytest.approx(1.0, abs=1e-4)
    if args == ["component_args.strategy=uniform"]:
        assert all(w == pytest.approx(1.0) for r in records for w in r["weights"])


def test_decisions_reach_the_trainer_log(run_cfg, tmp_path):
    path, _ = run_cfg
    cfg = load_config(path, [f"output_dir={tmp_path}", "train_type=select", "component=loss", "warmup_step=4",
                             "update_step=4", "logging_steps=1", "refresh.max_staleness=2"])
    summary = train(cfg)
    logged = [h for h in summary["log_history"] if "flexfeed/a_count" in h]
    assert [h["step"] for h in logged] == [4, 8]  # logged with the first step of each decided window
    assert all(h["flexfeed/a_count"] + h["flexfeed/b_count"] == 16 for h in logged)
    assert all("flexfeed/score_mean" in h and "flexfeed/refresh_loss_train_shards" in h for h in logged)


def test_offline_versions_start_at_step_zero_in_the_run(run_cfg, tmp_path):
    """A shard stamped with a warm-up checkpoint's step (20) is fresh at this run's step 4, stale at 25."""
    from pipeline.refresh import Refresher
    from stages.models import load_model

    path, _ = run_cfg
    cfg = load_config(path, [f"store={tmp_path / 'store'}"])
    p = prepare(cfg, need_target=False)
    stage = stages_for(cfg, "loss", "train")[0]
    desc = stage.signal()
    base = p.train_store.signal(desc.name, desc.spec, dtype=desc.dtype, dim=desc.dim)
    for shard in range(base.num_shards):
        base.write_shard(shard, stage.compute(p.train.rows(*base.shard_range(shard))), version=20)
    refresher = Refresher(model=load_model(cfg.model), tokenizer=p.tokenizer, max_staleness=10, run_id="r1")
    info, sig = refresher.refresh(stage, p.train, p.train_store, 4)
    assert info["stale"] == 0 and {r.version for r in sig.records().values()} == {0}
    info, sig = refresher.refresh(stage, p.train, p.train_store, 25)
    assert info["stale"] == base.num_shards and {r.version for r in sig.records().values()} == {25}


def test_joint_update_aware_weighs_batches_from_the_training_forward(run_cfg, tmp_path):
    """Alone and after a loss weighter in a plan: target embeddings refreshed at each firing, weights mean 1."""
    path, _ = run_cfg
    cfg = load_config(path, [f"output_dir={tmp_path / 'alone'}", "train_type=weight", "component=joint_update_aware",
                             "component_args.beta=0.5", "component_args.tau=0.02", "warmup_step=4", "update_step=4"])
    train(cfg)
    records = [json.loads(x) for x in (tmp_path / "alone" / "flexfeed_weights.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(4, 12))
    for r in records:
        w = np.array(r["weights"])
        assert w.mean() == pytest.approx(1.0, abs=1e-4) and np.ptp(w) > 1e-3
        assert r["ess"] == pytest.approx(w.sum() ** 2 / (w**2).sum(), rel=1e-4) and r["joint_update_aware/converged"]
    decisions = [json.loads(x) for x in (tmp_path / "alone" / "flexfeed_decisions.jsonl").read_text().splitlines()]
    fired = [d for d in decisions if d["decision"]]
    assert [d["step"] for d in fired] == [4, 8] and all(d["refresh"]["embed/target"]["stale"] for d in fired)
    plan = ("plan=[{family: select, component: loss, mode: filter, keep_ratio: 0.5}, {family: weight, component: "
            "loss}, {family: weight, component: joint_update_aware, component_args: {beta: 0.5, tau: 0.02}}]")
    cfg = load_config(path, [f"output_dir={tmp_path / 'plan'}", "train_type=plan", plan, "warmup_step=4",
                             "update_step=4"])
    train(cfg)
    records = [json.loads(x) for x in (tmp_path / "plan" / "flexfeed_weights.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(4, 12))
    assert all(r["joint_update_aware/converged"] and np.ptp(r["weights"]) > 1e-3 for r in records)


def test_joint_update_aware_weights_are_the_maximiser_for_the_rows_trained_on(run_cfg, tmp_path, seen_rows):
    """With a learning rate of 1e-12 the model does not move: each batch's weights must be B x the simplex maximiser for
    the embed stage's own vectors of the batch's rows and of the target set, computed here apart from the run."""
    from scipy.optimize import minimize

    from pipeline.prepared import prepare
    from stages.embed import EmbedStage

    path, _ = run_cfg
    cfg = load_config(path, [f"output_dir={tmp_path}", "train_type=weight", "component=joint_update_aware",
                             "component_args.beta=0.5", "component_args.tau=0.05", "warmup_step=4", "update_step=4",
                             "learning_rate=1e-12", "embed.pooling=mean", "embed.layer=-2"])
    train(cfg)
    records = [json.loads(x) for x in (tmp_path / "flexfeed_weights.jsonl").read_text().splitlines()]
    p = prepare(cfg, need_target=True)
    stage = EmbedStage(cfg.model, cfg.embed, cutoff_len=cfg.data.cutoff_len)
    target = stage.compute({"input_ids": p.target.dataset["input_ids"]})
    u = target.mean(0) / np.linalg.norm(target.mean(0))
    for record, rows in zip(records, seen_rows[4:], strict=True):
        z = stage.compute({"input_ids": [p.train.dataset[r]["input_ids"] for r in rows]}).astype(np.float64)
        s, gram = z @ u, z @ z.T

        def neg(x, s=s, gram=gram):
            w = np.exp(x - x.max())
            w /= w.sum()
            return -(s @ w - 0.25 * w @ gram @ w - 0.05 * np.sum(w * np.log(w)))

        x = minimize(neg, np.zeros(len(rows)), method="BFGS", options={"gtol": 1e-10}).x
        expected = len(rows) * np.exp(x - x.max()) / np.exp(x - x.max()).sum()
        np.testing.assert_allclose(record["weights"], expected, atol=2e-3)
        assert np.ptp(expected) > 0.1  # far from uniform: rows out of order would not match
