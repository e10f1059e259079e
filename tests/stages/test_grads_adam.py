"""Adam preconditioning (LESS's formula) and reading optimizer state from Trainer/DeepSpeed checkpoints."""

from __future__ import annotations

import json
from collections import OrderedDict

import pytest
import torch
from test_grads_hooks import ATTN, loop_grads, lora_model, make_rows

from stages.batching import pad_batch
from stages.grads import AdamPreconditioner, build_projector, compute_features, load_adam_state
from stages.grads.checkpoint import checkpoint_identity, checkpoint_lr
from store.errors import FlexfeedError

BETAS, EPS, LR = (0.8, 0.99), 1e-6, 3e-4  # not AdamW's defaults: they must come from the file


@pytest.fixture(scope="module")
def trained(tiny_checkpoint, tmp_path_factory):
    """A LoRA model after two AdamW steps, saved as a Trainer checkpoint (adapter + optimizer.pt)."""
    model = lora_model(tiny_checkpoint, ATTN, seed=3)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    # the Trainer's two groups: weight decay (all LoRA weights) and no decay (empty here)
    opt = torch.optim.AdamW([{"params": [p for _, p in params], "weight_decay": 0.01},
                             {"params": [], "weight_decay": 0.0}], lr=LR, betas=BETAS, eps=EPS)
    rows, labels = make_rows(model.config.vocab_size, [10, 14, 6], seed=5)
    for _ in range(2):
        opt.zero_grad()
        model(**{k: v for k, v in pad_batch(rows, labels).items()}).loss.backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    ckpt = tmp_path_factory.mktemp("checkpoint-2")
    model.save_pretrained(ckpt)
    torch.save(opt.state_dict(), ckpt / "optimizer.pt")
    (ckpt / "trainer_state.json").write_text(json.dumps(
        {"global_step": 2, "log_history": [{"learning_rate": 2e-4, "step": 1}, {"learning_rate": 1e-4, "step": 2}]}))
    moments = {n: (opt.state[p]["exp_avg"].clone(), opt.state[p]["exp_avg_sq"].clone()) for n, p in params}
    return model, ckpt, moments


def shapes(model):
    return [(n, p.shape) for n, p in model.named_parameters() if p.requires_grad]


def test_trainer_optimizer_state_maps_to_parameters(trained):
    model, ckpt, moments = trained
    state = load_adam_state(ckpt, shapes(model))
    assert state.betas == BETAS and state.eps == EPS and state.lr == LR and state.layout == "trainer"
    for name, (m, v) in moments.items():
        torch.testing.assert_close(state.exp_avg[name], m, rtol=0, atol=0)
        torch.testing.assert_close(state.exp_avg_sq[name], v, rtol=0, atol=0)
    assert checkpoint_lr(ckpt) == pytest.approx(1.5e-4)  # the mean rate logged over steps 1..2


def test_adam_features_equal_formula_on_loop_gradients(trained):
    model, ckpt, moments = trained
    rows, labels = make_rows(model.config.vocab_size, [8, 13, 5], seed=9)
    pre = AdamPreconditioner(load_adam_state(ckpt, shapes(model)))
    projector = build_projector(model, 256, seed=4)
    feats = compute_features(model, pad_batch(rows, labels), projector, pre, normalize=True)
    # by hand: LESS's m'/sqrt(v'+eps) of each loop gradient, projected weight by weight, L2-normalised
    b1, b2 = BETAS
    expect = torch.zeros(len(rows), 256)
    for i, grads in enumerate(loop_grads(model, rows, labels)):
        for name, g in grads.items():
            m, v = moments[name]
            update = (b1 * m + (1 - b1) * g) / torch.sqrt(b2 * v + (1 - b2) * g**2 + EPS)
            torch.testing.assert_close(pre(name, g[None])[0], update, rtol=1e-5, atol=1e-6)
            expect[i] += projector.project(name, update[None])[0]
    expect = expect / expect.norm(dim=1, keepdim=True)
    torch.testing.assert_close(feats, expect, rtol=1e-4, atol=1e-5)
    assert torch.allclose(feats.norm(dim=1), torch.ones(len(rows)), atol=1e-5)


