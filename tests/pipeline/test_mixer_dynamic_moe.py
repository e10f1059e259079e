"""dynamic_moe: expert counts from router logits, load profiles, the weight update on hand-made counts, held-out rows
that never train, and runs on a tiny random Qwen2-MoE alone and inside a plan."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipeline.strategies import MIXERS
from pipeline.strategies.context import InMemorySignals
from stages.moe import expert_counts, moe_layout
from store.errors import FlexfeedError


@pytest.fixture(scope="module")
def tiny_moe(tiny_checkpoint, tmp_path_factory):
    """A tiny random Qwen2-MoE (2 MoE layers, 4 experts, top-2) with the tiny Llama's tokenizer."""
    from transformers import AutoTokenizer, Qwen2MoeConfig, Qwen2MoeForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny_checkpoint)
    torch.manual_seed(0)
    cfg = Qwen2MoeConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                         shared_expert_intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, max_position_embeddings=128,
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    out = tmp_path_factory.mktemp("tiny_moe")
    Qwen2MoeForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_expert_counts_count_the_top_k_of_real_tokens_per_layer():
    # 2 rows x 3 positions (row-major), 3 experts, top-2; row 1's last position is padding
    layer0 = torch.tensor([[3., 2, 1], [1, 3, 2], [0, 1, 2],   # row 0: {0,1} {1,2} {1,2}
                           [5, 0, 4], [2, 9, 1], [7, 8, 9]])   # row 1: {0,2} {0,1}, padding
    layer1 = torch.tensor([[0., 2, 1], [0, 1, 3], [4, 0, 1],   # row 0: {1,2} {1,2} {0,2}
                           [1, 2, 3], [3, 2, 1], [9, 9, 0]])   # row 1: {1,2} {0,1}, padding
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    counts = expert_counts((layer0, layer1), mask, top_k=2).numpy()
    assert counts.tolist() == [[1, 3, 2, 1, 2, 3], [2, 1, 1, 1, 2, 1]]


def test_moe_layout_reads_mixtral_qwen2_moe_and_refuses_a_dense_model():
    assert moe_layout({"model_type": "mixtral", "num_hidden_layers": 4, "num_local_experts": 8,
                       "num_experts_per_tok": 2}) == (4, 8, 2)
    assert moe_layout({"model_type": "qwen2_moe", "num_hidden_layers": 6, "num_experts": 4, "num_experts_per_tok": 1,
                       "decoder_sparse_step": 2, "mlp_only_layers": [3]}) == (2, 4, 1)  # layers 1 and 5
    with pytest.raises(FlexfeedError, match="no mixture-of-experts router"):
        moe_layout({"model_type": "llama", "num_hidden_layers": 2})


def test_the_gate_load_stage_counts_each_real_token_top_k_times_per_layer(tiny_moe):
    from stages.args import ModelArgs
    from stages.gate_load import GateLoadStage

    stage = GateLoadStage(ModelArgs(model_name_or_path=str(tiny_moe)), batch_size=3)
    assert stage.signal().dim == 2 * 4
    ids = [[5, 9, 14, 3, 22, 7], [8, 4], [30, 31, 32, 33]]
    batched = stage.compute({"input_ids": ids})
    assert batched.reshape(3, 2, 4).sum(-1).tolist() == [[12, 12], [4, 4], [8, 8]]  # 2 experts x real tokens
    alone = np.concatenate([stage.compute({"input_ids": [r]}) for r in ids])
    np.testing.assert_array_equal(batched, alone)  # padding routes nothing and changes nothing


