"""A dataset_info.json entry that leaves dataset_dir (`../`, an absolute path) is refused unless the config
sets allow_outside_dataset_dir: a shared dataset_info.json must not make a run read files elsewhere."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from pipeline.cli import main
from stages.args import DataArgs
from stages.dataset_info import parse_entry
from store.errors import FlexfeedError
from tests.helpers.run_fixtures import make_run_dir


@pytest.mark.parametrize("entry", [
    {"file_name": "../secret.json"},
    {"file_name": "sub/../../secret.json"},
    {"file_name": "/etc/passwd"},
    {"file_name": "sub", "folder": "../../elsewhere"},
], ids=["dotdot", "dotdot-inside", "absolute", "folder"])
def test_an_entry_outside_dataset_dir_is_refused_naming_entry_path_and_fix(tmp_path, entry):
    info = {"x": entry}
    with pytest.raises(FlexfeedError) as exc:
        parse_entry(tmp_path, info, "x")
    text = str(exc.value)
    bad = entry.get("folder", entry["file_name"])
    assert "\n" not in text and "dataset 'x'" in text and repr(bad) in text
    assert "outside dataset_dir" in text and "allow_outside_dataset_dir: true" in text
    assert parse_entry(tmp_path, info, "x", allow_outside=True).path is not None  # the key lets it through


@pytest.mark.parametrize("name", ["a.json", "sub/a.json", "./a.json", "sub/../a.json"])
def test_paths_inside_dataset_dir_are_accepted(tmp_path, name):
    assert parse_entry(tmp_path, {"x": {"file_name": name}}, "x").path == tmp_path / name


def test_the_key_is_a_data_argument_off_by_default():
    assert DataArgs().allow_outside_dataset_dir is False
    assert DataArgs(allow_outside_dataset_dir=True).allow_outside_dataset_dir is True


def test_stage_refuses_an_outside_entry_in_one_line_and_writes_nothing(tiny_checkpoint, tmp_path):
    cfg = make_run_dir(tmp_path, tiny_checkpoint)
    outside = tmp_path / "outside.json"
    outside.write_text((tmp_path / "data" / "a.json").read_text())
    info_path = tmp_path / "data" / "dataset_info.json"
    info = json.loads(info_path.read_text())
    info["a"] = {"file_name": "../outside.json"}
    info_path.write_text(json.dumps(info))
    result = CliRunner().invoke(main, ["stage", "embed", str(cfg)])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output
    assert "dataset 'a'" in lines[0] and "'../outside.json'" in lines[0]
    assert "allow_outside_dataset_dir: true" in lines[0]
    assert not (tmp_path / "store").exists()


def test_the_config_key_lets_the_run_read_it(tiny_checkpoint, tmp_path):
    from pipeline.config import load_config
    from stages.data import load_data
    from stages.models import load_tokenizer

    cfg_path = make_run_dir(tmp_path, tiny_checkpoint)
    rows = json.loads((tmp_path / "data" / "a.json").read_text())
    (tmp_path / "outside.json").write_text(json.dumps(rows))
    info_path = tmp_path / "data" / "dataset_info.json"
    info = json.loads(info_path.read_text())
    info["a"] = {"file_name": "../outside.json"}
    info_path.write_text(json.dumps(info))
    cfg = load_config(cfg_path, ["allow_outside_dataset_dir=true"])
    data = load_data(cfg.data, load_tokenizer(cfg.model), ["a"])
    assert len(data) == len(rows)  # every row of the file outside dataset_dir
