"""`flexfeed report` on hand-written run directories and a tiny real store."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from pipeline.config import load_config
from pipeline.plan_record import filter_pools, fired_steps, served_order, step_quantiles
from pipeline.report import write_report
from pipeline.run_files import load_run
from pipeline.state_io import load_state
from pipeline.train import train
from store.errors import FlexfeedError
from store.store import Store
from tests.helpers.run_fixtures import make_run_dir

DOMAINS = ["alpha_dom", "beta_dom"]


def _history(steps: int, start: float, extra=None) -> list[dict]:
    out = []
    for s in range(1, steps + 1):
        rec = {"step": s, "loss": start / s ** 0.5, "learning_rate": 1e-3, "epoch": s / steps}
        rec.update((extra or {}).get(s, {}))
        out.append(rec)
    out.append({"step": steps, "train_runtime": 1.0, "train_loss": start / 2})
    return out


def _run(path: Path, kind: str, component: str | None, *, eval_loss: bool = True, final_weights=None,
         history_extra=None) -> Path:
    path.mkdir(parents=True)
    run = {"output_dir": str(path), "train_type": kind, "component": component, "steps": 8, "train_loss": 2.5,
           "domains": DOMAINS, "global_batch": 4, "log_history": _history(8, 4.0, history_extra)}
    if eval_loss:
        run["eval_loss"] = {"alpha_dom": 3.1, "beta_dom": 2.7}
    if final_weights:
        run["final_weights"] = final_weights
    (path / "flexfeed_run.json").write_text(json.dumps(run))
    return path


def _jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def _runs(tmp_path: Path) -> list[Path]:
    static = _run(tmp_path / "runs" / "plain", "static", None, eval_loss=False)
    sel = _run(tmp_path / "runs" / "sel_less", "select", "less")
    _jsonl(sel / "flexfeed_decisions.jsonl", [
        {"window": w, "step": 2 * w, "kind": "select", "decision": w % 2 == 1,
         "per_domain": {"alpha_dom": 8 - w, "beta_dom": w}, "seconds": 0.01,
         **({"info": {"score_mean": 0.1, "score_std": 0.02},
             "refresh": {"grads/train": {"stale": 2, "recomputed_here": 2, "seconds": 0.5}}} if w % 2 else {})}
        for w in range(4)])
    mix = _run(tmp_path / "runs" / "mix_doremi", "mix", "doremi", final_weights={"alpha_dom": 0.3, "beta_dom": 0.7})
    _jsonl(mix / "flexfeed_decisions.jsonl", [
        {"window": w, "step": 2 * w, "kind": "mix", "decision": True, "per_domain": {"alpha_dom": 4, "beta_dom": 4},
         "proportions": {"alpha_dom": 0.5 - 0.05 * w, "beta_dom": 0.5 + 0.05 * w}, "seconds": 0.01}
        for w in range(4)])
    _jsonl(mix / "flexfeed_mix.jsonl", [{"step": s, "domain_loss": {"0": 3.0 - 0.1 * s, "1": 2.0}} for s in range(8)])
    weight = _run(tmp_path / "runs" / "w_loss", "weight", "loss")
    rng = np.random.default_rng(0)
    _jsonl(weight / "flexfeed_weights.jsonl", [
        {"step": s, "weights": rng.random(4).round(4).tolist(), "losses": rng.random(4).round(4).tolist()}
        for s in range(8)])
    # a mixer that only logged its proportions into the trainer's history, with no extra files
    logged = _run(tmp_path / "runs" / "mix_logged", "mix", "static", eval_loss=False, history_extra={
        1: {"flexfeed/alpha_dom_proportion": 0.6, "flexfeed/beta_dom_proportion": 0.4},
        5: {"flexfeed/alpha_dom_proportion": 0.2, "flexfeed/beta_dom_proportion": 0.8}})
    return [static, sel, mix, weight, logged]


def _store(path: Path, stage: str) -> Path:
    st = Store.create(path, dataset_fingerprint="fedcba9876543210fedc", num_rows=10, shard_rows=4)
    sig = st.signal("embedding", {"model": "tiny", "pooling": "mean"}, dim=3)
    values = np.arange(30, dtype=np.float32).reshape(10, 3)
    for shard in (0, 1):
        start, stop = sig.shard_range(shard)
        sig.write_shard(shard, values[start:stop], version=shard, model="tiny", seconds=0.25)
    st.log_stage(stage=stage, key=sig.key, computed=2, skipped=0, rows=8, seconds=1.5)
    st.log_stage(stage=stage, key=sig.key, computed=0, skipped=2, rows=0, seconds=0.1)
    return path


def _pngs(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)]


def test_report_of_every_kind_with_store_and_summary(tmp_path):
    runs = _runs(tmp_path)
    _store(tmp_path / "stores" / "s_embed", "embed")
    _store(tmp_path / "stores" / "s_loss", "loss")
    out = tmp_path / "report"
    out.mkdir()
    (out / "summary.json").write_text(json.dumps({"target_share": 0.42, "recomputed_shards": 3,
                                                  "final_weights": {"alpha_dom": 0.3, "beta_dom": 0.7}}))
    page_path = write_report([str(r) for r in runs], str(out), stores=[str(tmp_path / "stores")])
    assert page_path == out / "report.html"
    page = page_path.read_text()

    for run in runs:
        assert run.name in page
    for name in (*DOMAINS, "doremi", "less", "target_share", "0.42", "s_embed", "s_loss", "embedding"):
        assert name in page
    for title in ("Summary", "Training loss", "Domain proportions", "Selected samples by domain", "Sample weights",
                  "Validation loss per domain", "Per-domain loss seen by the mixer", "Signal refresh", "Signal stores"):
        assert f"<h2>{title}" in page
    assert "2/3" in page  # two of three shards committed
    assert page.index("<h2>Summary") < page.index("<h2>Runs")

    embedded = _pngs(page)
    files = sorted(out.glob("*.png"))
    names = {f.name for f in files}
    assert {"loss.png", "mix_proportions.png", "selection.png", "weights.png", "eval_loss.png",
            "mix_domain_loss.png", "stage_time.png"} <= names
    assert len(embedded) == len(files)
    assert sorted(embedded) == sorted(f.read_bytes() for f in files)
    for f in files:
        img = imread(f)
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100


def test_single_static_run_skips_empty_sections(tmp_path):
    run = _run(tmp_path / "only", "static", None, eval_loss=False)
    page_path = write_report([str(run)])
    assert page_path == tmp_path / "report.html"  # default: the run's parent
    page = page_path.read_text()
    assert "only" in page and "Training loss" in page
    for absent in ("Summary", "Domain proportions", "Sample weights", "Validation loss", "Signal stores"):
        assert f"<h2>{absent}" not in page
    assert len(_pngs(page)) == 1
    assert imread(tmp_path / "loss.png").shape[2] in (3, 4)


def test_single_store_path_and_bad_inputs(tmp_path):
    run = _run(tmp_path / "r", "select", "random")  # a selector whose decisions file is missing
    store = _store(tmp_path / "one_store", "grads")
    page = write_report([str(run)], str(tmp_path / "out"), stores=[str(store)]).read_text()
    assert "one_store" in page and "grads" in page and "Selected samples" not in page

    with pytest.raises(FlexfeedError, match="no flexfeed_run.json"):
        write_report([str(tmp_path / "nowhere")])
    with pytest.raises(FlexfeedError, match="no flexfeed store"):
        write_report([str(run)], str(tmp_path / "out"), stores=[str(tmp_path / "r")])
    (run / "flexfeed_decisions.jsonl").write_text('{"window": 0}\n{"window": 1, \n')
    with pytest.raises(FlexfeedError, match="line 2"):
        write_report([str(run)])


# ---------------------------------------------------------------- a composed data plan, trained for real

@pytest.fixture(scope="module")
def plan_runs(tiny_checkpoint, tmp_path_factory):
    """A tiny composed run (filter by loss -> odm -> sorting reorder -> loss weights) and a reorder that
    takes the budget, both sorting by a static score file (row i scores SCORES[i])."""
    root = tmp_path_factory.mktemp("plan_report")
    base = make_run_dir(root, tiny_checkpoint).read_text()
    np.save(root / "scores.npy", SCORES)
    score = f"{{score: file, score_path: {root / 'scores.npy'}}}"
    configs = {
        # the score is static: the reorder reads it once (every: beyond the run) and orders every window by it
        "plan": f"""train_type: plan
