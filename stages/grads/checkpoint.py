"""What identifies a training checkpoint for gradient features: its files' content hash, step and learning rate
(LESS's checkpoint weight: the mean learning rate of the interval that ends at it)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from stages.grads.optim_layouts import find_deepspeed_dir
from stages.models import ADAPTER_WEIGHTS, adapter_fingerprint
from store.errors import FlexfeedError
from store.hashing import file_digest, stable_hash

_CHECKPOINT_DIR = re.compile(r"checkpoint-(\d+)")  # the Trainer's checkpoint folder names


def optimizer_files(checkpoint: str | os.PathLike) -> list[Path]:
    """The files holding a checkpoint's optimizer state (Trainer or DeepSpeed), without reading them."""
    root = Path(checkpoint)
    for name in ("optimizer.pt", "optimizer.bin"):
        if (root / name).is_file():
            return [root / name]
    ds_dir = find_deepspeed_dir(root)
    if ds_dir is None:
        return []
    zero = sorted(ds_dir.glob("*zero_pp_rank_*_mp_rank_00_optim_states.pt"))
    # ZeRO 0 keeps the optimizer inside the model states file
    return zero or sorted(ds_dir.glob("mp_rank_00_model_states.pt"))


def checkpoint_identity(checkpoint: str | os.PathLike, with_optimizer: bool) -> str:
    """Hash of the checkpoint's adapter (settings, weights) and, when they shape the values, optimizer files."""
    root = Path(checkpoint)
    if not any((root / n).is_file() for n in ADAPTER_WEIGHTS):
        raise FlexfeedError(f"checkpoint {root} has no {' or '.join(ADAPTER_WEIGHTS)}",
                            hint="gradient features need LoRA checkpoints saved by the Trainer or PeftModel")
    parts = {"adapter": adapter_fingerprint(str(root)), "optimizer": None}
    if with_optimizer:
        opt = optimizer_files(root)
        if not opt:
            raise FlexfeedError(f"checkpoint {root} has no optimizer state (optimizer.pt or global_step*/)",
                                hint="save checkpoints with optimizer state, or use grad_type: sgd")
        # names relative to the checkpoint (global_step*/...), never the folder it sits in
        parts["optimizer"] = {f.relative_to(root).as_posix(): file_digest(f) for f in opt}
    return stable_hash(parts)


def trainer_state(checkpoint: str | os.PathLike) -> dict:
    """The checkpoint's trainer_state.json, or {} when there is none."""
    path = Path(checkpoint) / "trainer_state.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise FlexfeedError(f"{path} is not valid JSON ({err})", hint="the checkpoint was not saved completely") from err


def checkpoint_lr(checkpoint: str | os.PathLike, since_step: int | None = None) -> float | None:
    """LESS's checkpoint weight: the mean learning rate logged over the steps since the previous checkpoint.

    The interval is (since_step, this checkpoint's step]; `since_step` defaults to the step of the nearest
    earlier `checkpoint-<step>` folder beside this one (the Trainer's layout), else 0. None when
    trainer_state.json logs no learning rate in the interval (the caller must not invent one).
    """
    state = trainer_state(checkpoint)
    step = int(state.get("global_step", 0) or 0)
    start = previous_checkpoint_step(checkpoint, step) if since_step is None else int(since_step)
    # one rate per logged step (a resumed run may log a step twice: the later entry wins)
    rates = {int(e["step"]): float(e["learning_rate"]) for e in state.get("log_history", [])
             if isinstance(e, dict) and "learning_rate" in e and "step" in e}
    inside = [lr for s, lr in rates.items() if start < s <= step]
    return sum(inside) / len(inside) if inside else None


def previous_checkpoint_step(checkpoint: str | os.PathLike, step: int) -> int:
    """The largest step below `step` among the `checkpoint-<step>` folders beside `checkpoint` (0 if none)."""
    root = Path(checkpoint)
    if step <= 0 or not root.parent.is_dir():
        return 0
    earlier = [int(m.group(1)) for p in root.parent.iterdir()
               if p != root and p.is_dir() and (m := _CHECKPOINT_DIR.fullmatch(p.name)) and int(m.group(1)) < step]
    return max(earlier, default=0)


def checkpoint_step(checkpoint: str | os.PathLike) -> int:
    """The global step recorded in trainer_state.json (0 when unknown)."""
    return int(trainer_state(checkpoint).get("global_step", 0) or 0)
