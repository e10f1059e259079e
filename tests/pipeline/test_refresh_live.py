"""A refresh computes the method's own signal at the live training state; offline routes stay offline.

Oracles are independent of the code under test: per-sample gradients from a batch-size-1 loop of
`loss.backward()`, Adam moments read straight from the Trainer's torch optimizer, LESS's update
formula written out, and the offline stage run separately into its own store.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipeline.config import load_config
from pipeline.prepared import prepare
from pipeline.stage_job import run_stage_job
from pipeline.train import train
from stages.grads.stage import GradsStage
from store.errors import FlexfeedError

PROJ_DIM = 64


@pytest.fixture(scope="module")
def checkpoints(run_cfg):
    """Three LoRA Trainer checkpoints with AdamW state (steps 2, 4, 6) of a short static run."""
    path, root = run_cfg
    out = root / "warm"
    train(load_config(path, [f"output_dir={out}", "train_type=static", "max_steps=6", "save_steps=2"]))
    ckpts = [out / f"checkpoint-{s}" for s in (2, 4, 6)]
    assert all((c / "optimizer.pt").is_file() for c in ckpts)
    return ckpts


def _decisions(out):
    return [json.loads(x) for x in (out / "flexfeed_decisions.jsonl").read_text().splitlines()]


def _oracle_features(model, optimizer, rows, projector):
    """LESS's Adam update of each row's own gradient (loop), projected weight by weight, L2-normalised."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    group = optimizer.param_groups[0]
    (b1, b2), eps = group["betas"], group["eps"]
    saved = [None if p.grad is None else p.grad.clone() for _, p in params]
    was = model.training
    model.eval()
    out = torch.zeros(len(rows["input_ids"]), PROJ_DIM)
    for i, (ids, lab) in enumerate(zip(rows["input_ids"], rows["labels"])):
        model.zero_grad(set_to_none=True)
        with torch.enable_grad():
            model(input_ids=torch.tensor([ids]), labels=torch.tensor([lab])).loss.backward()
        for name, p in params:
            st = optimizer.state.get(p, {})
            m = st.get("exp_avg", torch.zeros_like(p)).float()
            v = st.get("exp_avg_sq", torch.zeros_like(p)).float()
            g = p.grad.float()
            update = (b1 * m + (1 - b1) * g) / torch.sqrt(b2 * v + (1 - b2) * g**2 + eps)
            out[i] += projector.project(name, update[None])[0]
    for (_, p), g in zip(params, saved):
        p.grad = g
    model.train(was)
    return torch.nn.functional.normalize(out, dim=1).numpy()


def test_live_adam_refresh_equals_the_features_at_the_live_state(run_cfg, tmp_path, monkeypatch):
    """Each refreshed shard = the live model's per-sample gradients under the live optimizer's moments."""
    import pipeline.decision_context as contexts_mod
    from pipeline.refresh import Refresher
    from stages.grads.features import build_projector

    path, _ = run_cfg
    cfg = load_config(path, [f"output_dir={tmp_path}", "train_type=select", "component=less", "warmup_step=4",
                             "update_step=4", "max_steps=10", "refresh.max_staleness=0", "grads.grad_type=adam",
                             "grads.dtype=float32", f"grads.proj_dim={PROJ_DIM}", f"store={tmp_path / 'store'}"])
    seen = {}
    make_state = contexts_mod.live_state_of

    def capture(trainer, model):
        seen["trainer"] = trainer
        return make_state(trainer, model)

    monkeypatch.setattr(contexts_mod, "live_state_of", capture)
    original = Refresher._recompute
    errors, lrs = [], []

    def checked(self, stage, data, sig, shards, step, state):
        original(self, stage, data, sig, shards, step, state)
        if sig.name != "grads":
            return
        trainer = seen["trainer"]
        optimizer = trainer.optimizer.optimizer  # the torch AdamW under accelerate's wrapper
        assert optimizer.state, "the optimizer has stepped before the first decision"
        projector = build_projector(self.model, PROJ_DIM, seed=cfg.grads.seed)
        for shard in shards:
            expect = _oracle_features(self.model, optimizer, data.rows(*sig.shard_range(shard)), projector)
            errors.append(float(np.abs(sig.read_shard(shard) - expect).max()))
        lrs.append((state["adam_state"].lr, trainer.lr_scheduler.get_last_lr()[0]))

    monkeypatch.setattr(Refresher, "_recompute", checked)
    train(cfg)
    assert len(errors) == 2 * 4  # decisions at steps 4 and 8, 4 shards each
    assert max(errors) < 1e-4
    assert all(a == pytest.approx(b) for a, b in lrs)
    read = [d["signals"]["grads/train"] for d in _decisions(tmp_path) if d["decision"]]
    assert [[(v["source"], v["versions"]) for v in r] for r in read] == [[("live", [4, 4])], [("live", [8, 8])]]


