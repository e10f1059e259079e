"""Bad data gives one FlexfeedError that names the file, the row and the column, with a hint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from demo.tiny import SAMPLE_TEXTS, train_tokenizer
from stages.args import DataArgs
from stages.data import load_data
from store.errors import FlexfeedError

GOOD = {"instruction": "q", "output": "a"}


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(SAMPLE_TEXTS[:8], vocab_size=270)


def setup_dir(root: Path, file_name: str, text: str | None, entry: dict | None = None) -> Path:
    if text is not None:
        (root / file_name).write_text(text)
    (root / "dataset_info.json").write_text(json.dumps({"mydata": {"file_name": file_name, **(entry or {})}}))
    return root


def error_of(root: Path, tok, **kw) -> FlexfeedError:
    args = DataArgs(dataset=kw.pop("dataset", ["mydata"]), dataset_dir=str(root), template="default", **kw)
    with pytest.raises(FlexfeedError) as info:
        load_data(args, tok)
    assert info.value.hint, "every data error carries a hint"
    return info.value


def jsonl(*rows) -> str:
    return "\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n"


def test_missing_dataset_info(tmp_path, tok):
    err = error_of(tmp_path, tok)
    assert "dataset_info.json" in err.message and str(tmp_path) in err.message


def test_unknown_dataset_name_suggests_close_one(tmp_path, tok):
    setup_dir(tmp_path, "d.jsonl", jsonl(GOOD))
    err = error_of(tmp_path, tok, dataset=["mydta"])
    assert "'mydta'" in err.message and "mydata" in err.hint


def test_missing_file_and_unsupported_extension(tmp_path, tok):
    setup_dir(tmp_path, "nothere.jsonl", None)
    assert "nothere.jsonl" in error_of(tmp_path, tok).message
    setup_dir(tmp_path, "d.txt", "q a")
    err = error_of(tmp_path, tok)
    assert "d.txt" in err.message and "'.txt'" in err.message and ".parquet" in err.hint


@pytest.mark.parametrize("text, row, what", [
    (jsonl(GOOD, GOOD, '{"instruction": "q", "output": "trunc'), 3, "invalid JSON"),
    (jsonl(GOOD, [1, 2]), 2, "expected an object"),
])
def test_malformed_jsonl_row(tmp_path, tok, text, row, what):
    setup_dir(tmp_path, "d.jsonl", text)
    err = error_of(tmp_path, tok)
    assert f"d.jsonl, row {row}" in err.message and what in err.message


def test_truncated_json_array_names_row(tmp_path, tok):
    setup_dir(tmp_path, "d.json", json.dumps([GOOD, GOOD, GOOD])[:-30])
    err = error_of(tmp_path, tok)
    assert "d.json, row 3" in err.message


def test_missing_column_names_file_row_and_column(tmp_path, tok):
    setup_dir(tmp_path, "d.jsonl", jsonl(GOOD, GOOD, {"instruction": "q", "answer": "a"}))
    err = error_of(tmp_path, tok)
    assert "d.jsonl, row 3, column 'output'" in err.message and "missing" in err.message
    assert "columns" in err.hint


def test_number_where_text_expected(tmp_path, tok):
    setup_dir(tmp_path, "d.jsonl", jsonl(GOOD, {"instruction": "q", "output": 42}))
    err = error_of(tmp_path, tok)
    assert "d.jsonl, row 2, column 'output'" in err.message and "int" in err.message


def test_csv_pt_column_mapped_but_absent(tmp_path, tok):
    setup_dir(tmp_path, "d.csv", "body\nhello\n", {"columns": {"prompt": "text"}})
    err = error_of(tmp_path, tok, stage="pt")
    assert "d.csv, row 1, column 'text'" in err.message


def test_sharegpt_turn_order_and_roles(tmp_path, tok):
    conv = [{"from": "human", "value": "q"}, {"from": "human", "value": "q"}]
    setup_dir(tmp_path, "d.jsonl", jsonl({"conversations": conv}), {"formatting": "sharegpt"})
    err = error_of(tmp_path, tok)
    assert "d.jsonl, row 1, column 'conversations'" in err.message and "turn 1" in err.message
    conv = [{"from": "user", "value": "q"}, {"from": "gpt", "value": "a"}]
    setup_dir(tmp_path, "d.jsonl", jsonl({"conversations": conv}), {"formatting": "sharegpt"})
    err = error_of(tmp_path, tok)
    assert "role 'user'" in err.message and "tags" in err.hint


def test_empty_dataset_and_bad_settings(tmp_path, tok):
    setup_dir(tmp_path, "d.jsonl", "\n")
    assert "no rows" in error_of(tmp_path, tok).message
    setup_dir(tmp_path, "d.jsonl", jsonl(GOOD), {"formatting": "openai"})
    assert "formatting" in error_of(tmp_path, tok).message
    setup_dir(tmp_path, "d.jsonl", jsonl(GOOD), {"columns": {"promt": "q"}})
    assert "'prompt'" in error_of(tmp_path, tok).hint
    with pytest.raises(FlexfeedError, match="stage"):  # DataArgs refuses it when built
        DataArgs(dataset=["mydata"], dataset_dir=str(tmp_path), stage="dpo")


def test_chat_template_requested_without_one(tmp_path):
    setup_dir(tmp_path, "d.jsonl", jsonl(GOOD))
    plain = train_tokenizer(SAMPLE_TEXTS[:8], vocab_size=270, chat_template=None)
    with pytest.raises(FlexfeedError, match="no chat template"):
        load_data(DataArgs(dataset=["mydata"], dataset_dir=str(tmp_path), template="chat"), plain)
    # unset template falls back to the plain default template
    td = load_data(DataArgs(dataset=["mydata"], dataset_dir=str(tmp_path)), plain)
    assert td.dataset[0]["text"] == "### User:\nq\n### Assistant:\na" + plain.eos_token
