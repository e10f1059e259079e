"""Reading Adam moments out of DeepSpeed checkpoint layouts (ZeRO stages 0, 1 and 2).

Supported, inside a Trainer checkpoint directory (or the tag folder itself):

- ``latest`` naming the tag, or a single (else the highest) ``global_step*/`` folder;
- ``mp_rank_00_model_states.pt`` whose ``param_shapes`` (one ordered name -> shape mapping per
  optimizer group) gives the parameter order;
- ZeRO 1/2 and bf16: ``[bf16_]zero_pp_rank_{R}_mp_rank_00_optim_states.pt`` for every data-parallel
  rank R. Each holds ``optimizer_state_dict.base_optimizer_state``: either a torch optimizer
  state_dict or (elastic checkpoints) a list with one entry per group, over ONE flat tensor per
  group, split evenly across ranks with alignment padding at the end. Concatenating the ranks'
  pieces in rank order and cutting at the group's total size gives the parameters back in order.
- ZeRO 0 (no partitioning): the torch optimizer state_dict under ``optimizer`` in the model
  states file, per parameter, or flattened per group (fp16 wrapper, under ``optimizer_state_dict``).

ZeRO 3 (parameters partitioned too), pipeline or tensor parallelism (mp_rank > 0), and
``round_robin_gradients`` reordering are refused with an error.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch

from stages.grads.adam_state import AdamState, map_torch_state
from stages.grads.projection import canonical_name
from store.errors import FlexfeedError


def _deepspeed_globals() -> list:
    # DeepSpeed pickles a few of its own small classes into checkpoints; allow exactly those
    found = []
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        found += [LossScaler, DynamicLossScaler]
    except Exception:  # an absent or broken deepspeed only narrows what loads
        pass
    try:
        from deepspeed.runtime.zero.config import ZeroStageEnum
        found.append(ZeroStageEnum)
    except Exception:
        pass
    try:
        from deepspeed.utils.tensor_fragment import fragment_address
        found.append(fragment_address)
    except Exception:
        pass
    return found


def safe_load(path: Path, mmap: bool = False):
    """torch.load with weights_only=True (plus DeepSpeed's small classes), errors as FlexfeedError.

    A plain PyTorch file loads without them; DeepSpeed (a second of imports) is imported only for a file
    that pickles one of its classes.
    """
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except pickle.UnpicklingError:
            with torch.serialization.safe_globals(_deepspeed_globals()):
                return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
        raise FlexfeedError(f"cannot read optimizer/checkpoint file {path} safely: {str(err).splitlines()[0]}",
                            hint="the file must be a torch.save of tensors and plain containers") from err


def find_deepspeed_dir(root: Path) -> Path | None:
    """The DeepSpeed tag folder of a checkpoint (via ``latest``, else global_step*), or None."""
    if any(root.glob("*_model_states.pt")):
        return root
    latest = root / "latest"
    if latest.is_file():
        tag = root / latest.read_text().strip()
        if tag.is_dir():
            return tag
    steps = [p for p in root.glob("global_step*") if p.is_dir()]
    if not steps:
        return None
    return max(steps, key=lambda p: int(re.sub(r"\D", "", p.name) or 0))


def _groups_from_shapes(param_shapes, params: list[tuple[str, torch.Size]], where: str) -> list[list[tuple]]:
    if isinstance(param_shapes, dict):
        param_shapes = [param_shapes]
    by_canon = {canonical_name(n): (n, s, i) for i, (n, s) in enumerate(params)}
    groups = []
    for group in param_shapes:
        members = []
        for name, shape in group.items():
            hit = by_canon.get(canonical_name(name))
            if hit is None or tuple(hit[1]) != tuple(shape):
                raise FlexfeedError(
                    f"{where}: checkpoint parameter {name} {tuple(shape)} is not a trainable parameter of the model",
                    hint="load the same base model and LoRA settings the checkpoint was trained with",
                )
            members.append(hit)
        groups.append(members)
    if sum(len(g) for g in groups) != len(params):
        raise FlexfeedError(f"{where} lists {sum(len(g) for g in groups)} parameters, the model trains {len(params)}",
                            hint="load the same base model and LoRA settings the checkpoint was trained with")
    return groups


def _split_flat(flat_m: torch.Tensor, flat_v: torch.Tensor, group: list[tuple], where: str, m: dict, v: dict):
    total = sum(torch.Size(s).numel() for _, s, _ in group)
    if flat_m.numel() < total:
        raise FlexfeedError(f"{where}: flat optimizer state has {flat_m.numel()} values, parameters need {total}",
                            hint="are all ranks' zero_pp_rank_*_optim_states.pt files present?")
    offset = 0
    for name, shape, _ in group:
        n = torch.Size(shape).numel()
        m[name] = flat_m[offset:offset + n].reshape(shape).float().clone()
        v[name] = flat_v[offset:offset + n].reshape(shape).float().clone()
        offset += n


def _rank_of(path: Path) -> int:
    return int(re.search(r"zero_pp_rank_(\d+)_", path.name).group(1))


def _hyper(sd, ds_config=None) -> dict:
    group0 = sd["param_groups"][0] if isinstance(sd, dict) and sd.get("param_groups") else {}
    if not group0 and isinstance(ds_config, dict):
        # elastic checkpoints keep no param groups; a DeepSpeed-built optimizer has them in the config
        params = (ds_config.get("optimizer") or {}).get("params") or {}
        group0 = {k: v for k, v in params.items() if k in ("lr", "betas", "eps") and not isinstance(v, str)}
    return {"betas": tuple(group0.get("betas", (0.9, 0.999))), "eps": float(group0.get("eps", 1e-8)),
            "lr": float(group0["lr"]) if "lr" in group0 else None}


def _load_zero12(files: list[Path], groups: list[list[tuple]]) -> AdamState:
    pieces_m: list[list[torch.Tensor]] = [[] for _ in groups]
    pieces_v: list[list[torch.Tensor]] = [[] for _ in groups]
    hyper: dict = {}
    for path in files:
        saved = safe_load(path)
        osd = saved.get("optimizer_state_dict", {})
        if int(osd.get("zero_stage", 1)) == 3:
            raise FlexfeedError(f"{path} is a ZeRO-3 checkpoint", hint="ZeRO stages 0-2 are supported")
        if osd.get("param_alignment_paddings") and any(any(p) for p in osd["param_alignment_paddings"]):
            raise FlexfeedError(f"{path} uses round_robin_gradients padding",
                                hint="train without round_robin_gradients to read gradient features from it")
        count = osd.get("partition_count", len(files))
        count = count[0] if isinstance(count, (list, tuple)) else count
        if int(count) != len(files):
            raise FlexfeedError(f"{path}: partition_count differs from the {len(files)} rank files found",
                                hint="copy every zero_pp_rank_*_optim_states.pt of the checkpoint")
        base = osd.get("base_optimizer_state")
        if base is None:
            raise FlexfeedError(f"{path} has no base_optimizer_state", hint="is this a DeepSpeed ZeRO 1/2 checkpoint?")
        entries = base if isinstance(base, list) else [base["state"].get(i, {}) for i in range(len(groups))]
        hyper = hyper or _hyper(base, saved.get("ds_config"))
        if len(entries) != len(groups):
            raise FlexfeedError(f"{path} has {len(entries)} optimizer groups, param_shapes lists {len(groups)}",
                                hint="the model states and optimizer files come from different checkpoints")
        for i, entry in enumerate(entries):
            em, ev = (entry["exp_avg"], entry["exp_avg_sq"]) if "exp_avg" in entry else (None, None)
            if em is None:
                raise FlexfeedError(f"{path}: group {i} has no exp_avg/exp_avg_sq",
                                    hint="grad_type adam needs an Adam/AdamW checkpoint; use grad_type: sgd")
            pieces_m[i].append(em.reshape(-1))
            pieces_v[i].append(ev.reshape(-1))
    m, v = {}, {}
    for i, group in enumerate(groups):
        _split_flat(torch.cat(pieces_m[i]), torch.cat(pieces_v[i]), group, str(files[0].parent), m, v)
    return AdamState(m, v, layout="deepspeed-zero12", files=[str(f) for f in files], **hyper)


def load_deepspeed_state(ds_dir: Path, params: list[tuple[str, torch.Size]]) -> AdamState:
    """Adam moments of ``params`` from a DeepSpeed tag folder (ZeRO 0, 1 or 2)."""
    model_file = ds_dir / "mp_rank_00_model_states.pt"
    if not model_file.is_file():
        if any(ds_dir.glob("zero_pp_rank_*_mp_rank_*_model_states.pt")):
            raise FlexfeedError(f"{ds_dir} is a ZeRO-3 checkpoint", hint="ZeRO stages 0-2 are supported")
        raise FlexfeedError(f"{ds_dir} has no mp_rank_00_model_states.pt", hint="copy the whole global_step folder")
    states = safe_load(model_file, mmap=True)
    if "param_shapes" not in states:
        raise FlexfeedError(f"{model_file} has no param_shapes", hint="is this a DeepSpeed checkpoint?")
    groups = _groups_from_shapes(states["param_shapes"], params, str(model_file))
    files = sorted(ds_dir.glob("*zero_pp_rank_*_mp_rank_00_optim_states.pt"), key=_rank_of)
    if files:
        return _load_zero12(files, groups)
    sd = states.get("optimizer")
    if sd is None:
        raise FlexfeedError(f"{ds_dir} holds no optimizer state", hint="save checkpoints with optimizer state")
    if "optimizer_state_dict" in sd:  # fp16 wrapper: one flat tensor per group
        base = sd["optimizer_state_dict"]
        m, v = {}, {}
        for i, group in enumerate(groups):
            entry = base["state"].get(i, {})
            if "exp_avg" not in entry:
                raise FlexfeedError(f"{model_file}: group {i} has no exp_avg", hint="use grad_type: sgd")
            _split_flat(entry["exp_avg"].reshape(-1), entry["exp_avg_sq"].reshape(-1), group, str(model_file), m, v)
        return AdamState(m, v, layout="deepspeed-zero0", files=[str(model_file)], **_hyper(base))
    state = map_torch_state(sd, groups, str(model_file))
    state.layout, state.files = "deepspeed-zero0", [str(model_file)]
    return state
