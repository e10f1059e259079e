"""LESS's Adam preconditioning of per-sample gradients, from a checkpoint's optimizer moments.

With the checkpoint's first and second moments m, v of a parameter and a per-sample gradient g:

    m' = beta1 * m + (1 - beta1) * g
    v' = beta2 * v + (1 - beta2) * g**2
    u  = m' / sqrt(v' + eps)

exactly as LESS computes it (eps inside the square root, no bias correction: the update one more
Adam step would take for that sample alone, up to the learning rate). LESS hard-codes
beta1=0.9, beta2=0.999, eps=1e-8; we read them from the checkpoint's parameter group, which holds
those same values for a default AdamW.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from stages.grads.adam_state import AdamState, map_torch_state, trainer_param_order
from stages.grads.optim_layouts import find_deepspeed_dir, load_deepspeed_state, safe_load
from store.errors import FlexfeedError


class AdamPreconditioner:
    """Maps a per-sample gradient (b, *shape) of a named parameter to LESS's Adam update direction."""

    def __init__(self, state: AdamState, device: str | torch.device = "cpu"):
        self.beta1, self.beta2 = (float(b) for b in state.betas)
        self.eps = float(state.eps)
        self.m = {n: t.to(device=device, dtype=torch.float32) for n, t in state.exp_avg.items()}
        self.v = {n: t.to(device=device, dtype=torch.float32) for n, t in state.exp_avg_sq.items()}

    def __call__(self, name: str, grads: torch.Tensor) -> torch.Tensor:
        """LESS's m' / sqrt(v' + eps) for every sample's gradient of parameter ``name``."""
        m, v = self.m[name], self.v[name]
        g = grads.float()
        m_new = (g * (1 - self.beta1)).add_(m, alpha=self.beta1)
        v_new = (g * g).mul_(1 - self.beta2).add_(v, alpha=self.beta2)
        return m_new.div_(v_new.add_(self.eps).sqrt_())


def load_adam_state(checkpoint: str | os.PathLike, params: list[tuple[str, torch.Size]]) -> AdamState:
    """Adam moments of ``params`` (trainable, model order) from a Trainer or DeepSpeed checkpoint dir."""
    root = Path(checkpoint)
    if not root.is_dir():
        raise FlexfeedError(f"checkpoint {root} is not a directory", hint="list Trainer checkpoint directories")
    for name in ("optimizer.pt", "optimizer.bin"):
        path = root / name
        if path.is_file():
            state = map_torch_state(safe_load(path), trainer_param_order(params), str(path))
            state.layout, state.files = "trainer", [str(path)]
            return state
    ds_dir = find_deepspeed_dir(root)
    if ds_dir is not None:
        return load_deepspeed_state(ds_dir, params)
    raise FlexfeedError(
        f"no optimizer state under {root}: neither optimizer.pt nor a DeepSpeed global_step*/ folder",
        hint="save checkpoints with optimizer state (no save_only_model), or use grad_type: sgd",
    )
