"""train_from_scratch (LLaMA-Factory's, used by DataFlex's DoReMi examples): the checkpoint's architecture
with new weights drawn from torch's seed; offline (non-trainable) loads keep the checkpoint's weights."""

from __future__ import annotations

import pytest
import torch

from stages.args import ModelArgs
from stages.models import load_model
from store.errors import FlexfeedError


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_fresh_weights_same_architecture_repeatable_under_a_seed(tiny_checkpoint):
    args = ModelArgs(model_name_or_path=str(tiny_checkpoint), finetuning_type="full", train_from_scratch=True)
    trained = _weights(load_model(ModelArgs(model_name_or_path=str(tiny_checkpoint), finetuning_type="full")))
    torch.manual_seed(3)
    first = _weights(load_model(args))
    torch.manual_seed(3)
    again = _weights(load_model(args))
    assert first.keys() == trained.keys()
    assert all(first[k].shape == trained[k].shape for k in first)
    assert all(torch.equal(first[k], again[k]) for k in first)
    projections = [k for k in first if k.endswith("q_proj.weight")]
    assert projections and not any(torch.equal(first[k], trained[k]) for k in projections)


def test_offline_loads_keep_the_checkpoint(tiny_checkpoint):
    plain = ModelArgs(model_name_or_path=str(tiny_checkpoint), finetuning_type="full")
    scratch = ModelArgs(model_name_or_path=str(tiny_checkpoint), finetuning_type="full", train_from_scratch=True)
    a, b = _weights(load_model(plain, trainable=False)), _weights(load_model(scratch, trainable=False))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_lora_from_scratch_is_refused():
    with pytest.raises(FlexfeedError, match="train_from_scratch") as err:
        ModelArgs(model_name_or_path="m", finetuning_type="lora", train_from_scratch=True)
    assert "finetuning_type: full" in err.value.hint
