"""LLaMA-Factory's named templates: rendered text and trained/masked parts, written out by hand from
LLaMA-Factory 0.9.5's template definitions; efficient_eos labels; special tokens added to tokenizer and model."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from stages.args import DataArgs, ModelArgs
from stages.conversations import Conversation
from stages.data import load_data
from stages.models import load_model, load_tokenizer, model_identity
from stages.templates import TEMPLATES, render, template_special_tokens
from store.errors import FlexfeedError

TOK = SimpleNamespace(bos_token="<s>", bos_token_id=1, eos_token="</s>", eos_token_id=2)
CONV = Conversation(system="Be brief.", messages=[
    {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
])
M, T = False, True  # masked, trained
CHATML = [
    ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", M),
    ("Hello!<|im_end|>\n", T),
    ("<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n", M),
    ("4<|im_end|>\n", T),
]
EXPECTED = {
    "lf_default": [("System: Be brief.</s>\nHuman: Hi</s>\nAssistant:", M), ("Hello!</s>\n", T),
                   ("Human: 2+2?</s>\nAssistant:", M), ("4</s>\n", T)],
    "empty": [("Be brief.Hi", M), ("Hello!", T), ("2+2?", M), ("4", T)],
    "alpaca": [("Be brief.### Instruction:\nHi\n\n### Response:\n", M), ("Hello!</s>\n\n", T),
               ("### Instruction:\n2+2?\n\n### Response:\n", M), ("4</s>\n\n", T)],
    "vicuna": [("Be brief.USER: Hi ASSISTANT:", M), ("Hello!</s>", T), ("USER: 2+2? ASSISTANT:", M), ("4</s>", T)],
    "chatml": CHATML,
    "qwen": CHATML,
    "qwen3_nothink": CHATML,
    "qwen3": [
        ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
         "<think>\n\n</think>\n\n", M),
        ("Hello!<|im_end|>\n", T),
        ("<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n", M),
        ("4<|im_end|>\n", T),
    ],
    "llama2": [("<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST]", M), ("Hello!</s>", T),
               ("<s>[INST] 2+2? [/INST]", M), ("4</s>", T)],
    "llama3": [
        ("<s><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
         "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n", M),
        ("Hello!<|eot_id|>", T),
        ("<|start_header_id|>user<|end_header_id|>\n\n2+2?<|eot_id|>"
         "<|start_header_id|>assistant<|end_header_id|>\n\n", M),
        ("4<|eot_id|>", T),
    ],
    "mistral": [("<s>[INST] Be brief.\n\nHi[/INST]", M), (" Hello!</s>", T), ("[INST] 2+2?[/INST]", M), (" 4</s>", T)],
    "gemma": [("<s><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n", M),
              ("Hello!<end_of_turn>\n", T),
              ("<start_of_turn>user\n2+2?<end_of_turn>\n<start_of_turn>model\n", M), ("4<end_of_turn>\n", T)],
    "phi": [("<|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\n", M), ("Hello!<|end|>\n", T),
            ("<|user|>\n2+2?<|end|>\n<|assistant|>\n", M), ("4<|end|>\n", T)],
    "deepseek": [("<s>Be brief.\n\nUser: Hi\n\nAssistant:", M), ("Hello!</s>", T),
                 ("User: 2+2?\n\nAssistant:", M), ("4</s>", T)],
    # efficient_eos: no eos in the text; stages.data ends the row with it (test below)
    "glm4": [("[gMASK]<sop><|system|>\nBe brief.<|user|>\nHi<|assistant|>", M), ("\nHello!", T),
             ("<|user|>\n2+2?<|assistant|>", M), ("\n4", T)],
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_two_turns_with_system(name):
    assert render(CONV, name, TOK) == EXPECTED[name]


def test_every_named_template_is_tested():
    assert set(TEMPLATES) - {"default", "chat"} == set(EXPECTED)


@pytest.mark.parametrize("name,first_prompt", [
    ("alpaca", "Below is an instruction that describes a task. Write a response that appropriately completes "
               "the request.\n\n### Instruction:\nHi\n\n### Response:\n"),
    ("vicuna", "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
               "helpful, detailed, and polite answers to the user's questions.USER: Hi ASSISTANT:"),
    ("qwen", "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
             "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"),
    ("chatml", "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"),
    ("llama2", "<s>[INST] Hi [/INST]"),
    ("glm4", "[gMASK]<sop><|user|>\nHi<|assistant|>"),
])
def test_default_system_when_the_row_has_none(name, first_prompt):
    conv = Conversation(messages=CONV.messages[:2])
    assert render(conv, name, TOK)[0] == (first_prompt, M)


def test_qwen3_drops_thoughts_with_thinking_off():
    conv = Conversation(messages=[{"role": "user", "content": "Hi"},
                                  {"role": "assistant", "content": "<think>\nhmm\n</think>\n\nHello!"}])
    assert render(conv, "qwen3", TOK) == [
        ("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n", M),
        ("Hello!<|im_end|>\n", T)]


def test_named_templates_refuse_tools():
    with pytest.raises(FlexfeedError, match="tools"):
        render(Conversation(messages=CONV.messages[:2], tools="[]x"), "llama3", TOK)


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(FlexfeedError) as err:
        DataArgs(template="llama33")
    assert "did you mean 'llama3'?" in str(err.value)
    for name in ("default", "chat", "lf_default", "qwen3", "glm4", "mistral"):
        assert name in err.value.hint


def _sharegpt_dir(root):
    rows = [{"conversations": [{"from": "system", "value": "Be brief."},
                               {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"},
                               {"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}]}]
    root.mkdir()
    (root / "chat.json").write_text(json.dumps(rows))
    (root / "dataset_info.json").write_text(json.dumps({"chat": {"file_name": "chat.json", "formatting": "sharegpt"}}))
    return str(root)


def test_glm4_efficient_eos_labels(tiny_checkpoint, tmp_path):
    margs = ModelArgs(model_name_or_path=str(tiny_checkpoint), new_special_tokens=template_special_tokens("glm4"))
    tok = load_tokenizer(margs)
    data = load_data(DataArgs(dataset=["chat"], dataset_dir=_sharegpt_dir(tmp_path / "d"), template="glm4"), tok)

    def enc(text):
        return tok(text, add_special_tokens=False)["input_ids"]

    p0, r0 = enc("[gMASK]<sop><|system|>\nBe brief.<|user|>\nHi<|assistant|>"), enc("\nHello!")
    p1, r1 = enc("<|user|>\n2+2?<|assistant|>"), enc("\n4")
    eos = tok.eos_token_id
    row = data.rows(0, 1)
    assert row["input_ids"][0] == p0 + r0 + p1 + r1 + [eos]
    # LLaMA-Factory: a later prompt's first label is eos (it ends the response before it), and the row ends in eos
    assert row["labels"][0] == [-100] * len(p0) + r0 + [eos] + [-100] * (len(p1) - 1) + r1 + [eos]
    assert enc("<|user|>") == [tok.convert_tokens_to_ids("<|user|>")]  # added as one special token


def test_llama3_rows_write_their_own_bos(tiny_checkpoint, tmp_path):
    margs = ModelArgs(model_name_or_path=str(tiny_checkpoint), new_special_tokens=template_special_tokens("llama3"))
    tok = load_tokenizer(margs)
    data = load_data(DataArgs(dataset=["chat"], dataset_dir=_sharegpt_dir(tmp_path / "d"), template="llama3"), tok)
    ids, labels = data.rows(0, 1)["input_ids"][0], data.rows(0, 1)["labels"][0]
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    assert ids[:len(bos) + 1] == bos + [tok.convert_tokens_to_ids("<|start_header_id|>")]
    trained = [i for i, lab in zip(ids, labels) if lab != -100]
    assert trained == tok("Hello!<|eot_id|>4<|eot_id|>", add_special_tokens=False)["input_ids"]


def test_missing_special_tokens_are_added_and_embeddings_resized(tiny_checkpoint, caplog, monkeypatch):
    monkeypatch.setattr("stages.models._told", set())
    plain = load_tokenizer(ModelArgs(model_name_or_path=str(tiny_checkpoint)))
    tokens = template_special_tokens("llama3")
    assert tokens == ["<|eot_id|>", "<|eom_id|>", "<|start_header_id|>", "<|end_header_id|>"]
    assert not set(tokens) & set(plain.get_vocab())
    margs = ModelArgs(model_name_or_path=str(tiny_checkpoint), finetuning_type="full", new_special_tokens=tokens)
    with caplog.at_level("WARNING", logger="stages.models"):
        tok = load_tokenizer(margs)
    assert len(tok) == len(plain) + 4
    assert all(len(tok(t, add_special_tokens=False)["input_ids"]) == 1 for t in tokens)
    assert sum("added 4 special token(s)" in r.getMessage() for r in caplog.records) == 1
    model = load_model(margs)
    assert model.get_input_embeddings().weight.shape[0] == len(tok)
    assert model.get_output_embeddings().weight.shape[0] == len(tok)
    twin = load_model(margs)  # new rows seeded: every process builds the same model
    assert (twin.get_input_embeddings().weight == model.get_input_embeddings().weight).all()
    # the added tokens are part of the model's identity (and absent, as before, when there are none)
    assert model_identity(margs)["new_special_tokens"] == tokens
    assert "new_special_tokens" not in model_identity(ModelArgs(model_name_or_path=str(tiny_checkpoint)))
