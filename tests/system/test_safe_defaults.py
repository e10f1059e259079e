"""Safe defaults: no remote code, no unpickling, no path escapes, loopback-only Dask, opt-in plugins,
and stores of another format refused with the version that wrote them."""

from __future__ import annotations

import ast
import importlib
import io
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from store.errors import FlexfeedError, StoreError
from store.layout import check_key, check_name
from store.store import Store
from tests.helpers.store_helpers import FINGERPRINT, make_store

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("pipeline", "stages", "store")


def _sources():
    for pkg in PACKAGES:
        yield from sorted((ROOT / pkg).rglob("*.py"))


# --------------------------------------------------------------------------- remote code
def test_trust_remote_code_is_off_unless_set(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.config import load_config
    from stages.args import ModelArgs
    from stages.models import load_model, load_tokenizer

    assert ModelArgs().trust_remote_code is False
    seen = []

    def fake(*args, **kwargs):
        seen.append(kwargs.get("trust_remote_code", "absent"))
        raise OSError("stop here")

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", fake)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", fake)
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model_name_or_path: {tmp_path / 'm'}\ndataset: a\noutput_dir: {tmp_path / 'o'}\n")
    for overrides, want in (([], False), (["trust_remote_code=true"], True)):
        margs = load_config(cfg, overrides).model
        assert margs.trust_remote_code is want
        seen.clear()
        with pytest.raises(FlexfeedError):
            load_tokenizer(margs)
        with pytest.raises(FlexfeedError):
            load_model(margs)
        assert seen == [want, want]  # passed explicitly, never left to a library default


def test_no_other_code_path_turns_remote_code_on():
    for path in _sources():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.keyword) and node.arg == "trust_remote_code":
                assert not (isinstance(node.value, ast.Constant) and node.value.value is True), \
                    f"{path}:{node.value.lineno} hard-codes trust_remote_code=True"


# --------------------------------------------------------------------------- no unpickling
def _calls(path: Path):
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call):
            yield node, ast.unparse(node.func)


def test_every_torch_load_is_weights_only_and_nothing_unpickles():
    torch_loads = 0
    for path in _sources():
        for call, name in _calls(path):
            where = f"{path.relative_to(ROOT)}:{call.lineno}"
            kwargs = {k.arg: k.value for k in call.keywords}
            if name == "torch.load":
                torch_loads += 1
                flag = kwargs.get("weights_only")
                assert isinstance(flag, ast.Constant) and flag.value is True, f"{where}: torch.load without weights_only=True"
            assert name not in ("pickle.load", "pickle.loads", "pickle.Unpickler", "dill.load", "joblib.load",
                                "cloudpickle.load", "cloudpickle.loads", "torch.jit.load"), f"{where}: {name}"
            if name in ("np.load", "numpy.load"):
                flag = kwargs.get("allow_pickle")
                assert flag is None or (isinstance(flag, ast.Constant) and flag.value is False), \
                    f"{where}: np.load with pickles allowed"
    assert torch_loads >= 1  # the scan really sees the checkpoint reader


