"""preprocessing_num_workers: tokenizing in several processes gives the ids of one process, in order."""

from __future__ import annotations

from stages import data as data_mod
from stages.args import ModelArgs
from stages.models import load_tokenizer


def test_processes_give_the_same_ids_in_the_same_order(tiny_checkpoint):
    tok = load_tokenizer(ModelArgs(model_name_or_path=str(tiny_checkpoint)))
    texts = [f"row {i}: " + "abc def " * (i % 7) for i in range(data_mod.TOKENIZE_CHUNK * 2 + 5)]
    one = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]  # one text at a time, no batching
    assert data_mod._tokenize(texts, tok, workers=3) == one
    assert data_mod._tokenize(texts, tok) == one