plan:
  - {{family: select, component: loss, mode: filter, keep_ratio: 0.5}}
  - {{family: mix, component: odm}}
  - {{family: reorder, component: sorting, every: 1000, component_args: {score}}}
  - {{family: weight, component: loss, component_args: {{strategy: linupper}}}}
""",
        "reorder": f"train_type: reorder\ncomponent: sorting\ncomponent_args: {score}\n",
    }
    out = {}
    for name, text in configs.items():
        path = root / f"{name}.yaml"
        path.write_text(base.replace(f"output_dir: {root}/out", f"output_dir: {root / name}")
                        + "warmup_step: 4\nupdate_step: 4\n" + text)
        train(load_config(path))
        out[name] = root / name
    return out


SCORES = np.random.default_rng(5).permutation(64).astype(float) / 8  # 64 train rows in the fixture


def _served_quantiles(run_dir: Path, first_step: int) -> list[list[float]]:
    """Per-step quantiles of the file scores of the rows each trained window held, from the saved plans."""
    state = load_state(run_dir)
    plans = [np.asarray(state["plans"][w]) for w in sorted(state["plans"], key=int)]
    served = np.concatenate(plans)[first_step * 4 : 12 * 4]  # 12 steps of 4 rows
    return step_quantiles(SCORES[served], 4)


def test_report_draws_a_composed_plan(plan_runs, tmp_path):
    page = write_report([str(plan_runs["plan"]), str(plan_runs["reorder"])], str(tmp_path)).read_text()
    for title in ("Data plan", "Rows kept by the filter", "Domain proportions", "Order of the served rows",
                  "Sample weights", "Per-domain loss seen by the mixer"):
        assert f"<h2>{title}" in page
    assert {"filter.png", "order.png", "mix_proportions.png", "weights.png"} <= {f.name for f in tmp_path.glob("*.png")}
    run = load_run(plan_runs["plan"])
    assert "select:loss(filter) -&gt; mix:odm -&gt; reorder:sorting -&gt; weight:loss" in page  # the runs table

    # the filter's pool: what the decisions recorded, half of 64 rows, at steps 4 and 8
    recorded = [(d["step"], f["pool"]) for d in run.decisions for f in d.get("filter", [])]
    pools = filter_pools(run)["select:loss(filter)"]
    assert [(p.step, p.rows) for p in pools] == recorded == [(4, 32), (8, 32)]
    assert all(sum(p.per_domain.values()) == 32 for p in pools)
    assert "kept 32, 32 rows" in page
    assert fired_steps(run)["reorder:sorting"] == [4] and fired_steps(run)["mix:odm"] == [4, 8]

    # the order: each window's rows ascending by the file's score, restarting at each window
    order = served_order(run)
    assert order.steps.tolist() == list(range(4, 12))  # from the saved state, or the records' order entries
    np.testing.assert_allclose(order.quantiles, _served_quantiles(plan_runs["plan"], 4))
    for window in (order.quantiles[:4], order.quantiles[4:]):
        assert all(a[4] <= b[0] for a, b in zip(window[:-1], window[1:]))  # a step's max <= the next one's min

    # weights: one weight stage (linupper) from its warmup_step (the run's, 4), each batch's averaging 1
    assert [r["step"] for r in run.weights] == list(range(4, 12))
    assert all(abs(np.mean(r["weights"]) - 1) < 1e-4 for r in run.weights)
    assert "weights (every weight stage multiplied): mean 1," in page


def test_report_draws_a_reorder_that_takes_the_budget_over_the_run(plan_runs):
    order = served_order(load_run(plan_runs["reorder"]))
    # fixed scores: from the run's start, one sorted pass of 48 of the 64 rows over the 12 steps
    assert order.stage == "reorder:sorting" and order.steps.tolist() == list(range(12))
    np.testing.assert_allclose(order.quantiles, _served_quantiles(plan_runs["reorder"], 0))
    med = order.quantiles[:, 2]
    assert (np.diff(med) >= 0).all() and all(a[4] <= b[0] for a, b in zip(order.quantiles[:-1], order.quantiles[1:]))


def test_an_order_recorded_in_the_decisions_is_drawn_as_recorded(tmp_path):
    run = _run(tmp_path / "runs" / "saw", "plan", None)
    stages = [{"stage": "mix:odm", "fired": True}, {"stage": "reorder:saw", "fired": True}]
    _jsonl(run / "flexfeed_decisions.jsonl", [
        {"window": 0, "step": 0, "kind": "plan", "decision": False, "per_domain": {"alpha_dom": 8, "beta_dom": 8}},
        *({"window": w, "step": 4 * w - 2, "kind": "plan", "decision": True, "stages": stages,
           "per_domain": {"alpha_dom": 8, "beta_dom": 8},
           "order": {"stage": "reorder:saw", "score_q": [[w, w + 1, w + 2, w + 3, w + 4], [w + 5] * 5]}}
          for w in (1, 2))])
    order = served_order(load_run(run))
    assert order.source == "decisions" and order.steps.tolist() == [2, 3, 6, 7]
    assert order.quantiles[:, 2].tolist() == [3, 6, 4, 7]
    page = write_report([str(run)], str(tmp_path / "out")).read_text()
    assert "<h2>Order of the served rows" in page and "<h2>Data plan" in page
    assert "median 3 to 7" in page