class _Payload:
    """Unpickling this runs os.mkdir(marker): proof that a loader executed pickled code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_a_malicious_pickle_in_a_checkpoint_is_refused(tmp_path):
    from stages.grads.optim_layouts import safe_load

    marker = tmp_path / "pwned"
    bad = tmp_path / "checkpoint-1" / "global_step1" / "mp_rank_00_model_states.pt"
    bad.parent.mkdir(parents=True)
    torch.save({"param_shapes": [_Payload(marker)]}, bad)
    with pytest.raises(FlexfeedError, match="cannot read optimizer/checkpoint file .* safely"):
        safe_load(bad)
    assert not marker.exists()
    torch.load(bad, weights_only=False)  # the payload is live: an unpickling loader would have run it
    assert marker.is_dir()
    # plain tensors and containers still load
    ok = tmp_path / "ok.pt"
    torch.save({"exp_avg": torch.ones(3), "step": 2}, ok)
    assert safe_load(ok)["step"] == 2


def test_strategy_state_with_a_pickled_array_is_refused(tmp_path):
    from pipeline.state_io import STATE_JSON, STATE_NPZ, load_state, save_state

    marker = tmp_path / "pwned"
    save_state(tmp_path, {"weights": np.arange(3.0)})
    assert np.array_equal(load_state(tmp_path)["weights"], np.arange(3.0))
    tree = json.loads((tmp_path / STATE_JSON).read_text())
    buf = io.BytesIO()
    evil = np.empty(1, dtype=object)
    evil[0] = _Payload(marker)
    np.savez(buf, **{k: evil for k in np.load(tmp_path / STATE_NPZ).files})
    (tmp_path / STATE_NPZ).write_bytes(buf.getvalue())
    with pytest.raises(ValueError, match="allow_pickle"):
        load_state(tmp_path)
    assert not marker.exists()
    with np.load(tmp_path / STATE_NPZ, allow_pickle=True) as npz:  # the payload is live
        npz[npz.files[0]]
    assert marker.is_dir()
    assert json.loads((tmp_path / STATE_JSON).read_text()) == tree


# --------------------------------------------------------------------------- names and paths
ESCAPES = ["..", "../x", "../../etc/passwd", "a/../../b", "/abs", "a/b", "a\\b", ".hidden", "", " ", "x" * 129,
           "a\x00b", "-flag", "a..b", "name\n", "ä", None, 3, b"bytes"]


@pytest.mark.parametrize("name", ESCAPES, ids=repr)
def test_signal_names_that_could_escape_the_store_are_refused(tmp_path, name):
    st_ = make_store(tmp_path / "s")
    before = sorted(p for p in tmp_path.rglob("*"))
    with pytest.raises(StoreError, match="invalid signal name"):
        st_.signal(name, {"k": 1})
    assert sorted(p for p in tmp_path.rglob("*")) == before


@pytest.mark.parametrize("key", ["../x", "..", "/etc", "abc", "ABCDEF0123", "0123456789abcdef/../x", "g" * 20,
                                 "0123456789abcdef\n"])
def test_signal_keys_that_are_not_hex_digests_are_refused(tmp_path, key):
    st_ = make_store(tmp_path / "s")
    with pytest.raises(StoreError, match="invalid signal key"):
        st_.get(key)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=140))
def test_any_accepted_name_is_a_single_safe_path_part(name):
    try:
        check_name(name)
    except StoreError:
        return
    assert 1 <= len(name) <= 128 and "/" not in name and "\\" not in name and ".." not in name
    assert not name.startswith((".", "-")) and name.isascii() and name.isprintable()
    assert Path(name).name == name and len(Path(name).parts) == 1


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=80))
def test_any_accepted_key_is_lowercase_hex(key):
    try:
        check_key(key)
    except StoreError:
        return
    assert set(key) <= set("0123456789abcdef") and 8 <= len(key) <= 64


@pytest.mark.parametrize("shard", [-1, 3, 99, 1.0, "0", None, True + 10])
def test_shard_ids_outside_the_signal_are_refused_before_any_write(tmp_path, shard):
    st_ = make_store(tmp_path / "s", num_rows=10, shard_rows=4)
    sig = st_.signal("x", {})
    before = sorted(p for p in tmp_path.rglob("*"))
    with pytest.raises(StoreError, match="out of range"):
        sig.write_shard(shard, np.zeros(4, dtype="float32"))
    assert sorted(p for p in tmp_path.rglob("*")) == before


def test_remote_store_urls_are_refused(tmp_path):
    for url in ("s3://bucket/store", "http://example.com/s", "gs://b/s"):
        with pytest.raises(StoreError, match="not a local path"):
            Store.open(url)


# --------------------------------------------------------------------------- Dask on loopback
@pytest.mark.multiproc
def test_default_local_cluster_listens_on_loopback_only():
    from stages.args import RunnerArgs
    from stages.runner import open_client

    client, cluster = open_client(RunnerArgs(n_workers=1))
    try:
        info = client.scheduler_info()
        assert client.scheduler.address.startswith("tcp://127.0.0.1:")
        assert info["workers"] and all(w.startswith("tcp://127.0.0.1:") for w in info["workers"])
        assert cluster.dashboard_link in (None, "") or "127.0.0.1" in cluster.dashboard_link
    finally:
        client.close()
        cluster.close()


# --------------------------------------------------------------------------- plugins by import path only
PLUGIN = """
import pathlib
pathlib.Path({marker!r}).write_text("imported")
from pipeline.strategies import Selector, Selection

