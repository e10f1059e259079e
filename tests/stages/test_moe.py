"""freeze_gate: exactly the mixture-of-experts routers stop training; a dense model's gate_proj never does."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

from stages.moe import freeze_routers, router_parameters
from store.errors import FlexfeedError


def _tiny_qwen2_moe() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = Qwen2MoeConfig(vocab_size=64, hidden_size=16, intermediate_size=32, moe_intermediate_size=8,
                         shared_expert_intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1)
    return Qwen2MoeForCausalLM(cfg)


def test_routers_of_a_qwen2_moe_are_frozen_and_nothing_else():
    model = _tiny_qwen2_moe()
    # by hand: each of the 2 layers has a router `mlp.gate` and a shared-expert gate `mlp.shared_expert_gate`,
    # both bias-free linear layers: 4 weight tensors
    expected = {f"model.layers.{i}.mlp.{m}.weight" for i in range(2) for m in ("gate", "shared_expert_gate")}
    assert freeze_routers(model) == 4
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == expected
    assert all(p.requires_grad for n, p in model.named_parameters() if "gate_proj" in n)


def test_any_parameter_below_a_router_module_counts():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.router = torch.nn.Linear(4, 2)  # weight and bias
            self.gate_proj = torch.nn.Linear(4, 4)
            self.up = torch.nn.Linear(4, 4)

    names = {n for n, _ in router_parameters(Block())}
    assert names == {"router.weight", "router.bias"}


def test_a_dense_model_has_no_router():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    assert router_parameters(model) == []
    with pytest.raises(FlexfeedError, match="no mixture-of-experts router"):
        freeze_routers(model)
