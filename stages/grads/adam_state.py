"""Adam moments per trainable parameter, and reading them from a torch optimizer ``state_dict``.

Shared by the Trainer checkpoint reader (precondition.py), the DeepSpeed layouts (optim_layouts.py)
and the live optimizer (pipeline/live_state.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from store.errors import FlexfeedError

# the Trainer puts these names in its no-weight-decay group (transformers' own patterns)
_NO_DECAY = re.compile(r"bias|layernorm|rmsnorm|(?:^|\.)norm(?:$|\.)|_norm(?:$|\.)")


@dataclass
class AdamState:
    """Adam moments per trainable parameter name, with the hyper-parameters they were made with."""

    exp_avg: dict[str, torch.Tensor]
    exp_avg_sq: dict[str, torch.Tensor]
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    lr: float | None = None
    layout: str = "trainer"
    files: list[str] = field(default_factory=list)


def trainer_param_order(params: list[tuple[str, torch.Size]]) -> list[list[tuple]]:
    """The Trainer's optimizer groups: [weight-decay params, no-decay params], each in model order."""
    # a third item (the model-order position) lets map_torch_state fall back to model order
    decay = [(n, s, i) for i, (n, s) in enumerate(params) if not _NO_DECAY.search(n.lower())]
    no_decay = [(n, s, i) for i, (n, s) in enumerate(params) if _NO_DECAY.search(n.lower())]
    return [decay, no_decay]


def _moments(entry: dict, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    if "exp_avg" not in entry or "exp_avg_sq" not in entry:
        raise FlexfeedError(f"optimizer state in {where} has no exp_avg/exp_avg_sq (keys: {sorted(entry)})",
                            hint="grad_type adam needs an Adam/AdamW checkpoint; use grad_type: sgd otherwise")
    return entry["exp_avg"], entry["exp_avg_sq"]


def map_torch_state(sd: dict, groups: list[list[tuple]], where: str) -> AdamState:
    """A torch ``optimizer.state_dict()`` whose indices follow ``groups`` -> per-name moments.

    ``groups`` holds (name, shape, model position) per member. When the state's group sizes differ
    from ``groups`` (e.g. an optimizer built with one group), indices follow model order instead.
    """
    if not isinstance(sd, dict) or "state" not in sd or "param_groups" not in sd:
        raise FlexfeedError(f"{where} is not a torch optimizer state_dict (no 'state'/'param_groups')",
                            hint="point checkpoints at a Trainer checkpoint directory holding optimizer.pt")
    sizes = [len(g["params"]) for g in sd["param_groups"]]
    flat = [p for g in groups for p in g]
    if sum(sizes) != len(flat):
        raise FlexfeedError(
            f"{where} holds {sum(sizes)} parameters but the model has {len(flat)} trainable ones",
            hint="load the same base model and LoRA settings (lora_rank, lora_target) the checkpoint was trained with",
        )
    # the given grouping when the group sizes agree with it, else plain model order
    if [len(g) for g in groups if g] != [s for s in sizes if s]:
        flat = sorted(flat, key=lambda member: member[2])
    ordered = [(name, shape) for name, shape, _ in flat]
    index_to_name: dict[int, tuple[str, torch.Size]] = {}
    pos = 0
    for group in sd["param_groups"]:
        for idx in group["params"]:
            index_to_name[idx] = ordered[pos]
            pos += 1
    m, v = {}, {}
    for idx, (name, shape) in index_to_name.items():
        entry = sd["state"].get(idx)
        if entry is None:  # never stepped: Adam's moments are still zero
            m[name] = torch.zeros(shape)
            v[name] = torch.zeros(shape)
            continue
        em, ev = _moments(entry, where)
        if em.numel() != torch.Size(shape).numel():
            raise FlexfeedError(
                f"{where}: state {idx} has {em.numel()} values but parameter {name} has shape {tuple(shape)}",
                hint="the checkpoint was trained with another model or LoRA configuration",
            )
        m[name], v[name] = em.reshape(shape).float(), ev.reshape(shape).float()
    group0 = sd["param_groups"][0]
    return AdamState(m, v, betas=tuple(group0.get("betas", (0.9, 0.999))), eps=float(group0.get("eps", 1e-8)),
                     lr=float(group0["lr"]) if "lr" in group0 else None)