class Picky(Selector):
    def select(self, ctx, num_samples):
        return Selection(indices=list(range(num_samples)))
"""


def test_a_user_component_is_imported_only_when_the_config_names_it(tmp_path, monkeypatch):
    marker = tmp_path / "imported.txt"
    (tmp_path / "flexfeed_user_plugin_xyz.py").write_text(PLUGIN.format(marker=str(marker)))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "flexfeed_user_plugin_xyz", raising=False)
    from pipeline.strategies.registry import MIXERS, SELECTORS, WEIGHTERS

    for registry in (SELECTORS, MIXERS, WEIGHTERS):
        for name in registry.names():
            registry.resolve(name)
    importlib.import_module("pipeline.config")
    assert "flexfeed_user_plugin_xyz" not in sys.modules and not marker.exists()
    # a name that is not registered is an error, never an import attempt
    with pytest.raises(FlexfeedError, match="unknown select component"):
        SELECTORS.resolve("flexfeed_user_plugin_xyz")
    assert not marker.exists()
    cls = SELECTORS.resolve("flexfeed_user_plugin_xyz:Picky")
    assert cls.__name__ == "Picky" and marker.exists()
    monkeypatch.delitem(sys.modules, "flexfeed_user_plugin_xyz")
    # a module attribute that is not a strategy class is refused
    with pytest.raises(FlexfeedError, match="is not a Selector subclass"):
        SELECTORS.resolve("flexfeed_user_plugin_xyz:pathlib")


# --------------------------------------------------------------------------- store format
def _header(root: Path) -> Path:
    return root / "store.json"


def test_a_store_of_another_format_version_names_the_version_that_wrote_it(tmp_path):
    from pipeline.cli import main

    st_ = make_store(tmp_path / "s")
    meta = json.loads(_header(st_.root).read_text())
    meta.update(format_version=7, flexfeed_version="9.4.1")
    _header(st_.root).write_text(json.dumps(meta))
    with pytest.raises(StoreError, match=r"format version 7, written by flexfeed 9\.4\.1") as info:
        Store.open(st_.root)
    assert "reads format 2" in str(info.value)
    with pytest.raises(StoreError, match="9.4.1"):
        Store.open_or_create(st_.root, dataset_fingerprint=FINGERPRINT, num_rows=10, shard_rows=4)
    for command in ("info", "verify", "gc"):
        result = CliRunner().invoke(main, ["store", command, str(st_.root)])
        assert result.exit_code == 2
        assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
        assert "9.4.1" in result.stderr and "Traceback" not in result.output


@pytest.mark.parametrize("content", [b"", b"{", b"[1, 2]", b"\xff\xfe\x00garbage", b'{"format": "other"}',
                                     b'{"format": "flexfeed-store", "format_version": 2}', b"null"],
                         ids=["empty", "truncated", "list", "binary", "other-format", "incomplete", "null"])
def test_an_unreadable_store_header_is_refused_with_its_path(tmp_path, content):
    from pipeline.cli import main

    st_ = make_store(tmp_path / "s")
    _header(st_.root).write_bytes(content)
    with pytest.raises(StoreError) as info:
        Store.open(st_.root)
    assert str(_header(st_.root)) in str(info.value) or str(st_.root) in str(info.value)
    result = CliRunner().invoke(main, ["store", "info", str(st_.root)])
    assert result.exit_code == 2 and result.stderr.startswith("error: ") and result.stderr.count("\n") == 1


def test_damaged_signal_header_or_commit_record_is_reported_not_crashed(tmp_path):
    from store.maintenance import verify
    from tests.helpers.store_helpers import fill

    st_ = make_store(tmp_path / "s")
    a, b = st_.signal("a", {}), st_.signal("b", {})
    fill(a)
    fill(b)
    (b.dir / "signal.json").write_bytes(b"\x00\x01")
    (a.dir / "commits" / "000001.json").write_text('{"shard": 1')
    with pytest.raises(StoreError, match="cannot read commit record"):
        st_.get(a.key).read_shard(1)
    report = verify(Store.open(st_.root))
    assert not report.ok and len(report.problems) == 2
    assert any(a.key in p for p in report.problems) and any(b.key in p for p in report.problems)
