"""The demo at reduced size, through the same code path as `make demo`."""

from __future__ import annotations

import json

import pytest


@pytest.mark.slow
def test_small_demo_end_to_end_and_rerun_reuses_the_store(tmp_path):
    from demo.run import run_demo

    summary = run_demo(tmp_path / "demo", size="small")
    share = summary["target_share"]
    assert share["less"] >= 2 * share["random"], share
    assert share["near"] >= 2 * share["random"], share
    assert summary["recomputed_shards"] > 0
    for name in ("doremi", "odm"):
        weights = summary["final_weights"][name]
        assert set(weights) == {"pydoc", "stdlib_code", "docstrings", "arithmetic", "instructions"}
        assert abs(sum(weights.values()) - 1) < 1e-6
    assert set(summary["val_loss"]) >= {"static", "select_less", "mix_doremi", "weight_loss"}
    html = (tmp_path / "demo" / "report.html").read_text()
    assert "data:image/png;base64," in html and "select_less" in html
    assert summary["findings"][0].startswith("Target domain arithmetic") and summary["findings"][0] in html
    assert json.loads((tmp_path / "demo" / "summary.json").read_text()) == summary
    again = run_demo(tmp_path / "demo", size="small")
    assert again["recomputed_shards"] == 0
    assert again["target_share"] == summary["target_share"]
