"""Loading alpaca/sharegpt/pt data from every file type, label masking token by token, cutoff, domains."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stages.args import DataArgs, ModelArgs
from stages.data import bos_prefix, load_data, split_budget
from stages.models import load_tokenizer

EXTS = ["json", "jsonl", "csv", "parquet", "arrow"]
MASK = -100

ALPACA = [
    {"instruction": "What is 12 plus 30?", "input": "", "output": "42."},
    {"instruction": "Name a river.", "input": "In France.", "output": "The Seine flows to the sea."},
    {"instruction": "Say hi", "input": "", "output": "hi", "system": "Be brief."},
]
SHAREGPT = [
    {"conversations": [
        {"from": "system", "value": "Be nice."},
        {"from": "human", "value": "What is 12 plus 30?"}, {"from": "gpt", "value": "42."},
        {"from": "human", "value": "And plus 1?"}, {"from": "gpt", "value": "43."},
    ]},
    {"conversations": [{"from": "human", "value": "Capital of Italy?"}, {"from": "gpt", "value": "Rome."}]},
]
PT = [{"text": "The quick brown fox jumps over the lazy dog."}, {"text": "import os\nprint(os.getcwd())"}]


def write_rows(path: Path, rows: list[dict]) -> Path:
    """Write rows in the format named by the extension (csv cells holding lists as JSON text)."""
    ext = path.suffix[1:]
    if ext == "json":
        path.write_text(json.dumps(rows, indent=1))
    elif ext == "jsonl":
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    elif ext == "csv":
        import csv
        cols = list(dict.fromkeys(k for r in rows for k in r))
        with open(path, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=cols)
            w.writeheader()
            w.writerows([{k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()} for r in rows])
    else:
        cols = list(dict.fromkeys(k for r in rows for k in r))  # from_pylist would use the first row's keys only
        table = pa.table({k: [r.get(k) for r in rows] for k in cols})
        if ext == "parquet":
            pq.write_table(table, path)
        else:
            with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
                writer.write_table(table)
    return path


def make_dir(root: Path, entries: dict[str, tuple[dict, list[dict] | None]]) -> Path:
    """A dataset_dir with dataset_info.json {name: entry} and each entry's file written from rows."""
    root.mkdir(parents=True, exist_ok=True)
    for entry, rows in entries.values():
        if rows is not None:
            write_rows(root / entry["file_name"], rows)
    (root / "dataset_info.json").write_text(json.dumps({n: e for n, (e, _) in entries.items()}))
    return root


@pytest.fixture(scope="module")
def tok(tiny_checkpoint):
    return load_tokenizer(ModelArgs(model_name_or_path=str(tiny_checkpoint)))


