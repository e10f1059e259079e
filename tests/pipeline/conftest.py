"""Fixtures of the trainer tests: a tiny two-domain run with its offline signals, and the batches it trains on."""

from __future__ import annotations

import pytest

from pipeline.config import load_config
from pipeline.stage_job import run_stage_job
from pipeline.trainer import FlexfeedTrainer
from tests.helpers.run_fixtures import make_run_dir


@pytest.fixture(scope="module")
def run_cfg(tiny_checkpoint, tmp_path_factory):
    """(config path, run folder) of the tiny run, its offline stages computed (one per test module)."""
    root = tmp_path_factory.mktemp("run")
    path = make_run_dir(root, tiny_checkpoint)
    run_stage_job(load_config(path), "all", progress=False)
    return path, root


@pytest.fixture
def seen_rows(monkeypatch):
    """Row ids of every training batch, in order."""
    seen: list[list[int]] = []
    original = FlexfeedTrainer.compute_loss

    def recording(self, model, inputs, *args, **kwargs):
        if model.training and "row_id" in inputs:
            seen.append(inputs["row_id"].tolist())
        return original(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(FlexfeedTrainer, "compute_loss", recording)
    return seen
