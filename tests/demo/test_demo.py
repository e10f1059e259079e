"""The demo at reduced size, through the same code path as `make demo`."""

from __future__ import annotations

import json
from html import escape

import pytest

from pipeline.plan_record import served_order
from pipeline.run_files import load_run


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
    _check_composed_run(tmp_path / "demo" / "runs" / "plan", summary)
    again = run_demo(tmp_path / "demo", size="small")
    assert again["recomputed_shards"] == 0
    assert again["target_share"] == summary["target_share"]


def _check_composed_run(run_dir, summary):
    """filter by loss -> odm -> saw on ref_loss -> loss weights: 30 steps, decisions at steps 10 and 20."""
    plan = summary["plan"]
    assert plan["stages"] == "select:loss(filter) -> mix:odm -> reorder:saw -> weight:loss"
    decided = [d for d in map(json.loads, (run_dir / "flexfeed_decisions.jsonl").read_text().splitlines())
               if d["decision"]]
    assert [d["step"] for d in decided] == [10, 20]
    # the filter kept half of the 5 x 48 train rows each time; the rows served came from that pool
    assert [f["pool"] for d in decided for f in d["filter"]] == plan["filter_pool"] == [120, 120]
    assert sum(plan["last_pool_per_domain"].values()) == 120
    # the reorder read the stored ref_loss once (every: beyond the run) and ordered both windows by it
    fired = {s["stage"]: [d["stages"][i]["fired"] for d in decided] for i, s in enumerate(decided[0]["stages"])}
    assert fired == {"select:loss(filter)": [True, True], "mix:odm": [True, True], "reorder:saw": [True, False],
                     "weight:loss": [True, True]}
    order = served_order(load_run(run_dir))
    assert order.steps.tolist() == list(range(10, 30)) and plan["order_windows"] == 2
    for window in (order.quantiles[:10], order.quantiles[10:]):  # saw: low ref_loss first in each window
        assert window[0, 2] < window[-1, 2]
    # loss weights from step 10: each batch's weights average 1
    weights = [json.loads(x) for x in (run_dir / "flexfeed_weights.jsonl").read_text().splitlines()]
    assert [w["step"] for w in weights] == list(range(10, 30))
    assert all(abs(sum(w["weights"]) / len(w["weights"]) - 1) < 1e-3 for w in weights)
    assert abs(plan["weight_mean"] - 1) < 1e-3
    assert "plan" in summary["val_loss"]
    finding = next(f for f in summary["findings"] if f.startswith("Composed plan"))
    page = (run_dir.parents[1] / "report.html").read_text()
    assert escape(finding) in page
    assert "<h2>Order of the served rows" in page and "<h2>Rows kept by the filter" in page
