"""Projected (optionally Adam-preconditioned) per-sample gradient features of one padded batch."""

from __future__ import annotations

import torch
from torch import nn

from stages.grads.hooks import batched_per_sample_grads, trainable_linears
from stages.grads.precondition import AdamPreconditioner
from stages.grads.projection import Projector


def trainable_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """{parameter name: shape} of the weights gradient features are taken of (model order)."""
    trainable_linears(model)  # refuses trainable parameters the hooks cannot cover
    return {n: tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad}


def build_projector(model: nn.Module, proj_dim: int, *, proj_type: str = "rademacher", seed: int = 0,
                    structure: str = "kronecker") -> Projector:
    """A projector for every trainable weight of ``model``, on the model's device."""
    device = next(model.parameters()).device
    return Projector(trainable_shapes(model), proj_dim, proj_type=proj_type, seed=seed, structure=structure,
                     device=device)


def compute_features(model: nn.Module, batch: dict[str, torch.Tensor], projector: Projector,
                     preconditioner: AdamPreconditioner | None = None, normalize: bool = True,
                     compute_dtype: str = "float32") -> torch.Tensor:
    """(b, proj_dim) float32 features of a padded batch: per-sample grads -> [Adam] -> projection -> [L2].

    `compute_dtype: bfloat16` runs the model's forward and backward under bf16 autocast; the per-sample
    gradient products (float32 casts in the hooks), preconditioning and projection stay float32.
    """
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels")}
    feats = torch.zeros(batch["input_ids"].shape[0], projector.proj_dim, dtype=torch.float32, device=device)

    def on_grad(name: str, grads: torch.Tensor) -> None:
        # per weight, as soon as its per-sample gradient exists: precondition (nonlinear, so on the
        # exact gradient), project, accumulate; the (b x weight) gradient is freed right after
        if preconditioner is not None:
            grads = preconditioner(name, grads)
        feats.add_(projector.project(name, grads))

    was_training = model.training
    model.eval()  # no dropout: the same rows give the same features
    try:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=compute_dtype == "bfloat16"):
            batched_per_sample_grads(model, batch, on_grad)
    finally:
        model.train(was_training)
    if normalize:
        # an all-zero row (sgd features of a row without labelled tokens) stays zero
        feats = torch.nn.functional.normalize(feats, dim=1)
    return feats
