"""Evaluation during training: eval_loss every eval_steps, val_size held-out rows, early stopping, the best
model at the end, target/eval routing, and config errors refused at load. Expected losses are computed here,
row by row with plain torch, from the saved model states (or an unchanged model: learning rate 0)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
import yaml

from pipeline.config import load_config
from pipeline.evaluation import num_held_out, split_validation
from pipeline.prepared import prepare
from pipeline.train import train
from pipeline.trainer import FlexfeedTrainer
from stages.data import load_data
from stages.models import load_model
from store.errors import FlexfeedError
from tests.helpers.run_fixtures import make_run_dir


@pytest.fixture(scope="module")
def run_path(tiny_checkpoint, tmp_path_factory):
    """The tiny two-domain run (a: 40 rows, b: 24; eval_dataset t: 6 rows); no offline signals needed."""
    return make_run_dir(tmp_path_factory.mktemp("eval_run"), tiny_checkpoint)


def _evals(out_dir, key="eval_loss") -> dict[int, float]:
    run = json.loads((out_dir / "flexfeed_run.json").read_text())
    return {h["step"]: h[key] for h in run["log_history"] if key in h}


def _model(cfg, adapter=None):
    model = load_model(dataclasses.replace(cfg.model, adapter_name_or_path=str(adapter) if adapter else None))
    return model.eval()


def _row_losses(model, data) -> tuple[np.ndarray, np.ndarray]:
    """Per row, unpadded: (sum of next-token cross-entropies over trained labels, their count)."""
    sums, counts = [], []
    with torch.no_grad():
        for ids, labels in zip(data.dataset["input_ids"], data.dataset["labels"], strict=True):
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
            target = torch.tensor(labels[1:])
            keep = target != -100
            ce = torch.nn.functional.cross_entropy(logits[keep], target[keep], reduction="sum")
            sums.append(float(ce))
            counts.append(int(keep.sum()))
    return np.asarray(sums), np.asarray(counts)


def _token_mean(model, data) -> float:
    sums, counts = _row_losses(model, data)
    return float(sums.sum() / counts.sum())


@pytest.mark.parametrize("kind", [["train_type=static"], ["train_type=weight", "component=loss"]],
                         ids=["static", "weighted"])
def test_eval_loss_every_eval_steps_is_the_plain_loss_of_the_saved_states(run_path, tmp_path, kind):
    out = tmp_path / "out"
    cfg = load_config(run_path, [f"output_dir={out}", *kind, "eval_strategy=steps", "eval_steps=2", "max_steps=6",
                                 "save_steps=2", "per_device_eval_batch_size=6"])
    train(cfg)
    evals = _evals(out)
    assert sorted(evals) == [2, 4, 6]
    t_rows = prepare(cfg, need_eval=True).eval
    assert t_rows.domain_names == ["t"] and len(t_rows) == 6  # one eval batch: eval_loss is its token mean
    for step, logged in evals.items():
        # unweighted even in the weighted run: Trainer's loss of each checkpoint's model on t
        assert logged == pytest.approx(_token_mean(_model(cfg, out / f"checkpoint-{step}"), t_rows), rel=1e-5)


def test_eval_over_several_domains_logs_each_domain(run_path, tmp_path):
    out = tmp_path / "out"
    cfg = load_config(run_path, [f"output_dir={out}", "eval_strategy=steps", "eval_steps=3", "max_steps=3",
                                 "eval_dataset=b,t", "per_device_eval_batch_size=4"])
    train(cfg)
    p = prepare(cfg, need_eval=True)
    sums, counts = _row_losses(_model(cfg, out), p.eval)
    domains = p.eval.domain_ids()
    per_row = sums / counts
    assert _evals(out, "eval_b_loss")[3] == pytest.approx(per_row[domains == 0].mean(), rel=1e-5)
    assert _evals(out, "eval_t_loss")[3] == pytest.approx(per_row[domains == 1].mean(), rel=1e-5)
    # eval_loss is Trainer's: each batch of 4 (in order) its token mean, batches weighted by their rows
    batches = [slice(i, i + 4) for i in range(0, len(sums), 4)]
    expect = sum(len(sums[b]) * sums[b].sum() / counts[b].sum() for b in batches) / len(sums)
    assert _evals(out)[3] == pytest.approx(expect, rel=1e-5)


def test_eval_batch_of_one_is_the_mean_row_loss_computed_in_larger_batches(run_path, tmp_path, monkeypatch):
    out = tmp_path / "out"
    cfg = load_config(run_path, [f"output_dir={out}", "eval_strategy=steps", "eval_steps=3", "max_steps=3",
                                 "eval_dataset=b,t", "per_device_eval_batch_size=1"])
    batch_rows = []
    forward = FlexfeedTrainer.compute_loss

    def counting(self, model, inputs, *args, **kwargs):
        if not model.training:
            batch_rows.append(int(inputs["input_ids"].shape[0]))
        return forward(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(FlexfeedTrainer, "compute_loss", counting)
    train(cfg)
    p = prepare(cfg, need_eval=True)
    sums, counts = _row_losses(_model(cfg, out), p.eval)
    # one row a batch, as asked: Trainer's eval_loss is the plain mean of each row's token-mean loss
    assert _evals(out)[3] == pytest.approx(float((sums / counts).mean()), rel=1e-5)
    assert len(sums) == 30 and batch_rows == [30]  # computed in one forward of 30 rows, not 30 forwards


def test_eval_on_each_dataset_evaluates_each_alone(run_path, tmp_path):
    out = tmp_path / "out"
    cfg = load_config(run_path, [f"output_dir={out}", "eval_strategy=steps", "eval_steps=2", "max_steps=2",
                                 "eval_dataset=b,t", "eval_on_each_dataset=true", "per_device_eval_batch_size=32"])
    train(cfg)
    assert _evals(out) == {}  # no overall eval_loss
    eval_data = prepare(cfg, need_eval=True).eval
    model = _model(cfg, out)
    for k, name in enumerate(["b", "t"]):
        part = eval_data.dataset.select(np.flatnonzero(eval_data.domain_ids() == k).tolist())
        expect = _token_mean(model, dataclasses.replace(eval_data, dataset=part))
        assert _evals(out, f"eval_{name}_loss")[2] == pytest.approx(expect, rel=1e-5)


def test_held_out_share_and_count():
    assert [num_held_out(0.25, 16), num_held_out(0.1, 16), num_held_out(3.0, 16)] == [4, 2, 3]  # 0.1: ceil(1.6)
    for bad in (16.0, 20.0, 0.99):  # every row (0.99 of 16 rounds up to 16): none left to train on
        with pytest.raises(FlexfeedError, match="holds out"):
            num_held_out(bad, 16)


def test_val_size_holds_rows_out_of_training_and_evaluates_them(run_path, tmp_path, seen_rows):
    out = tmp_path / "out"
    cfg = load_config(run_path, [f"output_dir={out}", "max_samples=8", "val_size=0.25", "eval_dataset=[]",
                                 "eval_strategy=steps", "eval_steps=2", "max_steps=4",
                                 "per_device_eval_batch_size=4"])
    cfg.training["learning_rate"] = 0.0  # the model stays as loaded (LoRA B is zero): a loss computable here
    p = prepare(cfg, need_eval=True)
    every = load_data(cfg.data, p.tokenizer).dataset["text"]
    assert len(every) == 16
    held, trained = set(p.eval.dataset["text"]), set(p.train.dataset["text"])
    assert len(held) == 4 and len(trained) == 12  # 0.25 of 16
    assert held | trained == set(every) and not held & trained
    assert p.target is None  # held-out rows are evaluated, not aimed at
    train(cfg, prepared=p)
    seen = {p.train.dataset[r]["text"] for batch in seen_rows for r in batch}
    assert seen and seen <= trained
    expect = _token_mean(_model(cfg), p.eval)
    assert _evals(out) == pytest.approx({2: expect, 4: expect}, rel=1e-5)


def test_val_split_is_seeded(run_path):
    cfg = load_config(run_path, ["max_samples=8", "eval_dataset=[]"])
    data = load_data(cfg.data, prepare(cfg, need_target=False).tokenizer)
    a, b, c = (split_validation(data, 0.25, seed) for seed in (1, 1, 2))
    assert a.kept.tolist() == b.kept.tolist() and a.train.fingerprint == b.train.fingerprint
    assert a.kept.tolist() != c.kept.tolist() and a.train.fingerprint != c.train.fingerprint
    assert a.train.fingerprint != data.fingerprint  # the training rows are another dataset: another store


@pytest.mark.parametrize(("learning_rate", "patience", "min_delta", "stop_step"), [
    (0.0, 2, None, 6),   # constant loss: eval 2 sets the best, 4 and 6 do not improve -> stop at 6
    (1e-3, 3, 100.0, 8),  # improvements all below min_delta: evals 4, 6, 8 count -> stop at 8
])
def test_early_stopping_stops_after_patience_evaluations_without_improvement(
        run_path, tmp_path, learning_rate, patience, min_delta, stop_step):
    out = tmp_path / "out"
    extra = [] if min_delta is None else [f"early_stopping_min_delta={min_delta}"]
    cfg = load_config(run_path, [f"output_dir={out}", "eval_strategy=steps", "eval_steps=2", "max_steps=20",
                                 "save_strategy=no", f"early_stopping_steps={patience}", *extra])
    cfg.training["learning_rate"] = learning_rate
    summary = train(cfg)
    assert summary["steps"] == stop_step
    assert sorted(_evals(out)) == list(range(2, stop_step + 1, 2))


def test_load_best_model_at_end_keeps_the_best_checkpoint(run_path, tmp_path):
    out = tmp_path / "out"
    # the best is the *highest* eval loss, so a run whose loss falls ends on an early checkpoint
    cfg = load_config(run_path, [f"output_dir={out}", "eval_strategy=steps", "eval_steps=2", "save_steps=2",
                                 "max_steps=6", "load_best_model_at_end=true", "metric_for_best_model=loss",
                                 "greater_is_better=true", "per_device_eval_batch_size=6"])
    train(cfg)
    evals = _evals(out)
    best = max(evals, key=evals.get)
    assert evals[best] > evals[6]  # not a vacuous check: the last state is not the best
    state = json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["best_model_checkpoint"].endswith(f"checkpoint-{best}")
    final = _token_mean(_model(cfg, out), prepare(cfg, need_eval=True).eval)
    assert final == pytest.approx(evals[best], rel=1e-5)


def test_target_dataset_is_the_target_and_eval_dataset_only_evaluated(run_path):
    routed = prepare(load_config(run_path, ["target_dataset=a", "eval_dataset=t"]), need_eval=True)
    assert routed.target.domain_names == ["a"] and routed.eval.domain_names == ["t"]
    assert routed.target_store is not None and routed.target_store.root.name == routed.target.fingerprint
    default = prepare(load_config(run_path), need_eval=True)
    assert default.target.domain_names == default.eval.domain_names == ["t"]


def test_evaluation_is_no_training_decision(run_path, tmp_path, monkeypatch):
    """A select run evaluated every step trains on the same rows, with the same losses and learning rates and
    the same decisions, as without evaluation; evaluation reads the eval rows in order, unweighted."""
    batches: list[tuple[bool, list[int]]] = []
    original = FlexfeedTrainer.compute_loss

    def recording(self, model, inputs, *args, **kwargs):
        batches.append((model.training, inputs["row_id"].tolist()))
        return original(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(FlexfeedTrainer, "compute_loss", recording)
    runs = {}
    for name, extra in (("plain", []), ("evaluated", ["eval_strategy=steps", "eval_steps=1"])):
        batches.clear()
        out = tmp_path / name
        cfg = load_config(run_path, [f"output_dir={out}", "train_type=select", "component=random", "warmup_step=2",
                                     "update_step=2", "max_steps=6", "logging_steps=1",
                                     "per_device_eval_batch_size=4", *extra])
        train(cfg)
        run = json.loads((out / "flexfeed_run.json").read_text())
        decisions = [json.loads(x) for x in (out / "flexfeed_decisions.jsonl").read_text().splitlines()]
        runs[name] = {
            "rows": [b for training, b in batches if training],
            "evaluated": [b for training, b in batches if not training],
            "train": [(h["step"], h["loss"], h["learning_rate"]) for h in run["log_history"] if "loss" in h],
            "decisions": [(d["step"], d["decision"], d["per_domain"]) for d in decisions],
        }
    plain, evaluated = runs["plain"], runs["evaluated"]
    assert evaluated["rows"] == plain["rows"] and evaluated["decisions"] == plain["decisions"]
    assert [(s, lr) for s, _, lr in evaluated["train"]] == [(s, lr) for s, _, lr in plain["train"]]
    np.testing.assert_allclose([x[1] for x in evaluated["train"]], [x[1] for x in plain["train"]], rtol=1e-6)
    assert plain["evaluated"] == [] and evaluated["evaluated"] == [[0, 1, 2, 3], [4, 5]] * 6


BASE = {"model_name_or_path": "m", "dataset": "a,b", "output_dir": "o"}


@pytest.mark.parametrize(("extra", "says"), [
    ({"eval_strategy": "steps"}, "no evaluation set"),
    ({"eval_strategy": "epoch", "target_dataset": "t"}, "no evaluation set"),
    ({"early_stopping_steps": 3}, "early_stopping_steps"),
    ({"early_stopping_steps": 3, "eval_dataset": "t"}, "early_stopping_steps"),
    ({"early_stopping_min_delta": 0.01}, "early_stopping_min_delta"),
    ({"load_best_model_at_end": True, "eval_dataset": "t"}, "load_best_model_at_end needs evaluation"),
    ({"load_best_model_at_end": True, "eval_dataset": "t", "eval_strategy": "steps", "save_strategy": "epoch"},
     "save_strategy to match"),
    ({"load_best_model_at_end": True, "eval_dataset": "t", "eval_strategy": "steps", "eval_steps": 4,
      "save_steps": 6}, "multiple of eval_steps"),
    ({"load_best_model_at_end": True, "val_size": 0.1, "eval_strategy": "steps", "logging_steps": 4,
      "save_steps": 10}, "multiple of eval_steps"),
    ({"eval_strategy": "steps", "eval_dataset": "t", "metric_for_best_model": "accuracy"}, "accuracy"),
    ({"eval_strategy": "steps", "eval_dataset": "t,u", "eval_on_each_dataset": True, "early_stopping_steps": 2},
     "eval_t_loss, eval_u_loss"),
    ({"val_size": 0.1, "eval_dataset": "t"}, "val_size"),
    ({"val_size": 2.5}, "val_size"),
    ({"val_size": -1}, "val_size"),
    ({"eval_on_each_dataset": True}, "eval_on_each_dataset"),
    ({"eval_on_start": True}, "eval_on_start"),
    ({"eval_strategy": "steps", "eval_dataset": "t,u", "eval_on_each_dataset": True,
      "lr_scheduler_type": "reduce_lr_on_plateau"}, "metric_for_best_model"),
])
def test_config_errors_are_one_line_at_load(tmp_path, extra, says):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({**BASE, **extra}))
    with pytest.raises(FlexfeedError) as info:
        load_config(path)
    assert says in str(info.value) and "\n" not in str(info.value) and info.value.hint
    assert str(path) in info.value.message


@pytest.mark.parametrize("extra", [
    {"eval_strategy": "steps", "val_size": 0.1, "load_best_model_at_end": True, "eval_steps": 5, "save_steps": 10},
    {"eval_strategy": "steps", "eval_dataset": "t", "save_strategy": "best", "load_best_model_at_end": True},
    {"eval_strategy": "steps", "eval_dataset": "t,u", "eval_on_each_dataset": True, "early_stopping_steps": 2,
     "metric_for_best_model": "u_loss"},
    {"eval_strategy": "steps", "eval_dataset": "t,u", "metric_for_best_model": "eval_t_loss"},
    {"eval_dataset": "t", "target_dataset": "a"},
])
def test_consistent_evaluation_configs_load(tmp_path, extra):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({**BASE, **extra}))
    load_config(path)


def test_cli_refuses_before_training_with_one_error_line(run_path, tmp_path):
    from click.testing import CliRunner

    from pipeline.cli import main

    result = CliRunner().invoke(main, ["train", str(run_path), f"output_dir={tmp_path / 'o'}", "eval_dataset=[]",
                                       "eval_strategy=steps"])
    assert result.exit_code == 2
    lines = [x for x in result.output.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "no evaluation set" in lines[0]
    assert not (tmp_path / "o").exists()



@pytest.mark.multiproc
def test_two_deepspeed_ranks_evaluate_every_row_once(run_path, tmp_path):
    """ZeRO-2 on two gloo ranks: 30 eval rows in batches of 4 per rank (the last one padded by accelerate);
    the per-domain losses are each row's loss counted once, as computed here from the checkpoint."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "ds"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                              "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONPATH=str(root))
    overrides = [f"output_dir={out}", "eval_dataset=b,t", "eval_strategy=steps", "eval_steps=2", "max_steps=2",
                 "save_steps=2", "per_device_train_batch_size=2", "per_device_eval_batch_size=4"]
    proc = subprocess.run([str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node=2",
                           "-m", "pipeline.cli", "train", str(run_path),
                           f"deepspeed={root / 'configs' / 'deepspeed' / 'ds_z2.json'}", *overrides],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cfg = load_config(run_path, overrides)
    p = prepare(cfg, need_eval=True)
    sums, counts = _row_losses(_model(cfg, out / "checkpoint-2"), p.eval)
    per_row, domains = sums / counts, p.eval.domain_ids()
    assert _evals(out, "eval_b_loss")[2] == pytest.approx(per_row[domains == 0].mean(), rel=1e-5)
    assert _evals(out, "eval_t_loss")[2] == pytest.approx(per_row[domains == 1].mean(), rel=1e-5)
