"""Mixture-of-experts routers: finding them by name, freezing them (`freeze_gate`), and counting where they send
tokens (`moe_layout`, `expert_counts`: the `gate_load` stage's per-row expert loads).

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


def moe_layout(config: dict) -> tuple[int, int, int]:
    """(MoE layers, experts per layer, experts each token is routed to) of a model's config.json.

    Mixtral names its experts `num_local_experts`, Qwen2-MoE and OLMoE `num_experts`; Qwen2-MoE may keep dense
    MLPs in some layers (`mlp_only_layers`, `decoder_sparse_step`). A model without experts is an error.
    """
    experts = int(config.get("num_local_experts") or config.get("num_experts") or 0)
    top_k = int(config.get("num_experts_per_tok") or 0)
    if experts < 2 or top_k < 1:
        raise FlexfeedError(f"model type {config.get('model_type')!r} has no mixture-of-experts router "
                            "(no num_experts / num_local_experts and num_experts_per_tok in its config)",
                            "dynamic_moe mixes by expert loads: train a mixture-of-experts model (Mixtral, "
                            "Qwen2-MoE, OLMoE), or choose another mixer")
    step = int(config.get("decoder_sparse_step") or 1)
    dense = set(config.get("mlp_only_layers") or [])
    layers = [i for i in range(int(config["num_hidden_layers"])) if i not in dense and (i + 1) % step == 0]
    return len(layers), experts, top_k


def expert_counts(router_logits: tuple, attention_mask: torch.Tensor, top_k: int) -> torch.Tensor:
    """(B, layers * experts) float32: per row, how many of its real tokens each layer routed to each expert.

    `router_logits` is what a Hugging Face MoE model returns with `output_router_logits=True`: one
    (B * T, experts) tensor per MoE layer, rows batch-major; padding tokens are not counted.
    """
    b, t = attention_mask.shape
    real = attention_mask.reshape(b, t, 1).float()
    counts = []
    for logits in router_logits:
        chosen = logits.float().topk(top_k, dim=-1).indices.reshape(b, t, top_k)
        hits = torch.zeros(b, t, logits.shape[-1], device=logits.device).scatter_(-1, chosen, 1.0)
        counts.append((hits * real.to(hits.device)).sum(1))
    return torch.cat(counts, dim=1)