@pytest.mark.parametrize("family", ["mixtral", "olmoe", "qwen2_moe"])
def test_mixtral_olmoe_and_qwen2_moe_router_logits_are_counted_alike(family):
    import transformers

    cls, experts = {"mixtral": ("Mixtral", "num_local_experts"), "olmoe": ("Olmoe", "num_experts"),
                    "qwen2_moe": ("Qwen2Moe", "num_experts")}[family]
    config = getattr(transformers, f"{cls}Config")(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, num_experts_per_tok=2, **{experts: 4})
    torch.manual_seed(0)
    model = getattr(transformers, f"{cls}ForCausalLM")(config).eval()
    ids, mask = torch.randint(0, 64, (2, 5)), torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, output_router_logits=True).router_logits
    layers, num_experts, top_k = moe_layout(config.to_dict())
    counts = expert_counts(logits, mask, top_k).numpy().reshape(2, layers, num_experts)
    assert (layers, num_experts, top_k) == (2, 4, 2) and counts.sum(-1).tolist() == [[10, 10], [6, 6]]


def by_hand_update(w, profiles, eta, c):
    d = len(w)
    delta = np.array([np.mean([np.sqrt(np.sum((profiles[i] - profiles[j]) ** 2)) for j in range(d)])
                      for i in range(d)])
    z = np.exp(np.log(w) + eta * delta)
    return (1 - c) * z / z.sum() + c / d


def test_proportions_follow_algorithm_1_on_hand_made_loads(make_ctx):
    # one layer, two experts; every row of a domain routes alike, so whichever rows are held out:
    # d0 splits its tokens evenly, d1 and d2 send all to expert 0 (redundant with each other)
    per_domain = np.array([[2.0, 2.0], [3.0, 0.0], [1.0, 0.0]])
    domains = np.arange(30) % 3
    signals = InMemorySignals(train={"gate_load": per_domain[domains]})
    mixer = MIXERS.build("dynamic_moe", {"eta": 2.0, "c": 0.1, "eval_rows": 4}, seed=3)
    ctx = make_ctx(30, signals=signals, domain_ids=domains, num_domains=3)
    first = mixer.proportions(ctx)
    # O = [.5,.5], [1,0], [1,0]; Delta = [2 x 0.7071 / 3, 0.7071 / 3, 0.7071 / 3]
    profiles = np.array([[0.5, 0.5], [1.0, 0.0], [1.0, 0.0]])
    expected = by_hand_update(np.full(3, 1 / 3), profiles, 2.0, 0.1)
    np.testing.assert_allclose(first, expected, rtol=1e-12)
    assert first[0] > first[1] == pytest.approx(first[2])
    np.testing.assert_allclose(mixer.proportions(ctx), by_hand_update(expected, profiles, 2.0, 0.1), rtol=1e-12)
    asked = signals.rows_read[-1][2]
    assert asked.size == 12 and np.bincount(domains[asked]).tolist() == [4, 4, 4]  # only the held-out rows
    resumed = MIXERS.build("dynamic_moe", {"eta": 2.0, "c": 0.1, "eval_rows": 4}, seed=3)
    resumed.load_state_dict(mixer.state_dict())
    np.testing.assert_allclose(resumed.proportions(ctx), mixer.proportions(ctx))


def test_held_out_rows_are_seeded_capped_at_half_and_a_one_row_domain_is_refused():
    domains = np.array([0] * 10 + [1] * 3)
    mixer = MIXERS.build("dynamic_moe", {"eval_rows": 4}, seed=1)
    rows = mixer.held_out_rows(domains, 2)
    assert np.bincount(domains[rows]).tolist() == [4, 1]
    assert np.array_equal(rows, MIXERS.build("dynamic_moe", {"eval_rows": 4}, seed=1).held_out_rows(domains, 2))
    others = {tuple(MIXERS.build("dynamic_moe", {"eval_rows": 4}, seed=s).held_out_rows(domains, 2)) for s in range(8)}
    assert len(others) > 1
    with pytest.raises(FlexfeedError, match="at least 2"):
        mixer.held_out_rows(np.array([0, 0, 1]), 2)


