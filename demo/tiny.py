"""Tiny Llama-style models and tokenizers made on the spot (the demo, the tests and the benchmarks).

Nothing is fetched from a model hub: the tokenizer is trained on the given texts, and the model
is built from a config with random weights. Saved with ``save_pretrained`` so every other part of
flexfeed loads it exactly like a real checkpoint.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

# A plain chat template in Jinja, so tiny models exercise the same `template` path as real ones.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n"
    "{% elif message['role'] == 'user' %}### User:\n{{ message['content'] }}\n"
    "{% else %}### Assistant:\n{{ message['content'] }}{{ eos_token }}\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}### Assistant:\n{% endif %}"
)

SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}

TINY_LLAMA = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6, tie_word_embeddings=False,
)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512, chat_template: str | None = CHAT_TEMPLATE):
    """A byte-level BPE tokenizer trained on ``texts``, wrapped as a fast HF tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL_TOKENS)
    fast.padding_side = "right"
    if chat_template:
        fast.chat_template = chat_template
    return fast


def build_tiny_llama(tokenizer, seed: int = 0, **overrides):
    """A randomly initialised LlamaForCausalLM sized by TINY_LLAMA (overridable)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(TINY_LLAMA, **overrides)
    config = LlamaConfig(
        vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, **cfg,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.eval()
    return model


def make_tiny_checkpoint(out_dir: str | os.PathLike, texts: Iterable[str], vocab_size: int = 512, seed: int = 0,
                         **overrides) -> Path:
    """Train a tokenizer, build a tiny model, save both to ``out_dir``; returns the path."""
    out = Path(out_dir)
    tokenizer = train_tokenizer(texts, vocab_size=vocab_size)
    model = build_tiny_llama(tokenizer, seed=seed, **overrides)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


SAMPLE_TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b\n",
    "Question: what is 12 plus 30? Answer: 42.",
    "Python is a programming language that lets you work quickly.",
    "import os\nprint(os.getcwd())\n",
    "Rivers flow to the sea and the sea returns the rain.",
    "for i in range(10):\n    print(i * i)\n",
    "The capital of France is Paris. The capital of Italy is Rome.",
] * 8
