"""NICE: policy-gradient target features against plain backward passes, fallback, rewards, selector, training."""

from __future__ import annotations

import importlib
import json

import numpy as np
import pytest
import torch

from pipeline.strategies import SELECTORS
from stages.args import GradsArgs, ModelArgs
from stages.base import bind_live_model
from stages.grads.nice import NiceTargetStage, row_seed, split_row
from stages.grads.rewards import exact_match, load_reward, token_f1
from store.errors import FlexfeedError

HERE = "tests.stages.test_nice"
CALLS: list[tuple] = []

# prompt tokens masked, answer trained, the second row's answer ends with </s> (id 2)
ROWS = {
    "input_ids": [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14, 15, 2], [20, 21, 22, 23, 24, 25]],
    "labels": [[-100, -100, -100, 8, 9, 10, 11], [-100, -100, 14, 15, 2], [-100, -100, -100, -100, 24, 25]],
}


def even_share(prompt_ids, completion_ids, reference_ids):
    """A reward that varies between random completions: the share of even token ids."""
    return sum(t % 2 == 0 for t in completion_ids) / max(1, len(completion_ids))


def constant(prompt_ids, completion_ids, reference_ids):
    return 0.5


def recording(prompt_ids, completion_ids, reference_ids):
    importlib.import_module(HERE).CALLS.append((prompt_ids, completion_ids, reference_ids))
    return float(len(CALLS) % 3)


def _args(**kw) -> GradsArgs:
    base = dict(proj_dim=64, grad_type="sgd", batch_size=4, nice_num_samples=3, nice_max_new_tokens=6,
                nice_reward=f"{HERE}:even_share")
    return GradsArgs(**{**base, **kw})


@pytest.fixture(scope="module")
def model_args(tiny_checkpoint) -> ModelArgs:
    return ModelArgs(model_name_or_path=str(tiny_checkpoint), lora_rank=4, attn_implementation="eager")


@pytest.fixture(scope="module")
def stage(model_args) -> NiceTargetStage:
    """A loaded stage whose LoRA weights are all non-zero (so both A and B get gradients)."""
    st = NiceTargetStage(model_args, _args())
    st.setup()
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in st._model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return st


def _like(stage, args: GradsArgs) -> NiceTargetStage:
    """Another stage computing with `stage`'s (perturbed) model."""
    from stages.models import load_tokenizer

    other = NiceTargetStage(stage.model_args, args)
    return bind_live_model(other, stage._model, load_tokenizer(stage.model_args))


def test_rewards_default_and_loading():
    assert token_f1([], [1, 2, 3], [1, 2, 3]) == 1.0
    assert token_f1([], [1, 2, 4, 4], [1, 4, 5]) == pytest.approx(2 * (2 / 4) * (2 / 3) / (2 / 4 + 2 / 3))
    assert token_f1([], [7], [8]) == 0.0 and token_f1([], [], []) == 1.0 and token_f1([], [], [1]) == 0.0
    assert exact_match([], [1, 2], [1, 2]) == 1.0
    assert load_reward("stages.grads.rewards:token_f1") is token_f1
    for bad, word in [("no_colon", "import path"), ("no_such_module_xyz:f", "cannot import"),
                      ("stages.grads.rewards:nope", "has no"), ("stages.grads.rewards:DEFAULT_REWARD", "callable")]:
        with pytest.raises(FlexfeedError, match=word):
            load_reward(bad)


def test_split_row_and_bad_arguments(model_args):
    assert split_row(ROWS["input_ids"][1], ROWS["labels"][1], 1) == ([12, 13], [14, 15, 2])
    with pytest.raises(FlexfeedError, match="no prompt"):
        split_row([4, 5], [4, 5], 0)
    for kw, word in [({"nice_num_samples": 0}, "nice_num_samples"), ({"nice_temperature": 0.0}, "temperature"),
                     ({"nice_max_new_tokens": 0}, "max_new_tokens"), ({"nice_reward": "x.y"}, "import path")]:
        with pytest.raises(FlexfeedError, match=word):
            NiceTargetStage(model_args, _args(**kw))


