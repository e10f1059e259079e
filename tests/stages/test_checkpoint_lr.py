"""LESS's checkpoint weights: the mean learning rate of the interval ending at each checkpoint."""

from __future__ import annotations

import json

import pytest

from stages.grads.checkpoint import checkpoint_lr

PEAK = 1e-3
MAX_STEPS = 10


def linear_decay(step: int) -> float:
    """A linear schedule from PEAK to 0 over MAX_STEPS, as logged after step `step`."""
    return PEAK * (1 - step / MAX_STEPS)


def write_checkpoint(root, step: int, logged_steps) -> object:
    """A Trainer-style `checkpoint-<step>` folder whose trainer_state.json logged the rate at `logged_steps`."""
    folder = root / f"checkpoint-{step}"
    folder.mkdir()
    history = [{"loss": 1.0, "learning_rate": linear_decay(s), "step": s} for s in logged_steps]
    history.append({"eval_loss": 2.0, "step": step})  # evaluation entries carry no rate
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": history}))
    return folder


def test_each_checkpoint_weighs_the_mean_rate_of_its_interval(tmp_path):
    # a linear decay 1e-3 -> 0 over 10 steps, logged at every step; checkpoints at steps 5 and 10
    first = write_checkpoint(tmp_path, 5, range(1, 6))
    last = write_checkpoint(tmp_path, 10, range(1, 11))
    # by hand: steps 1..5 log 9e-4, 8e-4, 7e-4, 6e-4, 5e-4 -> mean 7e-4;
    #          steps 6..10 log 4e-4, 3e-4, 2e-4, 1e-4, 0 -> mean 2e-4 (the last logged rate alone would be 0)
    assert checkpoint_lr(first) == pytest.approx(7e-4)
    assert checkpoint_lr(last) == pytest.approx(2e-4)
    # the interval can be given: from the start of training, steps 1..10 average 4.5e-4
    assert checkpoint_lr(last, since_step=0) == pytest.approx(4.5e-4)


def test_a_checkpoint_with_no_rate_in_its_interval_has_none(tmp_path):
    write_checkpoint(tmp_path, 4, [2, 4])
    later = write_checkpoint(tmp_path, 8, [2, 4])  # nothing logged in (4, 8]
    assert checkpoint_lr(later) is None
    assert checkpoint_lr(tmp_path / "checkpoint-4") == pytest.approx((8e-4 + 6e-4) / 2)


def test_configured_checkpoints_set_the_intervals(tmp_path):
    """With checkpoints 5 and 10 configured and a folder for step 7 beside them (not configured), the
    checkpoint at 10 weighs steps 6..10 (mean 2e-4 by hand, as above), not 8..10 (2e-4, 1e-4, 0: mean 1e-4)."""
    from stages.grads.stage import interval_starts

    first = write_checkpoint(tmp_path, 5, range(1, 6))
    write_checkpoint(tmp_path, 7, range(1, 8))
    last = write_checkpoint(tmp_path, 10, range(1, 11))
    assert checkpoint_lr(last) == pytest.approx(1e-4)  # the nearest folder alone: steps 8, 9, 10
    since = interval_starts([str(last), str(first)])
    assert since == {str(last): 5, str(first): 0}
    assert checkpoint_lr(last, since[str(last)]) == pytest.approx(2e-4)