def _moe_cfg(tiny_moe, tmp_path, extra):
    from pipeline.config import load_config
    from tests.helpers.run_fixtures import make_run_dir

    return load_config(make_run_dir(tmp_path, tiny_moe), [f"output_dir={tmp_path / 'out'}", "warmup_step=4",
                                                          "update_step=4", *extra])


def _moe_cfg_again(path, out, extra):
    from pipeline.config import load_config

    return load_config(path, [f"output_dir={out}", "warmup_step=4", "update_step=4", "train_type=mix",
                                    "component=dynamic_moe", "component_args.eval_rows=6", "component_args.eta=50",
                                    *extra])


def test_a_mix_run_on_a_tiny_moe_never_trains_on_its_held_out_rows(tiny_moe, tmp_path, seen_rows):
    from pipeline.train import train

    cfg = _moe_cfg(tiny_moe, tmp_path, ["train_type=mix", "component=dynamic_moe",
                                        "component_args.eval_rows=6", "component_args.eta=50"])
    summary = train(cfg)
    decisions = [json.loads(x) for x in (tmp_path / "out" / "flexfeed_decisions.jsonl").read_text().splitlines()]
    fired = [d for d in decisions if d["decision"]]
    assert [d["step"] for d in fired] == [4, 8]
    assert all(d["dynamic_moe"]["measured_rows"] == {"a": 6, "b": 6} for d in fired)
    held = MIXERS.build("dynamic_moe", {"eval_rows": 6}, seed=cfg.training["seed"]).held_out_rows(
        np.array([0] * 40 + [1] * 24), 2)
    trained = {r for batch in seen_rows for r in batch}
    assert len(trained) > 30 and not trained & set(held.tolist())
    # a's own evaluation set (a_eval): only b's rows are held out, a is measured on 6 of a_eval's 8 rows
    data = tmp_path / "data"
    (data / "a_eval.json").write_text(json.dumps([{"instruction": f"add {i} and {i + 3}", "input": "",
                                                   "output": f"{2 * i + 3}"} for i in range(8)]))
    info = json.loads((data / "dataset_info.json").read_text())
    (data / "dataset_info.json").write_text(json.dumps({**info, "a_eval": {"file_name": "a_eval.json"}}))
    seen_rows.clear()
    cfg = _moe_cfg_again(tmp_path / "cfg.yaml", tmp_path / "own", ["mixer_eval_dataset=a_eval"])
    train(cfg)
    decisions = [json.loads(x) for x in (tmp_path / "own" / "flexfeed_decisions.jsonl").read_text().splitlines()]
    assert [d["dynamic_moe"]["measured_rows"] for d in decisions if d["decision"]] == [{"a": 6, "b": 6}] * 2
    held_b = held[held >= 40]
    trained = {r for batch in seen_rows for r in batch}
    assert not trained & set(held_b.tolist()) and trained & set(held[held < 40].tolist())
    # three datasets, the model held still (learning rate 1e-12): Delta is what the gate_load stage gives for the
    # held-out rows, computed here apart from the run, and each decision moves the proportions by Algorithm 1
    cfg = _moe_cfg_again(tmp_path / "cfg.yaml", tmp_path / "three", ["dataset=a,b,t", "component_args.c=0.1",
                                                                    "learning_rate=1e-12"])
    train(cfg)
    from pipeline.prepared import prepare
    from stages.gate_load import GateLoadStage

    p = prepare(cfg, need_target=False)
    domains = p.train.domain_ids()
    rows = MIXERS.build("dynamic_moe", {"eval_rows": 6}, seed=cfg.training["seed"]).held_out_rows(domains, 3)
    counts = GateLoadStage(cfg.model).compute({"input_ids": [p.train.dataset[int(r)]["input_ids"] for r in rows]})
    profiles = [counts[domains[rows] == k].sum(0) / counts[domains[rows] == k].sum() for k in range(3)]
    by_hand = [np.mean([np.linalg.norm(profiles[i] - profiles[j]) for j in range(3)]) for i in range(3)]
    decisions = [json.loads(x) for x in (tmp_path / "three" / "flexfeed_decisions.jsonl").read_text().splitlines()]
    w = np.full(3, 1 / 3)
    for d in (d for d in decisions if d["decision"]):
        delta = np.array([d["dynamic_moe"]["delta"][n] for n in "abt"])
        np.testing.assert_allclose(delta, by_hand, rtol=1e-5)
        z = np.exp(np.log(w) + 50 * delta)
        w = 0.9 * z / z.sum() + 0.1 / 3
        np.testing.assert_allclose([d["proportions"][n] for n in "abt"], w, rtol=1e-9)
    assert np.ptp(w) > 0.05
    # two domains: Delta is the same for both, so the weights stay at the initial mixture
    assert summary["final_weights"] == pytest.approx({"a": 0.5, "b": 0.5})