def test_less_with_refresh_does_one_gradient_pass_per_decision(run_cfg, checkpoints, tmp_path, monkeypatch):
    """Three checkpoints configured, refresh on: one live variant, one pass over the train rows per decision."""
    path, _ = run_cfg
    calls = []
    original = GradsStage.compute

    def counting(self, rows):
        calls.append((self.live, self.checkpoint, len(rows["input_ids"])))
        return original(self, rows)

    monkeypatch.setattr(GradsStage, "compute", counting)
    cfg = load_config(path, [f"output_dir={tmp_path}", "train_type=select", "component=less", "warmup_step=4",
                             "update_step=4", "refresh.max_staleness=0", "grads.grad_type=adam",
                             f"grads.checkpoints=[{','.join(map(str, checkpoints))}]", f"store={tmp_path / 'store'}"])
    train(cfg)
    # 64 train rows and 6 target rows per decision, two decisions, never a checkpoint model
    assert all(live and ckpt is None for live, ckpt, _ in calls)
    assert sum(n for *_, n in calls) == 2 * (64 + 6)
    read = [d["signals"]["grads/train"] for d in _decisions(tmp_path) if d["decision"]]
    assert [len(r) for r in read] == [1, 1]


def test_refresh_off_reads_the_checkpoint_ensemble_and_fills_it_offline(run_cfg, checkpoints, tmp_path,
                                                                         monkeypatch):
    """Missing shards with refresh off are the configured checkpoints' features, never the live model's."""
    path, _ = run_cfg
    calls = []
    original = GradsStage.compute

    def counting(self, rows):
        calls.append((self.live, self.checkpoint))
        return original(self, rows)

    monkeypatch.setattr(GradsStage, "compute", counting)
    overrides = ["train_type=select", "component=less", "warmup_step=4", "update_step=4", "grads.grad_type=adam",
                 f"grads.checkpoints=[{','.join(map(str, checkpoints))}]"]
    cfg = load_config(path, [f"output_dir={tmp_path / 'run'}", *overrides, f"store={tmp_path / 'store'}"])
    train(cfg)
    assert calls and not any(live for live, _ in calls)
    assert {c for _, c in calls} == {str(c) for c in checkpoints}
    read = [d["signals"]["grads/train"] for d in _decisions(tmp_path / "run") if d["decision"]]
    assert [len(r) for r in read] == [3, 3] and all(v["source"] == "offline" for r in read for v in r)
    # the same signals computed by the offline stages alone, in a store of their own
    ref_cfg = load_config(path, [*overrides, f"store={tmp_path / 'ref_store'}"])
    run_stage_job(ref_cfg, "grads", progress=False)
    p, ref = prepare(cfg), prepare(ref_cfg)
    for sig in p.train_store.find("grads"):
        twin = ref.train_store.get(sig.key)
        np.testing.assert_array_equal(sig.read_all(), twin.read_all())


def test_delta_loss_reads_fresh_losses_by_default(run_cfg, tmp_path, monkeypatch):
    """Default settings: the loss is recomputed at every decision, so the second one ranks real changes."""
    from pipeline.strategies.selectors.delta_loss import DeltaLossSelector

    seen = []
    original = DeltaLossSelector.select

    def recording(self, ctx, num_samples):
        res = original(self, ctx, num_samples)
        seen.append((np.array(ctx.signals.get("loss", "train"), dtype=np.float64), res.indices.copy(),
                     res.info["num_top"]))
        return res

    monkeypatch.setattr(DeltaLossSelector, "select", recording)
    path, _ = run_cfg
    cfg = load_config(path, [f"output_dir={tmp_path}", "train_type=select", "component=delta_loss", "warmup_step=4",
                             "update_step=4", "max_steps=12", "learning_rate=1.0e-2"])
    train(cfg)
    decided = [d for d in _decisions(tmp_path) if d["decision"]]
    assert [d["refresh"]["loss/train"]["stale"] for d in decided] == [4, 4]
    assert [d["signals"]["loss/train"][0]["versions"] for d in decided] == [[4, 4], [8, 8]]
    assert decided[0]["info"]["first_decision"] and not decided[1]["info"]["first_decision"]
    assert decided[1]["info"]["score_std"] > 0  # losses moved between the decisions
    (first, _, _), (now, picked, num_top) = seen
    drops = first - now
    assert num_top == round(0.8 * 16) and np.unique(drops[picked[:num_top]]).size > 1
    # the top part is exactly the rows with the largest drops (numpy's own ordering), not the lowest ids
    expect = np.sort(drops)[::-1][:num_top]
    np.testing.assert_allclose(np.sort(drops[picked[:num_top]])[::-1], expect)
    assert sorted(picked[:num_top]) != list(range(num_top))


