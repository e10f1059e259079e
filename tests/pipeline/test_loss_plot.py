"""plot_loss's curves: the moving average by hand, and the files written (LLaMA-Factory's names)."""

from __future__ import annotations

import pytest

from pipeline.loss_plot import plot_run_losses, smoothed


def test_moving_average_by_hand():
    # 0.9 of the past: 1 -> 1; 0.9*1 + 0.1*2 = 1.1; 0.9*1.1 + 0.1*0 = 0.99
    assert smoothed([1.0, 2.0, 0.0]) == pytest.approx([1.0, 1.1, 0.99])


def test_files_written_only_for_what_was_logged(tmp_path):
    history = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}, {"step": 2, "eval_loss": 1.7}]
    assert [p.name for p in plot_run_losses(history, tmp_path)] == ["training_loss.png", "training_eval_loss.png"]
    assert (tmp_path / "training_loss.png").read_bytes()[:4] == b"\x89PNG"
    assert [p.name for p in plot_run_losses(history[:2], tmp_path / "x")] == ["training_loss.png"]
    assert plot_run_losses([], tmp_path / "y") == []
