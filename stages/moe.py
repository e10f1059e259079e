"""Mixture-of-experts routers: finding them by name, and freezing them (`freeze_gate`).

A router is the linear layer that scores experts: `mlp.gate` (Qwen2-MoE, Qwen3-MoE, OLMoE),
`block_sparse_moe.gate` (Mixtral), `shared_expert_gate` (Qwen2-MoE's gate on its shared expert) or a
module named `router`. A parameter belongs to one when one of the module names on its path is exactly
one of those; a dense model's `gate_proj` (the SwiGLU gate every Llama layer has) is not a router, so
matching "gate" anywhere in the name, which would freeze every MLP's gate projection, is avoided.
"""

from __future__ import annotations

import torch

from store.errors import FlexfeedError

ROUTER_MODULES = frozenset({"gate", "shared_expert_gate", "router"})


def router_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """(name, parameter) of every parameter inside a router module (peft's LoRA A/B of a router included)."""
    return [(name, p) for name, p in model.named_parameters()
            if any(part in ROUTER_MODULES for part in name.split(".")[:-1])]


def freeze_routers(model: torch.nn.Module) -> int:
    """Stop gradients to every router parameter; returns how many tensors were frozen.

    A model without routers is an error: freeze_gate on a dense model is a config meant for another model.
    """
    routers = router_parameters(model)
    if not routers:
        raise FlexfeedError("freeze_gate is set but the model has no mixture-of-experts router "
                            "(no module named gate, router or shared_expert_gate)",
                            "drop freeze_gate, or train a mixture-of-experts model")
    for _, p in routers:
        p.requires_grad_(False)
    return len(routers)
