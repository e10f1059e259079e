"""Per-sample LoRA gradients from one batched backward equal a batch-size-1 loss.backward() loop."""

from __future__ import annotations

import pytest
import torch

from stages.batching import pad_batch
from stages.grads.hooks import per_sample_grads, trainable_linears
from store.errors import FlexfeedError

ATTN = ["q_proj", "v_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]


def lora_model(checkpoint, targets, rank=4, seed=0):
    """A tiny Llama with LoRA on ``targets``; B random (not zero) so every LoRA weight has a gradient."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(checkpoint, attn_implementation="eager")
    torch.manual_seed(seed)
    model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets,
                                            init_lora_weights=False))
    model.eval()
    return model


def loop_grads(model, rows, labels):
    """Reference: one unpadded forward + loss.backward() per row (HF's token-mean loss)."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    out = []
    for ids, lab in zip(rows, labels):
        model.zero_grad(set_to_none=True)
        model(input_ids=torch.tensor([ids]), labels=torch.tensor([lab])).loss.backward()
        out.append({n: p.grad.detach().clone() for n, p in params})
    model.zero_grad(set_to_none=True)
    return out


def max_rel_err(batched: dict, loop: list[dict]) -> float:
    """Largest max|batched - loop| / max|loop| over samples and parameters."""
    worst = 0.0
    for i, ref in enumerate(loop):
        for name, g in ref.items():
            worst = max(worst, float((batched[name][i] - g).abs().max() / g.abs().max()))
    return worst


def make_rows(vocab, lengths, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rows = [torch.randint(5, vocab, (n,), generator=gen).tolist() for n in lengths]
    labels = [list(r) for r in rows]
    labels[0][: max(1, len(rows[0]) // 3)] = [-100] * max(1, len(rows[0]) // 3)  # an sft-style masked prompt
    return rows, labels


@pytest.mark.parametrize("targets", [ATTN, MLP], ids=["attn", "mlp"])
@pytest.mark.parametrize("lengths", [[7, 12, 5, 16], [9, 9, 9]], ids=["padded", "unpadded"])
def test_batched_equals_loop(tiny_checkpoint, targets, lengths):
    model = lora_model(tiny_checkpoint, targets)
    rows, labels = make_rows(model.config.vocab_size, lengths)
    batch = pad_batch(rows, labels, pad_id=0)
    got = per_sample_grads(model, batch)
    ref = loop_grads(model, rows, labels)
    assert set(got) == set(ref[0])
    assert all(g.shape == (len(rows), *ref[0][n].shape) for n, g in got.items())
    assert all(float(ref[0][n].abs().max()) > 0 for n in ref[0])  # nothing trivially zero
    assert max_rel_err(got, ref) <= 1e-4
    # the batched path leaves the parameters' own .grad untouched (a live trainer's grads survive)
    assert all(p.grad is None for p in model.parameters())


def test_padding_content_does_not_leak(tiny_checkpoint):
    model = lora_model(tiny_checkpoint, ATTN)
    rows, labels = make_rows(model.config.vocab_size, [4, 11])
    a = per_sample_grads(model, pad_batch(rows, labels, pad_id=0))
    b = per_sample_grads(model, pad_batch(rows, labels, pad_id=7))
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-7)


def test_refuses_non_linear_trainable_params(tiny_checkpoint):
    model = lora_model(tiny_checkpoint, ATTN)
    model.base_model.model.model.norm.weight.requires_grad_(True)
    with pytest.raises(FlexfeedError, match="trainable linear weights only"):
        trainable_linears(model)


def test_unreached_weight_gets_zero_gradient(tiny_checkpoint):
    # with LoRA's usual zero-initialised B, A's gradient is exactly zero; it must still be reported
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_checkpoint), LoraConfig(r=2, target_modules=ATTN))
    rows, labels = make_rows(model.config.vocab_size, [6, 8])
    got = per_sample_grads(model, pad_batch(rows, labels))
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(got)
    a_names = [n for n in got if "lora_A" in n]
    assert a_names and all(float(got[n].abs().max()) == 0.0 for n in a_names)
    ref = loop_grads(model, rows, labels)
    b_err = max(float((got[n][i] - ref[i][n]).abs().max() / ref[i][n].abs().max())
                for i in range(2) for n in got if "lora_B" in n)
    assert b_err <= 1e-4
