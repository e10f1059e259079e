"""Tokenizer and model loading, LoRA targets, adapter save/reload, and the model's content identity."""

from __future__ import annotations

import shutil

import pytest
import torch

from demo.tiny import build_tiny_llama
from stages.args import ModelArgs
from stages.models import load_model, load_tokenizer, lora_parameters, model_identity
from store.errors import FlexfeedError

INPUT = torch.tensor([[5, 17, 42, 99, 7, 3]])


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=INPUT).logits


def adapted_modules(model) -> set[str]:
    """Leaf names of modules that carry a LoRA branch."""
    return {name.split(".")[-1] for name, module in model.named_modules() if hasattr(module, "lora_A")}


def test_tokenizer_sets_pad_to_eos_when_missing(tiny_checkpoint, tmp_path):
    tok = load_tokenizer(ModelArgs(model_name_or_path=str(tiny_checkpoint)))
    assert tok.pad_token == "<pad>"
    shutil.copy(tiny_checkpoint / "config.json", tmp_path / "config.json")
    tok.pad_token = None
    tok.save_pretrained(tmp_path)
    nopad = load_tokenizer(ModelArgs(model_name_or_path=str(tmp_path)))
    assert nopad.pad_token == nopad.eos_token == "</s>"


def test_lora_targets_all_and_list(tiny_checkpoint):
    base = load_model(ModelArgs(model_name_or_path=str(tiny_checkpoint), finetuning_type="full"))
    linear = {n.split(".")[-1] for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)} - {"lm_head"}
    assert all(p.requires_grad for p in base.parameters())

    model = load_model(ModelArgs(model_name_or_path=str(tiny_checkpoint), lora_rank=4))
    assert adapted_modules(model) == linear == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                 "down_proj"}
    params = lora_parameters(model)
    assert [n for n, _ in params] == [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(params) == 2 * 7 * 2  # A and B, 7 linears, 2 layers
    assert params[0][1].shape == (4, 64)
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)

    torch.manual_seed(123)  # a fresh adapter does not depend on the caller's random state
    twin = load_model(ModelArgs(model_name_or_path=str(tiny_checkpoint), lora_rank=4))
    for (n, p), (n2, p2) in zip(params, lora_parameters(twin)):
        assert n == n2 and torch.equal(p, p2)

    some = load_model(ModelArgs(model_name_or_path=str(tiny_checkpoint), lora_target=["q_proj", "v_proj"],
                                lora_rank=2))
    assert adapted_modules(some) == {"q_proj", "v_proj"}
    q = some.base_model.model.model.layers[0].self_attn.q_proj
    assert q.scaling["default"] == 2.0  # alpha defaults to 2 * rank
    with pytest.raises(FlexfeedError, match="qproj"):
        load_model(ModelArgs(model_name_or_path=str(tiny_checkpoint), lora_target="qproj"))


def test_adapter_save_and_reload_gives_same_outputs(tiny_checkpoint, tmp_path):
    args = ModelArgs(model_name_or_path=str(tiny_checkpoint), lora_rank=4, lora_target="q_proj,v_proj")
    model = load_model(args)
    torch.manual_seed(1)
    with torch.no_grad():
        for _, p in lora_parameters(model):
            p.add_(0.5 * torch.randn_like(p))  # B starts at zero: perturb so the adapter changes outputs
    model.eval()
    expected = logits(model)
    base = logits(load_model(ModelArgs(model_name_or_path=str(tiny_checkpoint)), trainable=False))
    assert not torch.allclose(expected, base, atol=1e-4)
    model.save_pretrained(tmp_path / "adapter")
    (tmp_path / "adapter" / "optimizer.pt").write_bytes(b"optimizer state of a Trainer checkpoint")

    reload_args = ModelArgs(model_name_or_path=str(tiny_checkpoint), adapter_name_or_path=str(tmp_path / "adapter"))
    frozen = load_model(reload_args, trainable=False)
    assert not frozen.training and not any(p.requires_grad for p in frozen.parameters())
    torch.testing.assert_close(logits(frozen), expected)
    again = load_model(reload_args)
    again.eval()
    torch.testing.assert_close(logits(again), expected)
    assert len(lora_parameters(again)) == 2 * 2 * 2

    ident = model_identity(reload_args)
    (tmp_path / "adapter" / "optimizer.pt").write_bytes(b"other optimizer state")
    assert model_identity(reload_args)["adapter"] == ident["adapter"]  # only adapter files count
    with torch.no_grad():
        lora_parameters(model)[0][1].add_(1.0)
    model.save_pretrained(tmp_path / "adapter")
    assert model_identity(reload_args)["adapter"] != ident["adapter"]


def test_model_identity_follows_weights_not_location(tiny_checkpoint, tmp_path):
    copy = shutil.copytree(tiny_checkpoint, tmp_path / "copy")
    ident = model_identity(ModelArgs(model_name_or_path=str(copy)))
    assert ident["weights"] == model_identity(ModelArgs(model_name_or_path=str(tiny_checkpoint)))["weights"]
    assert ident["adapter"] is None and ident["lora"] == {"rank": 8, "alpha": 16, "dropout": 0.0, "target": "all"}
    tok = load_tokenizer(ModelArgs(model_name_or_path=str(copy)))
    build_tiny_llama(tok, seed=1).save_pretrained(copy)
    changed = model_identity(ModelArgs(model_name_or_path=str(copy)))
    assert changed["weights"] != ident["weights"]
    assert model_identity(ModelArgs(model_name_or_path=str(copy), lora_rank=4)) != changed


def test_missing_model_path_and_config(tmp_path):
    with pytest.raises(FlexfeedError, match="does not exist"):
        load_model(ModelArgs(model_name_or_path=str(tmp_path / "nope")))
    with pytest.raises(FlexfeedError, match="config.json"):
        load_tokenizer(ModelArgs(model_name_or_path=str(tmp_path)))
    with pytest.raises(FlexfeedError, match="adapter_config.json"):
        (tmp_path / "config.json").write_text("{}")
        load_model(ModelArgs(model_name_or_path=str(tmp_path), adapter_name_or_path=str(tmp_path)))
    with pytest.raises(FlexfeedError, match="finetuning_type"):
        model_identity(ModelArgs(model_name_or_path=str(tmp_path), finetuning_type="freeze"))
