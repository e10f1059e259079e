"""LoRA checkpoints of a short AdamW run, laid out as the Trainer saves them (adapter, optimizer.pt, trainer_state)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from stages.args import ModelArgs
from stages.batching import pad_batch
from stages.models import load_model


def trainer_checkpoints(margs: ModelArgs, folder: Callable[[int], Path], data_seed: int) -> list[Path]:
    """Two steps (learning rates 1e-3, then 5e-4) on three random rows; checkpoint k goes to folder(k)."""
    torch.manual_seed(0)
    model = load_model(margs, trainable=True)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": params}, {"params": []}], lr=1e-3)  # the Trainer's two groups
    gen = torch.Generator().manual_seed(data_seed)
    rows = [torch.randint(5, model.config.vocab_size, (n,), generator=gen).tolist() for n in (9, 5, 12)]
    out = []
    for step, lr in ((1, 1e-3), (2, 5e-4)):
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad()
        model(**pad_batch(rows)).loss.backward()
        opt.step()
        ckpt = Path(folder(step))
        model.save_pretrained(ckpt)  # its adapter_config.json records the model's folder
        torch.save(opt.state_dict(), ckpt / "optimizer.pt")
        (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": step,
                                                             "log_history": [{"learning_rate": lr, "step": step}]}))
        out.append(ckpt)
    return out