def test_spec_names_everything_that_sets_the_values(model_args):
    desc = NiceTargetStage(model_args, _args()).signal()
    assert desc.name == "grads_nice" and desc.dim == 64
    spec = desc.spec
    assert spec["model"]["weights"] and spec["grad_type"] == "sgd" and spec["code_version"] == "grads-nice-2"
    assert spec["nice"] == {"num_samples": 3, "temperature": 1.0, "max_new_tokens": 6, "max_prompt_tokens": None,
                            "reward": f"{HERE}:even_share", "sampling": "plain", "log_prob": "sum",
                            "baseline": "leave_one_out", "tied": "zero"}
    keys = {json.dumps(spec, sort_keys=True)}
    for kw in [{"nice_num_samples": 4}, {"nice_temperature": 0.7}, {"nice_max_new_tokens": 5},
               {"nice_reward": f"{HERE}:constant"}, {"seed": 1}, {"proj_dim": 32}, {"proj_type": "gaussian"},
               {"nice_max_prompt_tokens": 2}]:
        keys.add(json.dumps(NiceTargetStage(model_args, _args(**kw)).signal().spec, sort_keys=True))
    assert len(keys) == 9


def test_feature_is_the_projected_policy_gradient_of_plain_backward_passes(stage):
    feats = stage.compute(ROWS)
    rolls = stage.rollouts(ROWS)
    model, projector = stage._model, stage._projector
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    model.eval()
    for i, roll in enumerate(rolls):
        r = np.asarray(roll["rewards"])
        assert r.std() > 0, "the test reward must vary"
        assert all(len(c) == 6 or c[-1] == 2 for c in roll["completions"])
        total = torch.zeros(64, dtype=torch.float64)
        for c, reward in zip(roll["completions"], r):
            model.zero_grad(set_to_none=True)
            ids = torch.tensor([roll["prompt"] + c])
            labels = torch.tensor([[-100] * len(roll["prompt"]) + c])
            # the summed loss of the completion's tokens: minus its log-probability
            (model(input_ids=ids, labels=labels).loss * len(c)).backward()
            # the projection of the full (flattened) gradient is the sum of its per-weight projections
            g = sum(projector.project(n, p.grad.detach()[None])[0] for n, p in params)
            baseline = (r.sum() - reward) / (len(r) - 1)
            total += (reward - baseline) / len(r) * g.double()
        model.zero_grad(set_to_none=True)
        expected = (total / total.norm()).float().numpy()
        np.testing.assert_allclose(feats[i], expected, atol=1e-4)


def test_same_seed_same_features_other_seed_other_samples(stage):
    a, b = stage.compute(ROWS), _like(stage, _args()).compute(ROWS)
    np.testing.assert_array_equal(a, b)
    # a row's completions do not depend on the other rows of its shard
    np.testing.assert_allclose(_like(stage, _args()).compute({k: v[1:2] for k, v in ROWS.items()})[0], a[1], atol=1e-6)
    other = _like(stage, _args(seed=1))
    assert [r["completions"] for r in other.rollouts(ROWS)] != [r["completions"] for r in stage.rollouts(ROWS)]
    assert not np.allclose(other.compute(ROWS), a, atol=1e-3)
    assert row_seed(0, [1, 2], [3]) == row_seed(0, [1, 2], [3]) != row_seed(1, [1, 2], [3])
    state = torch.random.get_rng_state()
    stage.rollouts(ROWS)
    assert torch.equal(state, torch.random.get_rng_state()), "sampling must leave the global RNG alone"


def test_equal_rewards_give_a_zero_feature_counted_and_logged(stage, caplog):
    nice = _like(stage, _args(nice_reward=f"{HERE}:constant"))
    with caplog.at_level("WARNING", logger="stages.grads.nice"):
        feats = nice.compute(ROWS)
    assert (nice.tied_rows, nice.rows_seen) == (3, 3)
    assert not feats.any(), "tied rows carry no policy direction: zero, not the SGD feature of the reference"
    assert "3 of 3 target rows have tied rewards" in caplog.text


def test_custom_reward_gets_prompt_completion_and_reference_without_eos(stage):
    CALLS.clear()
    mod = importlib.import_module(HERE)
    mod.CALLS.clear()
    _like(stage, _args(nice_reward=f"{HERE}:recording")).rollouts(ROWS)
    calls = mod.CALLS
    assert len(calls) == 3 * 3
    assert [c[0] for c in calls[:3]] == [[5, 6, 7]] * 3 and calls[0][2] == [8, 9, 10, 11]
    assert calls[3][0] == [12, 13] and calls[3][2] == [14, 15]  # </s> stripped from the reference
    assert all(2 not in c[1] and 1 <= len(c[1]) <= 6 or c[1] == [] for c in calls)