def test_dynamic_moe_inside_a_plan_and_refused_on_a_dense_model(tiny_moe, tiny_checkpoint, tmp_path):
    from pipeline.config import load_config
    from pipeline.train import train
    from tests.helpers.run_fixtures import make_run_dir

    plan = ("plan=[{family: select, component: random, mode: filter, keep_ratio: 0.8}, {family: mix, component: "
            "dynamic_moe, component_args: {eval_rows: 4}}, {family: weight, component: loss}]")
    cfg = _moe_cfg(tiny_moe, tmp_path / "plan", ["train_type=plan", plan])
    train(cfg)
    decisions = [json.loads(x) for x in (tmp_path / "plan" / "out" / "flexfeed_decisions.jsonl").read_text().splitlines()]
    assert [d["dynamic_moe"]["measured_rows"] for d in decisions if d["decision"]] == [{"a": 4, "b": 4}] * 2
    dense = make_run_dir(tmp_path / "dense", tiny_checkpoint)
    with pytest.raises(FlexfeedError, match="no mixture-of-experts router"):
        load_config(dense, ["train_type=mix", "component=dynamic_moe"])  # at load, not after a silent uniform run


def test_a_domain_with_its_own_mixer_evaluation_set_is_measured_there(make_ctx):
    """Domain 1 has rows of its own (mixer_eval): none of its training rows are held out, its profile is theirs."""
    domains = np.arange(30) % 3
    per_domain = np.array([[1.0, 3.0], [0.0, 4.0], [4.0, 0.0]])  # d1's training rows ([0, 4]) must not be read
    signals = InMemorySignals(train={"gate_load": per_domain[domains]},
                              variants={("gate_load", "mixer_eval"): [({}, np.array([[4.0, 0.0]] * 5))]})
    mixer = MIXERS.build("dynamic_moe", {"eta": 1.0, "c": 0.05, "eval_rows": 3}, seed=0)
    mixer.eval_domains = np.ones(5, dtype=np.int64)
    held = mixer.held_out_rows(domains, 3)
    assert held.size == 6 and sorted(set(domains[held])) == [0, 2]
    w = mixer.proportions(make_ctx(30, signals=signals, domain_ids=domains, num_domains=3))
    assert [(name, split, rows.size) for name, split, rows in signals.rows_read] == [
        ("gate_load", "train", 6), ("gate_load", "mixer_eval", 3)]
    profiles = np.array([[0.25, 0.75], [1.0, 0.0], [1.0, 0.0]])
    np.testing.assert_allclose(w, by_hand_update(np.full(3, 1 / 3), profiles, 1.0, 0.05), rtol=1e-12)


def test_mixer_eval_dataset_names_must_measure_a_training_dataset():
    from pipeline.mixer_eval import measured_dataset

    assert measured_dataset("b_eval", ["a", "b"]) == 1 and measured_dataset("a_eval", ["a", "b"]) == 0
    for name in ("c_eval", "a"):  # no such training dataset; a training dataset itself (its rows are trained on)
        with pytest.raises(FlexfeedError, match="measures no training dataset"):
            measured_dataset(name, ["a", "b"])