@pytest.mark.parametrize("overrides,words", [
    (["refresh.enabled=false"], "never refreshes it"),
    (["refresh.signals=[grads]"], "never refreshes it"),
    (["refresh.max_staleness=4"], "max_staleness (4) >= update_step (4)"),
])
@pytest.mark.parametrize("component", ["delta_loss", "loss"])
def test_configs_that_rank_unchanged_losses_are_refused_before_training(run_cfg, tmp_path, component, overrides,
                                                                        words):
    path, _ = run_cfg
    cfg = load_config(path, [f"output_dir={tmp_path / 'out'}", "train_type=select", f"component={component}",
                             "warmup_step=4", "update_step=4", *overrides])
    with pytest.raises(FlexfeedError, match=words.replace("(", r"\(").replace(")", r"\)")):
        train(cfg)
    assert not (tmp_path / "out" / "checkpoint-6").exists()


def test_adam_without_checkpoints_and_without_refresh_is_refused_before_training(run_cfg, tmp_path):
    path, _ = run_cfg
    cfg = load_config(path, [f"output_dir={tmp_path / 'out'}", "train_type=select", "component=less",
                             "grads.grad_type=adam", "warmup_step=4", "update_step=4", "refresh.enabled=false"])
    with pytest.raises(FlexfeedError, match="no grads.checkpoints"):  # only the live optimizer has moments
        train(cfg)
    assert not (tmp_path / "out" / "checkpoint-6").exists()


@pytest.mark.parametrize("refresh", [[], ["refresh.max_staleness=0"]], ids=["offline", "live"])
def test_cluster_computes_gradients_of_its_probe_rows_only(run_cfg, tmp_path, monkeypatch, refresh):
    path, _ = run_cfg
    calls = []
    original = GradsStage.compute

    def counting(self, rows):
        calls.append(len(rows["input_ids"]))
        return original(self, rows)

    monkeypatch.setattr(GradsStage, "compute", counting)
    cfg = load_config(path, [f"output_dir={tmp_path}", "train_type=select", "component=cluster", "warmup_step=4",
                             "update_step=4", "component_args.num_clusters=4", "component_args.samples_per_cluster=2",
                             f"store={tmp_path / 'store'}", *refresh])
    train(cfg)
    decided = [d for d in _decisions(tmp_path) if d["decision"]]
    assert [d["probe_rows"]["grads/train"] for d in decided] == [8, 8]
    # 8 probe rows per decision; the 6 target rows once (offline) or at each decision (live)
    target = 6 if not refresh else 2 * 6
    assert sorted(calls) == sorted([8, 8] + ([6] if not refresh else [6, 6])) and sum(calls) == 16 + target
    p = prepare(cfg)
    assert not any(s.records() for s in p.train_store.find("grads"))  # no train row's gradient stored


def test_a_signal_mixing_model_versions_is_refused(tmp_path):
    """Offline: shards of two models; live: shards further apart than max_staleness."""
    from pipeline.refresh import SignalRoute, check_versions, version_summary
    from store.store import Store

    store = Store.create(tmp_path / "s", dataset_fingerprint="f" * 20, num_rows=8, shard_rows=4)
    sig = store.signal("loss", {"kind": "loss"}, dtype="float32", dim=2)
    sig.write_shard(0, np.ones((4, 2), dtype=np.float32), version=0, model="ckpt-a")
    sig.write_shard(1, np.ones((4, 2), dtype=np.float32), version=7, model="ckpt-b")
    summary = version_summary(sig)
    assert summary["versions"] == [0, 7] and summary["models"] == ["ckpt-a", "ckpt-b"]
    with pytest.raises(FlexfeedError, match="2 different models"):
        check_versions(SignalRoute("loss", "train", False, []), summary)
    with pytest.raises(FlexfeedError, match="versions 0 to 7, more than max_staleness=5"):
        check_versions(SignalRoute("loss", "train", True, [], max_staleness=5), summary)
    check_versions(SignalRoute("loss", "train", True, [], max_staleness=7), summary)