# selector ----------------------------------------------------------------------------------------

def test_selector_picks_rows_aligned_with_the_policy_gradient_target(make_ctx):
    sel = SELECTORS.build("nice")
    assert [(nd.name, nd.split) for nd in sel.needs()] == [("grads", "train"), ("grads_nice", "target")]
    e = np.eye(4, dtype=np.float32)
    train = np.stack([e[1], e[0] + 0.1 * e[2], e[3], 2 * e[0], -e[0], e[1] + e[2]])
    nice_target = np.stack([e[0], e[0] + 0.2 * e[3], e[2]])
    sgd_target = np.stack([e[1], e[1], e[1]])  # LESS's targets point elsewhere: nice must not read them
    tasks = np.array([0, 0, 1])
    ctx = make_ctx(len(train), train={"grads": train}, target={"grads_nice": nice_target, "grads_sgd": sgd_target},
                   domain_names=["a", "b"], target_domain_ids=tasks)
    out = sel.select(ctx, 2)
    assert sorted(out.indices.tolist()) == [1, 3]
    # independent score: mean cosine within each task, max over tasks
    unit = train / np.linalg.norm(train, axis=1, keepdims=True)
    tu = nice_target / np.linalg.norm(nice_target, axis=1, keepdims=True)
    expected = np.maximum((unit @ tu[:2].T).mean(axis=1), unit @ tu[2])
    np.testing.assert_allclose(out.scores, expected, atol=1e-6)
    assert out.info["score_max"] == pytest.approx(expected.max(), abs=1e-6)
    with pytest.raises(FlexfeedError, match="grads_nice"):
        sel.select(make_ctx(6, train={"grads": train}, domain_names=["a"]), 2)


# end to end --------------------------------------------------------------------------------------

def test_nice_trains_end_to_end_and_logs_decisions(tiny_checkpoint, tmp_path):
    from pipeline.config import load_config
    from pipeline.prepared import prepare
    from pipeline.stage_job import run_stage_job
    from pipeline.train import train
    from tests.helpers.run_fixtures import make_run_dir

    path = make_run_dir(tmp_path / "run", tiny_checkpoint)
    cfg = load_config(path, [f"output_dir={tmp_path / 'out'}", "train_type=select", "component=nice",
                             "warmup_step=4", "update_step=4", "grads.nice_max_new_tokens=4"])
    run_stage_job(cfg, "grads", progress=False)
    summary = train(cfg)
    assert summary["steps"] == 12
    lines = (tmp_path / "out" / "flexfeed_decisions.jsonl").read_text().splitlines()
    decisions = [d for d in map(json.loads, lines) if d["decision"]]
    assert [d["step"] for d in decisions] == [4, 8]
    assert all(sum(d["per_domain"].values()) == 16 for d in decisions)
    # the grads stage computed the target policy gradients offline: the decisions read them as stored
    assert [[v["source"] for v in d["signals"]["grads_nice/target"]] for d in decisions] == [["offline"]] * 2
    assert all("refresh" not in d and "offline_filled" not in d for d in decisions)
    sigs = [s for s in prepare(cfg).target_store.signals() if s.name == "grads_nice"]
    assert sigs and all(s.meta.spec["nice"]["max_new_tokens"] == 4 and s.is_complete() for s in sigs)


def test_nice_target_features_missing_offline_are_computed_by_the_offline_stage_at_the_first_decision(tiny_checkpoint, tmp_path):
    from pipeline.config import load_config
    from pipeline.train import train
    from tests.helpers.run_fixtures import make_run_dir

    path = make_run_dir(tmp_path / "run", tiny_checkpoint)
    cfg = load_config(path, [f"output_dir={tmp_path / 'out'}", "train_type=select", "component=nice",
                             "warmup_step=4", "update_step=4", "grads.nice_max_new_tokens=4", "max_steps=8"])
    train(cfg)
    lines = (tmp_path / "out" / "flexfeed_decisions.jsonl").read_text().splitlines()
    decisions = [d for d in map(json.loads, lines) if d["decision"]]
    # refresh off: the offline stages (the model as loaded) compute the missing shards, not a refresh
    # (the fixture's train gradients are sgd ones, so their signal is named grads_sgd)
    assert decisions[0]["offline_filled"] == {"grads_nice": 1, "grads_sgd": 4}
    assert [v["source"] for v in decisions[0]["signals"]["grads_nice/target"]] == ["offline"]
