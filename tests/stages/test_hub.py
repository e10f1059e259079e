"""Hub ids, offline: a Hugging Face cache laid out as huggingface_hub writes it (blobs, refs, snapshots of
symlinks), made on the spot from the tiny checkpoint and a few rows."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from stages import hub
from stages.args import DataArgs, LossArgs, ModelArgs
from stages.data import load_data
from stages.loss import LossStage
from stages.models import load_model, load_tokenizer, model_identity, model_sources, resolve_model_args
from store.errors import FlexfeedError
from store.hashing import canonical_json, stable_hash

SHA_1 = "1" * 40
SHA_2 = "2" * 40
ROWS = [{"q": f"What is {i} plus {i}?", "a": f"It is {2 * i}.", "extra": i} for i in range(7)]
SMALL_ROWS = [{"q": f"small {i}", "a": f"answer {i}"} for i in range(3)]
TEST_ROWS = [{"q": f"test {i}", "a": f"result {i}"} for i in range(2)]


def add_snapshot(cache: Path, repo_folder: str, sha: str, files: dict[str, bytes], ref: str | None = "main") -> Path:
    """Write ``files`` as huggingface_hub does: each in blobs/ once, linked from snapshots/<sha>/; ref -> sha."""
    root = cache / repo_folder
    snapshot = root / "snapshots" / sha
    for rel, data in files.items():
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    if ref is not None:
        (root / "refs").mkdir(exist_ok=True)
        (root / "refs" / ref).write_text(sha)  # no newline, as huggingface_hub writes it
    return snapshot


def folder_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty hub cache in HF_HUB_CACHE, offline, a datasets cache of its own, nothing resolved yet."""
    import datasets

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("USE_MODELSCOPE_HUB", raising=False)
    # `datasets` reads its cache folder when imported; flexfeed reads the hub's env when it resolves
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets_cache")
    monkeypatch.setattr(hub, "_RESOLVED", {})
    (tmp_path / "hub").mkdir()
    return tmp_path / "hub"


@pytest.fixture
def tiny_repo(cache, tiny_checkpoint):
    """`org/tiny` at SHA_1 (refs/main) holding the tiny checkpoint's files."""
    return add_snapshot(cache, "models--org--tiny", SHA_1, folder_files(tiny_checkpoint))


