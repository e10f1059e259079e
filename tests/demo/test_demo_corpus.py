"""The embedded demo corpus: domains, sizes, determinism, disjoint held-out sets, loadable by stages.data."""

from __future__ import annotations

import json

import numpy as np
import pytest

from demo.corpus import DOMAINS, MAX_CHARS, build_corpus, corpus_texts
from demo.tiny import train_tokenizer
from stages.args import DataArgs
from stages.batching import IGNORE_INDEX
from stages.data import load_data
from store.errors import FlexfeedError


def _rows(out, name: str) -> list[dict]:
    info = json.loads((out / "dataset_info.json").read_text())
    path = out / info[name]["file_name"]
    raw = path.read_text()
    return json.loads(raw) if path.suffix == ".json" else [json.loads(line) for line in raw.splitlines()]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return out, build_corpus(out, rows_per_domain=30, target_rows=12, seed=3, target_domain="instructions")


def test_domains_sizes_and_shapes(corpus):
    out, result = corpus
    assert result == {"datasets": list(DOMAINS), "target": "target", "val": [f"{d}_val" for d in DOMAINS],
                      "target_domain": "instructions", "dir": str(out)}
    info = json.loads((out / "dataset_info.json").read_text())
    for name in DOMAINS:
        train, pt, val = _rows(out, name), _rows(out, f"{name}_pt"), _rows(out, f"{name}_val")
        assert len(train) == len(pt) == 30 and len(val) == 20
        assert info[f"{name}_pt"]["columns"] == {"prompt": "text"}
        for row in train:
            assert set(row) == {"instruction", "input", "output"} and row["instruction"] and row["output"]
            assert len(row["instruction"]) + len(row["input"]) + len(row["output"]) <= MAX_CHARS + 60
        assert all(0 < len(r["text"]) <= MAX_CHARS + 60 for r in pt)
        # the pt twin holds the same passages: every answer appears in its full text
        assert all(row["output"] in p["text"] for row, p in zip(train, pt, strict=True))
    assert len(_rows(out, "target")) == len(_rows(out, "target_pt")) == 12
    # the domains really differ: code has `def`, pydoc prose does not start like code
    assert all(r["input"].startswith(("def ", "async def ")) for r in _rows(out, "stdlib_code"))
    assert all(r["instruction"] == "Continue the documentation:" for r in _rows(out, "pydoc"))
    assert all(r["output"].lstrip("-").isdigit() or "remainder" in r["output"] for r in _rows(out, "arithmetic"))


def test_held_out_sets_are_disjoint(corpus):
    out, _ = corpus
    key = lambda r: (r["instruction"], r["input"], r["output"])  # noqa: E731
    target = {key(r) for r in _rows(out, "target")}
    train = {key(r) for r in _rows(out, "instructions")}
    val = {key(r) for r in _rows(out, "instructions_val")}
    assert len(target) == 12 and not target & train and not target & val and not train & val
    for name in DOMAINS:
        assert not {key(r) for r in _rows(out, name)} & {key(r) for r in _rows(out, f"{name}_val")}


def test_deterministic_and_seeded(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    build_corpus(a, rows_per_domain=25, target_rows=5)
    build_corpus(b, rows_per_domain=25, target_rows=5)
    build_corpus(c, rows_per_domain=25, target_rows=5, seed=1)
    files = sorted(p.name for p in a.iterdir())
    assert files == sorted(p.name for p in b.iterdir())
    assert "target.json" in files and "arithmetic.jsonl" in files and "pydoc_val_pt.json" in files
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert (a / "arithmetic.jsonl").read_bytes() != (c / "arithmetic.jsonl").read_bytes()


def test_loads_with_stages_data(corpus):
    out, result = corpus
    texts = corpus_texts(out)
    assert len(texts) == 5 * (2 * 30 + 2 * 20) + 2 * 12
    tok = train_tokenizer(texts, vocab_size=500)
    sft = load_data(DataArgs(dataset=result["datasets"], dataset_dir=str(out), stage="sft", cutoff_len=128), tok)
    assert sft.domain_names == list(DOMAINS) and len(sft) == 150
    assert np.bincount(sft.domain_ids()).tolist() == [30] * 5
    for ids, labels in zip(sft.dataset["input_ids"][:: 10], sft.dataset["labels"][:: 10], strict=True):
        assert 0 < len(ids) <= 128
        assert labels[0] == IGNORE_INDEX and any(x != IGNORE_INDEX for x in labels)  # prompt masked, answer trained
    pt = load_data(DataArgs(dataset=[f"{d}_pt" for d in DOMAINS], dataset_dir=str(out), stage="pt",
                            cutoff_len=128), tok)
    assert len(pt) == 150 and all(x != IGNORE_INDEX for x in pt.dataset["labels"][0])
    held = load_data(DataArgs(dataset=[result["target"], *result["val"]], dataset_dir=str(out), stage="sft",
                              cutoff_len=128), tok)
    assert len(held) == 12 + 5 * 20


def test_bad_arguments(tmp_path):
    with pytest.raises(FlexfeedError, match="target_domain"):
        build_corpus(tmp_path, target_domain="poetry")
    with pytest.raises(FlexfeedError, match="rows_per_domain"):
        build_corpus(tmp_path, rows_per_domain=0)
    with pytest.raises(FlexfeedError, match="no dataset_info.json"):
        corpus_texts(tmp_path / "missing")