def _deepspeed_checkpoint(root, model, moments, layout, world=2):
    """A DeepSpeed tag folder written by hand in ZeRO-2 (torch or elastic state) or ZeRO-0 layout."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    names = [n for n, _ in shapes(model)]
    # DeepSpeed wraps the peft model: its names carry "module." in some versions
    shapes_od = OrderedDict((f"module.{n}", torch.Size(s)) for n, s in shapes(model))
    tag = root / "global_step2"
    tag.mkdir(parents=True)
    (root / "latest").write_text("global_step2")
    group = {"lr": LR, "betas": BETAS, "eps": EPS, "weight_decay": 0.01, "params": [0]}
    model_states = {"module": {}, "param_shapes": [shapes_od], "buffer_names": [], "ds_version": "0.19.8",
                    "global_steps": 2, "optimizer": None}
    if layout == "zero0":
        model_states["optimizer"] = {
            "state": {i: {"step": torch.tensor(2.0), "exp_avg": moments[n][0], "exp_avg_sq": moments[n][1]}
                      for i, n in enumerate(names)},
            "param_groups": [dict(group, params=list(range(len(names))))]}
        torch.save(model_states, tag / "mp_rank_00_model_states.pt")
        return
    torch.save(model_states, tag / "mp_rank_00_model_states.pt")
    flat_m = torch.cat([moments[n][0].reshape(-1) for n in names])
    flat_v = torch.cat([moments[n][1].reshape(-1) for n in names])
    align = 2 * world
    pad = (-flat_m.numel()) % align + align  # DeepSpeed pads the group to its alignment
    flat_m, flat_v = torch.cat([flat_m, torch.zeros(pad)]), torch.cat([flat_v, torch.zeros(pad)])
    part = flat_m.numel() // world
    for r in range(world):
        sl = slice(r * part, (r + 1) * part)
        m_r, v_r = flat_m[sl], flat_v[sl]
        if layout == "zero2-elastic" and r == world - 1:  # elastic drops the last rank's padding
            m_r, v_r = m_r[: part - pad], v_r[: part - pad]
        entry = {"step": torch.tensor(2.0), "exp_avg": m_r.clone(), "exp_avg_sq": v_r.clone()}
        base = [entry] if layout == "zero2-elastic" else {"state": {0: entry}, "param_groups": [group]}
        osd = {"loss_scaler": LossScaler(1.0), "dynamic_loss_scale": False, "overflow": False, "clip_grad": 1.0,
               "base_optimizer_state": base, "single_partition_of_fp32_groups": [m_r.clone()],
               "zero_stage": ZeroStageEnum.gradients, "group_paddings": [pad if r == world - 1 else 0],
               "param_alignment_paddings": [[0]], "partition_count": [world], "ds_version": "0.19.8",
               "param_slice_mappings": [OrderedDict({names[0]: fragment_address(numel=4, start=0)})]}
        # elastic states keep no param groups: the hyper-parameters come from the DeepSpeed config
        ds_config = {"zero_optimization": {"stage": 2},
                     "optimizer": {"type": "AdamW", "params": {"lr": LR, "betas": list(BETAS), "eps": EPS}}}
        torch.save({"optimizer_state_dict": osd, "ds_config": ds_config,
                    "ds_version": "0.19.8"}, tag / f"bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt")


@pytest.mark.parametrize("layout", ["zero2", "zero2-elastic", "zero0"])
def test_deepspeed_layouts_load(trained, tmp_path, layout):
    model, ckpt, moments = trained
    _deepspeed_checkpoint(tmp_path, model, moments, layout)
    state = load_adam_state(tmp_path, shapes(model))
    assert state.layout == ("deepspeed-zero0" if layout == "zero0" else "deepspeed-zero12")
    assert tuple(state.betas) == BETAS and state.eps == EPS and state.lr == LR
    for name, (m, v) in moments.items():
        torch.testing.assert_close(state.exp_avg[name], m, rtol=0, atol=0)
        torch.testing.assert_close(state.exp_avg_sq[name], v, rtol=0, atol=0)


def test_missing_or_mismatched_state_is_a_clear_error(trained, tiny_checkpoint, tmp_path):
    model, ckpt, _ = trained
    with pytest.raises(FlexfeedError, match="no optimizer state"):
        load_adam_state(tmp_path, shapes(model))
    other = lora_model(tiny_checkpoint, ["q_proj", "k_proj", "v_proj"])
    with pytest.raises(FlexfeedError, match="trainable"):
        load_adam_state(ckpt, shapes(other))
    with pytest.raises(FlexfeedError, match="no adapter_model"):
        checkpoint_identity(tmp_path, with_optimizer=False)


def test_unsafe_pickle_is_refused(trained, tmp_path):
    model, _, _ = trained

    class Evil:
        def __reduce__(self):
            return (print, ("pickle code ran",))

    torch.save({"state": {}, "param_groups": [], "x": Evil()}, tmp_path / "optimizer.pt")
    with pytest.raises(FlexfeedError, match="safely"):
        load_adam_state(tmp_path, shapes(model))


def test_checkpoint_identity_follows_file_contents(trained, tmp_path):
    import shutil

    _, ckpt, _ = trained
    copy = tmp_path / "elsewhere"
    shutil.copytree(ckpt, copy)
    assert checkpoint_identity(copy, True) == checkpoint_identity(ckpt, True)  # content, not path
    sd = torch.load(copy / "optimizer.pt", weights_only=True)
    sd["state"][0]["exp_avg"] += 1
    torch.save(sd, copy / "optimizer.pt")
    assert checkpoint_identity(copy, True) != checkpoint_identity(ckpt, True)
    assert checkpoint_identity(copy, False) == checkpoint_identity(ckpt, False)  # sgd ignores the optimizer
