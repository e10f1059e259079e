"""Adam gradients without checkpoints (DataFlex's `less` example) come from the live optimizer.

LESS's offline definition needs Trainer checkpoints with optimizer state; a config with
`grad_type: adam` and no `grads.checkpoints` can only mean the training run's own Adam state, so every
gradient signal is routed live and refreshed at every decision (staleness 0), and a config that cannot
refresh them is refused before training, not at the first decision.
"""

from __future__ import annotations

import pytest

from pipeline.config import load_config
from pipeline.refresh import plan_routes
from pipeline.stage_job import gradient_signals
from pipeline.strategies import SignalNeed
from store.errors import FlexfeedError
from tests.helpers.run_fixtures import make_run_dir

LESS_NEEDS = [SignalNeed("grads", "train"), SignalNeed("grads_sgd", "target")]
ADAM_LESS = ["train_type=select", "component=less", "grads.grad_type=adam", "update_step=4", "warmup_step=4"]


@pytest.fixture(scope="module")
def cfg_path(tiny_checkpoint, tmp_path_factory):
    return make_run_dir(tmp_path_factory.mktemp("live_adam"), tiny_checkpoint)


def test_every_gradient_signal_is_live_and_fresh_at_each_decision(cfg_path):
    cfg = load_config(cfg_path, ADAM_LESS)
    routes = plan_routes(cfg, LESS_NEEDS, "less")
    assert {k: (r.live, r.max_staleness) for k, r in routes.items()} == {
        ("grads", "train"): (True, 0), ("grads_sgd", "target"): (True, 0)}


def test_nothing_to_compute_offline(cfg_path):
    assert gradient_signals(load_config(cfg_path, ADAM_LESS)) == []


def test_with_checkpoints_the_offline_ensemble_stays(cfg_path, tmp_path):
    cfg = load_config(cfg_path, [*ADAM_LESS, "refresh.enabled=false"])
    cfg.grads.checkpoints = [str(tmp_path / "checkpoint-1")]
    from pipeline.refresh import live_adam_without_checkpoints

    assert live_adam_without_checkpoints(cfg, LESS_NEEDS) is False


@pytest.mark.parametrize("override", ["refresh.enabled=false", "refresh.signals=loss"])
def test_a_config_that_cannot_refresh_them_is_refused_before_training(cfg_path, override):
    cfg = load_config(cfg_path, [*ADAM_LESS, override])
    with pytest.raises(FlexfeedError, match="no grads.checkpoints") as err:
        plan_routes(cfg, LESS_NEEDS, "less")
    assert "grads.checkpoints" in err.value.hint and "grad_type: sgd" in err.value.hint


def test_sgd_gradients_keep_their_offline_route(cfg_path):
    cfg = load_config(cfg_path, ["train_type=select", "component=less", "grads.grad_type=sgd"])
    routes = plan_routes(cfg, [SignalNeed("grads_sgd", "train"), SignalNeed("grads_sgd", "target")], "less")
    assert not any(r.live for r in routes.values())


def test_a_chosen_staleness_is_kept(cfg_path):
    """Unlike a loss change, Adam features may be reused across decisions when the user says so."""
    cfg = load_config(cfg_path, [*ADAM_LESS, "refresh.max_staleness=8"])
    assert {r.max_staleness for r in plan_routes(cfg, LESS_NEEDS, "less").values()} == {8}