def logits(model, tokenizer):
    ids = tokenizer("What is 3 plus 3?", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_hub_id_loads_the_cached_snapshot_like_the_folder(tiny_repo, tiny_checkpoint, tmp_path):
    by_id = ModelArgs(model_name_or_path="org/tiny", finetuning_type="full")
    by_folder = ModelArgs(model_name_or_path=str(tiny_checkpoint), finetuning_type="full")
    assert resolve_model_args(by_id).model_name_or_path == str(tiny_repo)
    tok_id, tok_folder = load_tokenizer(by_id), load_tokenizer(by_folder)
    assert tok_id("a b c")["input_ids"] == tok_folder("a b c")["input_ids"]
    torch.testing.assert_close(logits(load_model(by_id, trainable=False), tok_id),
                               logits(load_model(by_folder, trainable=False), tok_folder), rtol=0, atol=0)
    assert model_sources(by_id) == {"model": str(tiny_repo)}


def test_key_holds_the_commit_not_a_path_and_follows_refs_main(tiny_repo, tiny_checkpoint, cache, tmp_path):
    args = ModelArgs(model_name_or_path="org/tiny")
    first = LossStage(args, LossArgs()).signal()
    assert first.spec["model"]["weights"] == f"hf:org/tiny@{SHA_1}"
    assert str(tmp_path) not in canonical_json(first.spec)
    # the same files at another commit; refs/main moves there (a later download of main)
    add_snapshot(cache, "models--org--tiny", SHA_2, folder_files(tiny_checkpoint))
    hub.forget_resolved()
    second = LossStage(args, LossArgs()).signal()
    assert second.spec["model"]["weights"] == f"hf:org/tiny@{SHA_2}"
    assert stable_hash(second.spec) != stable_hash(first.spec)
    # a pinned revision keeps the old commit; the snapshot folder given directly is the same model
    pinned = model_identity(ModelArgs(model_name_or_path="org/tiny", model_revision=SHA_1))
    assert pinned == model_identity(ModelArgs(model_name_or_path=str(tiny_repo)))
    assert pinned["weights"] == f"hf:org/tiny@{SHA_1}"
    # a copy of the snapshot's files elsewhere is keyed by their content, like any folder
    copy = shutil.copytree(tiny_repo, tmp_path / "copy")
    assert model_identity(ModelArgs(model_name_or_path=str(copy)))["weights"] == \
        model_identity(ModelArgs(model_name_or_path=str(tiny_checkpoint)))["weights"]


def test_hub_adapter_id_resolves_at_the_model_revision(tiny_repo, tiny_checkpoint, cache, tmp_path):
    model = load_model(ModelArgs(model_name_or_path=str(tiny_checkpoint), lora_rank=2), trainable=True)
    model.save_pretrained(tmp_path / "adapter")
    add_snapshot(cache, "models--org--tiny_lora", SHA_1, folder_files(tmp_path / "adapter"))
    by_id = ModelArgs(model_name_or_path="org/tiny", adapter_name_or_path="org/tiny_lora", lora_rank=2)
    by_folder = ModelArgs(model_name_or_path=str(tiny_checkpoint), adapter_name_or_path=str(tmp_path / "adapter"),
                          lora_rank=2)
    assert model_identity(by_id)["adapter"] == model_identity(by_folder)["adapter"]
    tok = load_tokenizer(by_folder)
    torch.testing.assert_close(logits(load_model(by_id, trainable=False), tok),
                               logits(load_model(by_folder, trainable=False), tok), rtol=0, atol=0)


def one_line_error(call) -> FlexfeedError:
    with pytest.raises(FlexfeedError) as info:
        call()
    assert "\n" not in str(info.value)
    return info.value


def test_an_id_missing_from_the_cache_is_one_line_naming_id_revision_and_fix(cache, tiny_repo):
    err = one_line_error(lambda: load_tokenizer(ModelArgs(model_name_or_path="org/absent")))
    assert "'org/absent'" in err.message and "revision 'main'" in err.message and "HF_HUB_OFFLINE" in err.message
    assert str(cache) in err.message
    assert "hf download org/absent --revision main" in err.hint and "local model folder" in err.hint
    err = one_line_error(lambda: model_identity(ModelArgs(model_name_or_path="org/tiny", model_revision="v2")))
    assert "revision 'v2'" in err.message
    err = one_line_error(lambda: load_model(ModelArgs(model_name_or_path="org/tiny", adapter_name_or_path="org/no")))
    assert err.message.startswith("adapter 'org/no'")
    err = one_line_error(lambda: load_model(ModelArgs(model_name_or_path=str(cache / "no" / "such"))))
    assert "does not exist" in err.message


def test_modelscope_without_the_package_is_a_clear_error(cache, monkeypatch):
    monkeypatch.setenv("USE_MODELSCOPE_HUB", "1")
    monkeypatch.setattr(hub, "modelscope_installed", lambda: False)
    err = one_line_error(lambda: load_tokenizer(ModelArgs(model_name_or_path="org/tiny")))
    assert "modelscope is not installed" in err.message and "USE_MODELSCOPE_HUB" in err.hint


# -- datasets -----------------------------------------------------------------------------------------
def jsonl(rows) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


README = b"""---
configs:
- config_name: default
  data_files:
  - split: train
    path: data/train-*.json
  - split: test
    path: data/test-*.json
- config_name: small
  data_files:
  - split: train
    path: small/*.json
---
# tiny_ds
"""


@pytest.fixture
def tiny_dataset(cache):
    """`org/tiny_ds` in the hub cache: default config (train, test) and subset `small`."""
    return add_snapshot(cache, "datasets--org--tiny_ds", SHA_1, {
        "README.md": README,
        "data/train-00000-of-00001.json": jsonl(ROWS),
        "data/test-00000-of-00001.json": jsonl(TEST_ROWS),
        "small/part-0.json": jsonl(SMALL_ROWS),
    })


def write_info(folder: Path, entries: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "dataset_info.json").write_text(json.dumps(entries))
    return folder


COLUMNS = {"prompt": "q", "response": "a", "query": None}


@pytest.mark.parametrize("entry,rows", [
    ({}, ROWS),
    ({"split": "test"}, TEST_ROWS),
    ({"subset": "small"}, SMALL_ROWS),
    ({"num_samples": 3}, ROWS),
])
def test_hub_dataset_rows_load_like_the_same_rows_from_a_file(tiny_dataset, tiny_checkpoint, tmp_path, entry, rows):
    tok = load_tokenizer(ModelArgs(model_name_or_path=str(tiny_checkpoint)))
    local = write_info(tmp_path / "local", {"qa": {"file_name": "qa.jsonl", "columns": COLUMNS,
                                                  **{k: v for k, v in entry.items() if k == "num_samples"}}})
    (local / "qa.jsonl").write_bytes(jsonl(rows))
    remote = write_info(tmp_path / "remote", {"qa": {"hf_hub_url": "org/tiny_ds", "columns": COLUMNS, **entry}})
    from_hub = load_data(DataArgs(dataset=["qa"], dataset_dir=str(remote), stage="sft", template="default"), tok)
    from_file = load_data(DataArgs(dataset=["qa"], dataset_dir=str(local), stage="sft", template="default"), tok)
    assert from_hub.rows(0, len(from_hub)) == from_file.rows(0, len(from_file))
    assert from_hub.fingerprint == from_file.fingerprint  # content, not where it came from


def test_hub_dataset_folder_is_its_data_dir(tiny_dataset, tiny_checkpoint, tmp_path):
    tok = load_tokenizer(ModelArgs(model_name_or_path=str(tiny_checkpoint)))
    remote = write_info(tmp_path / "remote", {"qa": {"hf_hub_url": "org/tiny_ds", "folder": "small",
                                                     "columns": COLUMNS}})
    local = write_info(tmp_path / "local", {"qa": {"file_name": "qa.jsonl", "columns": COLUMNS}})
    (local / "qa.jsonl").write_bytes(jsonl(SMALL_ROWS))
    data = load_data(DataArgs(dataset=["qa"], dataset_dir=str(remote), stage="pt"), tok)
    assert data.rows(0, len(data)) == load_data(DataArgs(dataset=["qa"], dataset_dir=str(local), stage="pt"),
                                                tok).rows(0, len(data))


def test_a_local_file_name_wins_over_the_hub_url(cache, tiny_checkpoint, tmp_path):
    tok = load_tokenizer(ModelArgs(model_name_or_path=str(tiny_checkpoint)))
    local = write_info(tmp_path / "d", {"qa": {"file_name": "qa.jsonl", "hf_hub_url": "org/not_cached",
                                               "columns": COLUMNS}})
    (local / "qa.jsonl").write_bytes(jsonl(SMALL_ROWS))
    assert len(load_data(DataArgs(dataset=["qa"], dataset_dir=str(local), stage="pt"), tok)) == len(SMALL_ROWS)


@pytest.mark.parametrize("entry,words", [
    ({"hf_hub_url": "org/not_cached"}, ["has no file_name", "hf_hub_url 'org/not_cached'", "HF_HUB_OFFLINE"]),
    ({"hf_hub_url": "org/tiny_ds", "split": "validation"}, ["'org/tiny_ds'", "split 'validation'"]),
    ({"hf_hub_url": "org/tiny_ds", "subset": "large"}, ["'org/tiny_ds'", "subset 'large'"]),
    ({"ms_hub_url": "org/tiny_ds"}, ["ms_hub_url 'org/tiny_ds'", "modelscope"]),
    ({"script_url": "org/tiny_ds"}, ["script_url is not supported", "remote code"]),
    ({"om_hub_url": "org/tiny_ds"}, ["om_hub_url is not supported"]),
    ({"cloud_file_name": "s3://bucket/x.json"}, ["cloud_file_name is not supported"]),
])
def test_hub_dataset_errors_are_one_line(tiny_dataset, tiny_checkpoint, tmp_path, monkeypatch, entry, words):
    monkeypatch.setattr(hub, "modelscope_installed", lambda: False)  # as if modelscope were absent
    tok = load_tokenizer(ModelArgs(model_name_or_path=str(tiny_checkpoint)))
    remote = write_info(tmp_path / "remote", {"qa": {**entry, "columns": COLUMNS}})
    err = one_line_error(lambda: load_data(DataArgs(dataset=["qa"], dataset_dir=str(remote), stage="pt"), tok))
    for word in words:
        assert word in str(err), (word, str(err))
    assert "dataset 'qa'" in str(err)


def test_online_fetches_the_model_files_at_the_revision_then_bin_weights_when_no_safetensors(
        cache, tiny_checkpoint, tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    files = {k: v for k, v in folder_files(tiny_checkpoint).items() if not k.endswith(".safetensors")}
    calls = []

    def fake_download(repo_id, **kwargs):  # what the network would give: the snapshot, at the revision
        calls.append((repo_id, kwargs))
        return str(add_snapshot(cache, "models--org--old", SHA_1, {} if calls[1:] else files, ref=None))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    args = ModelArgs(model_name_or_path="org/old", model_revision="v1", hf_hub_token="hf_x",
                     cache_dir=str(tmp_path / "own_cache"))
    assert model_identity(args)["weights"] == f"hf:org/old@{SHA_1}"
    assert [c[1]["allow_patterns"] for c in calls] == [hub.MODEL_FILES, hub.PT_WEIGHTS]
    for _, kwargs in calls:
        assert kwargs["revision"] == "v1" and kwargs["token"] == "hf_x" and not kwargs["local_files_only"]
        assert kwargs["cache_dir"] == str(tmp_path / "own_cache") and "original/*" in kwargs["ignore_patterns"]
    model_identity(args)
    assert len(calls) == 2  # resolved once per process
    assert "hf_x" not in repr(args)
