"""`rho_loss`: reducible holdout loss on hand-made losses, its needs, and the config refusals without a reference."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.config import load_config
from pipeline.strategies import SELECTORS
from store.errors import FlexfeedError


def test_takes_the_rows_of_largest_training_minus_reference_loss(make_ctx):
    loss = np.array([3.0, 0.5, 2.5, 4.0, 1.0, 2.0])
    ref = np.array([2.9, 0.1, 0.5, 4.2, 0.2, 1.0])
    # by hand: reducible = [0.1, 0.4, 2.0, -0.2, 0.8, 1.0]: rows 2, 5, 4, 1 in that order. The highest
    # training losses (rows 3, 0) are ones the reference model finds just as hard: noise, not learnable.
    res = SELECTORS.build("rho_loss").select(make_ctx(6, train={"loss": loss, "ref_loss": ref}), 4)
    assert res.indices.tolist() == [2, 5, 4, 1]
    np.testing.assert_allclose(res.scores, [0.1, 0.4, 2.0, -0.2, 0.8, 1.0])
    assert res.info["loss_max"] == pytest.approx(2.5) and res.info["ref_loss_min"] == pytest.approx(0.1)


def test_ties_by_row_id_and_repeats_beyond_the_pool(make_ctx):
    loss, ref = np.array([2.0, 1.0, 3.0]), np.array([1.0, 0.0, 2.0])  # every row reducible by 1
    res = SELECTORS.build("rho").select(make_ctx(3, train={"loss": loss, "ref_loss": ref}), 5)
    assert res.indices.tolist() == [0, 1, 2, 0, 1]


def test_a_missing_or_misshapen_reference_loss_is_refused(make_ctx):
    sel = SELECTORS.build("rho_loss")
    with pytest.raises(FlexfeedError, match="ref_loss"):
        sel.select(make_ctx(3, train={"loss": np.ones(3)}), 1)
    with pytest.raises(FlexfeedError, match=r"'ref_loss' has shape \(2,\)"):
        sel.select(make_ctx(3, train={"loss": np.ones(3), "ref_loss": np.ones(2)}), 1)


def test_reads_the_live_loss_and_the_stored_reference_loss():
    sel = SELECTORS.build("rho_loss")
    assert [(n.name, n.live, n.refresh) for n in sel.needs()] == [("loss", True, True), ("ref_loss", False, False)]
    assert not sel.consume_once and sel.paper and sel.rule  # live scores: learnt rows drop out by themselves


BASE = """model_name_or_path: models/small
dataset: a
output_dir: out
train_type: select
component: rho_loss
"""


@pytest.mark.parametrize("loss_yaml,words", [
    ("", "names no reference model"),
    ("loss: {signal: ref_loss}\n", "names no reference model"),
    ("loss: {adapter_name_or_path: runs/ref}\n", "names no reference model"),  # ref_loss would be the training model's
    ("loss: {model_name_or_path: models/small, signal: ref_loss}\n", "is the model being trained"),
])
def test_a_config_without_a_reference_model_is_refused_at_load(tmp_path, loss_yaml, words):
    path = tmp_path / "cfg.yaml"
    path.write_text(BASE + loss_yaml)
    with pytest.raises(FlexfeedError, match=words) as exc:
        load_config(path)
    assert str(path) in exc.value.message and "adapter_name_or_path" in exc.value.hint
    plan = BASE.replace("train_type: select\ncomponent: rho_loss\n", "train_type: plan\nplan:\n"
                        "  - {family: select, component: rho_loss}\n")
    path.write_text(plan + loss_yaml)
    with pytest.raises(FlexfeedError, match=words):
        load_config(path)


def test_a_config_with_a_reference_model_loads(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text(BASE + "loss: {adapter_name_or_path: runs/ref, signal: ref_loss}\n")
    cfg = load_config(path)
    assert cfg.flex.component == "rho_loss" and cfg.loss.signal == "ref_loss"
