"""Exact per-sample gradients of trainable linear weights from ONE batched backward.

For a linear map y_t = W x_t (a LoRA ``lora_A`` or ``lora_B`` is one), the gradient of a loss
that depends on sample i only through its own row is sum_t (dL_i/dy_{i,t}) x_{i,t}^T. So one
forward hook keeps each module's input x, a tensor hook on its output receives dL/dy for the SUM
of per-sample losses, and since sample i's loss depends on row i alone, row i of that output
gradient is sample i's. For LoRA ``y = W0 x + B A x * scale`` this gives exactly
grad_B = sum_t (dL/dz_t)(A x_t)^T and grad_A = sum_t (B^T dL/dz_t) x_t^T (z = B A x, the scale
folded in by autograd). The per-sample gradient of one weight is handed to a callback as soon as
it is formed, so only one weight's (batch x weight) gradient is alive at a time.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from stages.loss import per_sample_loss
from store.errors import FlexfeedError


def trainable_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Linear modules with a trainable weight, keyed by module name; refuses other trainable params."""
    linears: dict[str, nn.Linear] = {}
    covered: set[str] = set()
    for mod_name, module in model.named_modules():
        if isinstance(module, nn.Linear) and module.weight.requires_grad:
            linears[mod_name] = module
            covered.add(f"{mod_name}.weight")
            if module.bias is not None and module.bias.requires_grad:
                covered.add(f"{mod_name}.bias")
    others = [n for n, p in model.named_parameters() if p.requires_grad and n not in covered]
    if others:
        raise FlexfeedError(
            f"per-sample gradients cover trainable linear weights only; also trainable: {others[:5]}",
            hint="train LoRA adapters (finetuning_type: lora) without modules_to_save, or freeze those",
        )
    if not linears:
        raise FlexfeedError("the model has no trainable parameters to take gradients of",
                            hint="load it with LoRA adapters (finetuning_type: lora)")
    return linears


GradCallback = Callable[[str, torch.Tensor], None]


def batched_per_sample_grads(model: nn.Module, batch: dict[str, torch.Tensor], on_grad: GradCallback) -> torch.Tensor:
    """Run one forward + backward; call ``on_grad(param_name, (b, *shape) grad)`` per weight; return losses."""
    linears = trainable_linears(model)
    mask = batch["attention_mask"]
    saved: dict[str, torch.Tensor] = {}
    fired: set[str] = set()
    leaves: list[torch.Tensor] = []
    handles = []

    def make_hooks(name: str, module: nn.Linear):
        def on_output_grad(grad: torch.Tensor) -> None:
            fired.add(name)
            x = saved.pop(name)
            # pad positions carry zero gradient already; the mask also guards against non-finite pads
            g = grad.float() * mask.unsqueeze(-1).to(torch.float32)
            gw = torch.einsum("bto,bti->boi", g, x.float())
            on_grad(f"{name}.weight", gw)
            if module.bias is not None and module.bias.requires_grad:
                on_grad(f"{name}.bias", g.sum(dim=1))

        def forward_hook(mod, inputs, output):
            if name in saved:
                raise FlexfeedError(f"module {name} ran twice in one forward pass",
                                    hint="disable gradient checkpointing and weight sharing for gradient features")
            saved[name] = inputs[0].detach()
            # a zero leaf added to the output makes autograd deliver dL/dy here without computing
            # (or accumulating into) the weights' summed gradients, which nobody needs
            leaf = torch.zeros((), dtype=output.dtype, device=output.device, requires_grad=True)
            leaves.append(leaf)
            out = output + leaf
            out.register_hook(on_output_grad)
            return out

        return forward_hook

    for name, module in linears.items():
        handles.append(module.register_forward_hook(make_hooks(name, module)))
    try:
        with torch.enable_grad():
            out = model(input_ids=batch["input_ids"], attention_mask=mask, use_cache=False)
            losses, _ = per_sample_loss(out.logits, batch["labels"])
            if leaves:
                torch.autograd.backward(losses.sum(), inputs=leaves)
        # a weight the loss never reached has a zero gradient; emit it (Adam maps zero to nonzero)
        b = batch["input_ids"].shape[0]
        for name in [n for n in linears if n not in fired]:
            module = linears[name]
            on_grad(f"{name}.weight", module.weight.new_zeros((b, *module.weight.shape), dtype=torch.float32))
            if module.bias is not None and module.bias.requires_grad:
                on_grad(f"{name}.bias", module.bias.new_zeros((b, *module.bias.shape), dtype=torch.float32))
    finally:
        for h in handles:
            h.remove()
        saved.clear()
    return losses.detach()


def per_sample_grads(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """All per-sample gradients {param name: (b, *shape)} of one padded batch (tests, small models)."""
    grads: dict[str, torch.Tensor] = {}
    batched_per_sample_grads(model, batch, lambda name, g: grads.__setitem__(name, g))
    return grads
