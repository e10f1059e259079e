"""Mixers inside the trainer: time is optimizer steps (ODM under gradient accumulation), and DoReMi's own form
draws the reference mixture and weights each loss by alpha over its draw probability."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.config import load_config
from pipeline.stage_job import run_stage_job
from pipeline.strategies.mixers import DoReMiMixer
from pipeline.train import train

A_ROWS = 40  # the tiny run's train rows: dataset a (rows 0..39), then b (rows 40..63)


def _decisions(out):
    return [json.loads(x) for x in (out / "flexfeed_decisions.jsonl").read_text().splitlines()]


def test_odm_makes_the_same_decisions_whatever_the_gradient_accumulation(run_cfg, tmp_path, seen_rows):
    path, _ = run_cfg
    runs = {}
    for ga, batch in ((1, 8), (4, 2)):
        out = tmp_path / f"ga{ga}"
        seen_rows.clear()
        train(load_config(path, [f"output_dir={out}", "train_type=mix", "component=odm", "warmup_step=2",
                                 "update_step=1", "max_steps=8", f"per_device_train_batch_size={batch}",
                                 f"gradient_accumulation_steps={ga}"]))
        runs[ga] = (_decisions(out), [r for b in seen_rows for r in b])
    (one, rows_one), (four, rows_four) = runs[1], runs[4]
    assert rows_one == rows_four  # the same rows in the same order
    assert [d["per_domain"] for d in one] == [d["per_domain"] for d in four]
    # one bandit round per optimizer step: the same exploration rates and policies (losses agree to float noise)
    assert [d["odm/eps"] for d in one if "odm/eps" in d] == [d["odm/eps"] for d in four if "odm/eps" in d]
    for a, b in zip(one, four, strict=True):
        if "proportions" in a:
            np.testing.assert_allclose(list(a["proportions"].values()), list(b["proportions"].values()), rtol=1e-4)


def test_doremi_draws_the_reference_mixture_and_weights_losses_by_alpha(run_cfg, tmp_path, seen_rows, monkeypatch):
    path, _ = run_cfg
    run_stage_job(load_config(path, ["loss.signal=ref_loss"]), "loss", progress=False)
    # the reference is the proxy's own starting model (excess ~0): give domain b an excess of 0.5 nats
    excess = DoReMiMixer._excess
    monkeypatch.setattr(DoReMiMixer, "_excess", lambda self, ctx: (excess(self, ctx)[0] + [0.0, 0.5],
                                                                   excess(self, ctx)[1]))
    out = tmp_path / "doremi"
    train(load_config(path, [f"output_dir={out}", "train_type=mix", "component=doremi", "warmup_step=2",
                             "update_step=1", "loss.signal=ref_loss"]))
    decided = [d for d in _decisions(out) if d["decision"]]
    # uniform reference over two domains, batch 4: two rows of each in every batch
    assert all(d["per_domain"] == {"a": 2, "b": 2} for d in decided)
    assert all(d["proportions"] == {"a": 0.5, "b": 0.5} for d in decided)
    alphas = [np.array(d["doremi/alpha"]) for d in decided if "doremi/alpha" in d]
    assert alphas and alphas[-1][1] > 0.6  # b's excess moved weight to b
    logged = [json.loads(x) for x in (out / "flexfeed_weights.jsonl").read_text().splitlines()]
    assert len(logged) == len(seen_rows) == 12
    weighted = 0
    for rec, rows in zip(logged, seen_rows, strict=True):
        dom = (np.array(rows) >= A_ROWS).astype(int)
        w = np.array(rec["weights"])
        if np.allclose(w, 1.0):
            continue  # before the first update
        # w_i = alpha[d_i] / q[d_i] = 2 alpha[d_i], alpha one of the run's updates (rounded to 5 digits in the log)
        assert any(np.allclose(w, 2 * a[dom], atol=1e-5) for a in alphas), (w, dom)
        weighted += 1
    assert weighted >= 8
    assert (out / "domain_weights.json").is_file()


@pytest.mark.parametrize("form", ["sample"])
def test_doremi_sampling_form_trains_end_to_end(run_cfg, tmp_path, form):
    path, _ = run_cfg
    run_stage_job(load_config(path, ["loss.signal=ref_loss"]), "loss", progress=False)
    out = tmp_path / form
    train(load_config(path, [f"output_dir={out}", "train_type=mix", "component=doremi", "warmup_step=2",
                             "update_step=1", "loss.signal=ref_loss", f"component_args.form={form}"]))
    decided = [d for d in _decisions(out) if d.get("doremi/drawn_from")]
    # each window's counts are a multinomial draw of one batch (4) from alpha: proportions in quarters
    assert decided and all(v * 4 == int(v * 4) for d in decided[1:] for v in d["proportions"].values())