def enc(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def expect(tok, pieces: list[tuple[str, bool]], bos: list[int]) -> tuple[list[int], list[int]]:
    """Independent expectation: tokenize each hand-written piece; trained pieces keep their ids."""
    ids, labels = list(bos), [MASK] * len(bos)
    for text, trained in pieces:
        t = enc(tok, text)
        ids += t
        labels += t if trained else [MASK] * len(t)
    return ids, labels


def default_pieces(tok, user: str, answer: str, system: str | None = None, first: bool = True):
    head = (system + "\n\n" if system else "") + ("" if first else "\n")
    return [(head + f"### User:\n{user}\n### Assistant:\n", False), (answer + tok.eos_token, True)]


def check_rows(td, tok, expected_pieces):
    assert len(td) == len(expected_pieces)
    bos = bos_prefix(tok)
    for i, pieces in enumerate(expected_pieces):
        row = td.dataset[i]
        ids, labels = expect(tok, pieces, bos)
        assert row["input_ids"] == ids, i
        assert row["labels"] == labels, i
        assert row["text"] == "".join(t for t, _ in pieces)


def alpaca_expected(tok):
    return [
        default_pieces(tok, "What is 12 plus 30?", "42."),
        default_pieces(tok, "Name a river.\nIn France.", "The Seine flows to the sea."),
        default_pieces(tok, "Say hi", "hi", system="Be brief."),
    ]


def sharegpt_expected(tok):
    return [
        default_pieces(tok, "What is 12 plus 30?", "42.", system="Be nice.")
        + default_pieces(tok, "And plus 1?", "43.", first=False),
        default_pieces(tok, "Capital of Italy?", "Rome."),
    ]


@pytest.mark.parametrize("ext", EXTS)
def test_alpaca_sft_masks_prompt_from_every_file_type(tmp_path, tok, ext):
    d = make_dir(tmp_path, {"a": ({"file_name": f"a.{ext}", "columns": {"system": "system"}}, ALPACA)})
    td = load_data(DataArgs(dataset=["a"], dataset_dir=str(d), template="default"), tok)
    check_rows(td, tok, alpaca_expected(tok))


@pytest.mark.parametrize("ext", EXTS)
def test_sharegpt_trains_every_assistant_turn(tmp_path, tok, ext):
    d = make_dir(tmp_path, {"s": ({"file_name": f"s.{ext}", "formatting": "sharegpt"}, SHAREGPT)})
    td = load_data(DataArgs(dataset="s", dataset_dir=str(d), template="default"), tok)
    check_rows(td, tok, sharegpt_expected(tok))
    row = td.dataset[0]
    trained = [t for t, lab in zip(row["input_ids"], row["labels"]) if lab != MASK]
    assert trained == enc(tok, "42." + tok.eos_token) + enc(tok, "43." + tok.eos_token)


@pytest.mark.parametrize("ext", EXTS)
def test_pt_trains_every_token(tmp_path, tok, ext):
    d = make_dir(tmp_path, {"p": ({"file_name": f"p.{ext}", "columns": {"prompt": "text"}}, PT)})
    td = load_data(DataArgs(dataset=["p"], dataset_dir=str(d), stage="pt"), tok)
    for i, raw in enumerate(PT):
        row = td.dataset[i]
        assert row["input_ids"] == bos_prefix(tok) + enc(tok, raw["text"]) + [tok.eos_token_id]
        assert row["labels"] == row["input_ids"]
        assert row["text"] == raw["text"] + tok.eos_token


def test_chat_template_boundaries_from_prefix_renders(tmp_path, tok):
    # demo.tiny's chat template, written out by hand: the assistant part is "{answer}</s>\n"
    d = make_dir(tmp_path, {"a": ({"file_name": "a.jsonl"}, ALPACA[:2]),
                            "s": ({"file_name": "s.jsonl", "formatting": "sharegpt"}, SHAREGPT[:1])})
    eos = tok.eos_token
    td = load_data(DataArgs(dataset=["a", "s"], dataset_dir=str(d), template="chat"), tok)
    check_rows(td, tok, [
        [("### User:\nWhat is 12 plus 30?\n### Assistant:\n", False), (f"42.{eos}\n", True)],
        [("### User:\nName a river.\nIn France.\n### Assistant:\n", False), (f"The Seine flows to the sea.{eos}\n", True)],
        [("Be nice.\n### User:\nWhat is 12 plus 30?\n### Assistant:\n", False), (f"42.{eos}\n", True),
         ("### User:\nAnd plus 1?\n### Assistant:\n", False), (f"43.{eos}\n", True)],
    ])
    auto = load_data(DataArgs(dataset=["a", "s"], dataset_dir=str(d), template=None), tok)
    assert auto.fingerprint == td.fingerprint  # the tiny tokenizer has a chat template: auto picks it


def test_history_and_custom_sharegpt_tags(tmp_path, tok):
    rows_a = [{"instruction": "q2", "output": "a2", "history": [["q1", "a1"]]}]
    rows_s = [{"messages": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"}]}]
    tags = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}
    d = make_dir(tmp_path, {
        "h": ({"file_name": "h.json", "columns": {"history": "history"}}, rows_a),
        "o": ({"file_name": "o.json", "formatting": "sharegpt", "columns": {"messages": "messages"}, "tags": tags},
              rows_s),
    })
    td = load_data(DataArgs(dataset=["h", "o"], dataset_dir=str(d), template="default"), tok)
    check_rows(td, tok, [default_pieces(tok, "q1", "a1") + default_pieces(tok, "q2", "a2", first=False),
                         default_pieces(tok, "q1", "a1")])


def test_folder_of_files_and_saved_dataset(tmp_path, tok):
    import datasets

    folder = tmp_path / "d" / "parts"
    folder.mkdir(parents=True)
    write_rows(folder / "0.jsonl", ALPACA[:2])
    write_rows(folder / "1.jsonl", ALPACA[2:])
    cols = list(dict.fromkeys(k for r in ALPACA for k in r))
    datasets.Dataset.from_dict({k: [r.get(k) for r in ALPACA] for k in cols}).save_to_disk(str(tmp_path / "d" / "saved"))
    d = make_dir(tmp_path / "d", {"f": ({"file_name": "parts", "columns": {"system": "system"}}, None),
                                  "s": ({"file_name": "saved", "columns": {"system": "system"}}, None)})
    for name in ("f", "s"):
        check_rows(load_data(DataArgs(dataset=[name], dataset_dir=str(d), template="default"), tok), tok,
                   alpaca_expected(tok))


def test_split_budget_rule():
    assert split_budget(5, 5, 20) == (5, 5)          # fits
    assert split_budget(30, 4, 20) == (16, 4)        # short response kept whole
    assert split_budget(6, 30, 20) == (6, 14)        # short prompt kept whole
    assert split_budget(30, 30, 21) == (10, 11)      # both long: halves


def test_cutoff_len_keeps_labels_aligned(tmp_path, tok):
    long_q, long_a = "word " * 40, "answer " * 40
    d = make_dir(tmp_path, {"a": ({"file_name": "a.jsonl"}, [{"instruction": long_q, "output": long_a},
                                                              {"instruction": "hi", "output": long_a}]),
                            "p": ({"file_name": "p.jsonl", "columns": {"prompt": "text"}}, PT)})
    full = load_data(DataArgs(dataset=["a"], dataset_dir=str(d), template="default"), tok)
    cut = load_data(DataArgs(dataset=["a"], dataset_dir=str(d), template="default", cutoff_len=30), tok)
    for i in range(2):
        f, c = full.dataset[i], cut.dataset[i]
        n_prompt = f["labels"].index(next(lab for lab in f["labels"] if lab != MASK))
        keep_p, keep_r = split_budget(n_prompt, len(f["labels"]) - n_prompt, 30)
        assert len(c["input_ids"]) == 30 == keep_p + keep_r
        assert c["input_ids"] == f["input_ids"][:keep_p] + f["input_ids"][n_prompt:n_prompt + keep_r]
        assert c["labels"] == [MASK] * keep_p + f["labels"][n_prompt:n_prompt + keep_r]
    pt_full = load_data(DataArgs(dataset=["p"], dataset_dir=str(d), stage="pt"), tok)
    pt_cut = load_data(DataArgs(dataset=["p"], dataset_dir=str(d), stage="pt", cutoff_len=5), tok)
    assert pt_cut.dataset[0]["input_ids"] == pt_full.dataset[0]["input_ids"][:5] == pt_cut.dataset[0]["labels"]


def test_two_domains_max_samples_and_rows(tmp_path, tok):
    d = make_dir(tmp_path, {"a": ({"file_name": "a.json"}, ALPACA),
                            "s": ({"file_name": "s.json", "formatting": "sharegpt"}, SHAREGPT)})
    td = load_data(DataArgs(dataset="s,a", dataset_dir=str(d), template="default", max_samples=2), tok)
    assert td.domain_names == ["s", "a"]
    assert td.domain_ids().tolist() == [0, 0, 1, 1]
    rows = td.rows(1, 3)
    assert rows["domain"] == [0, 1] and set(rows) == {"input_ids", "labels", "text", "domain"}
    assert rows["text"][1].startswith("### User:\nWhat is 12 plus 30?")  # first alpaca row, in file order
    one = load_data(DataArgs(dataset=["a"], dataset_dir=str(d), template="default", max_samples=1), tok)
    assert len(one) == 1 and one.domain_ids().tolist() == [0]


def test_num_samples_is_a_reproducible_subset(tmp_path, tok):
    rows = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(10)]
    d = make_dir(tmp_path, {"a": ({"file_name": "a.jsonl", "num_samples": 4}, rows),
                            "b": ({"file_name": "a.jsonl", "num_samples": 13}, None)})
    one = load_data(DataArgs(dataset=["a"], dataset_dir=str(d), template="default"), tok)
    two = load_data(DataArgs(dataset=["a"], dataset_dir=str(d), template="default"), tok)
    assert len(one) == 4 and one.fingerprint == two.fingerprint
    assert len(set(one.dataset["text"])) == 4
    many = load_data(DataArgs(dataset=["b"], dataset_dir=str(d), template="default"), tok)
    assert len(many) == 13 and len(set(many.dataset["text"])) == 10


FINGERPRINT_SCRIPT = """
import sys
from stages.args import DataArgs, ModelArgs
from stages.data import load_data
from stages.models import load_tokenizer
tok = load_tokenizer(ModelArgs(model_name_or_path=sys.argv[1]))
print(load_data(DataArgs(dataset=["a", "s"], dataset_dir=sys.argv[2]), tok).fingerprint)
"""


def test_fingerprint_same_in_another_process_and_follows_content(tmp_path, tok, tiny_checkpoint):
    d = make_dir(tmp_path / "one", {"a": ({"file_name": "a.jsonl"}, ALPACA),
                                    "s": ({"file_name": "s.parquet", "formatting": "sharegpt"}, SHAREGPT)})
    here = load_data(DataArgs(dataset=["a", "s"], dataset_dir=str(d)), tok).fingerprint
    out = subprocess.run([sys.executable, "-c", FINGERPRINT_SCRIPT, str(tiny_checkpoint), str(d)],
                         capture_output=True, text=True, check=True, cwd=Path(__file__).parents[2])
    assert out.stdout.strip().splitlines()[-1] == here
    # other file names and formats, same content: same fingerprint
    moved = make_dir(tmp_path / "two", {"a": ({"file_name": "renamed.csv"}, ALPACA),
                                        "s": ({"file_name": "x.json", "formatting": "sharegpt"}, SHAREGPT)})
    assert load_data(DataArgs(dataset=["a", "s"], dataset_dir=str(moved)), tok).fingerprint == here
    changed = [dict(ALPACA[0]), *ALPACA[1:]]
    changed[0]["output"] = "43."
    write_rows(moved / "renamed.csv", changed)
    assert load_data(DataArgs(dataset=["a", "s"], dataset_dir=str(moved)), tok).fingerprint != here
    assert load_data(DataArgs(dataset=["a", "s"], dataset_dir=str(d), cutoff_len=8), tok).fingerprint != here
