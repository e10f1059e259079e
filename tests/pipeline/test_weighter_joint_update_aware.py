"""joint_update_aware: the simplex maximiser against an independent solver and the KKT conditions, its modes on
hand-made embeddings, and the weighter around it."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import minimize

from pipeline.strategies import WEIGHTERS
from pipeline.strategies.weighters.joint_update_aware import JointUpdateAwareParams, solve_weights
from store.errors import FlexfeedError


def objective(w, s, gram, beta, tau):
    """J(w) = s^T w - beta/2 w^T S w - tau sum w log w, written out again here."""
    return s @ w - beta / 2 * w @ gram @ w - tau * np.sum(w * np.log(w))


def scipy_maximiser(s, gram, beta, tau):
    """The maximiser of J on the simplex by BFGS over unconstrained logits (w = softmax(x))."""

    def neg(x):
        w = np.exp(x - x.max())
        w /= w.sum()
        return -objective(w, s, gram, beta, tau)

    best = minimize(neg, np.zeros(s.size), method="BFGS", options={"gtol": 1e-12, "maxiter": 10_000})
    w = np.exp(best.x - best.x.max())
    return w / w.sum()


def random_batch(n=12, d=5, seed=0):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, d))
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    u = rng.normal(size=d)
    return z @ (u / np.linalg.norm(u)), z @ z.T


@pytest.mark.parametrize("beta,tau,damping", [(0.1, 0.05, 1.0), (1.0, 0.2, 0.5), (4.0, 0.02, 1.0)])
def test_the_fixed_point_is_the_maximiser_and_meets_the_kkt_conditions(beta, tau, damping):
    s, gram = random_batch(seed=int(beta * 10))
    p = JointUpdateAwareParams(beta=beta, tau=tau, damping=damping, tol=1e-12, max_iters=5000)
    sol = solve_weights(s, gram, p)
    assert sol.converged and sol.w.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(sol.w, scipy_maximiser(s, gram, beta, tau), atol=2e-5)
    # stationarity on the simplex: dJ/dw_i = s_i - beta (S w)_i - tau (log w_i + 1) is the same for every i
    grad = s - beta * gram @ sol.w - tau * (np.log(sol.w) + 1)
    assert np.ptp(grad) < 1e-8
    rng = np.random.default_rng(1)  # and no point of the simplex nearby does better
    for _ in range(50):
        other = np.abs(sol.w + rng.normal(scale=1e-3, size=s.size))
        assert objective(other / other.sum(), s, gram, beta, tau) <= objective(sol.w, s, gram, beta, tau) + 1e-12


def test_an_undamped_iteration_that_oscillates_still_converges():
    """beta/tau = 200 makes the plain fixed-point map oscillate; the halved steps reach the maximiser."""
    s, gram = random_batch(n=8, seed=3)
    p = JointUpdateAwareParams(beta=2.0, tau=0.01, damping=1.0, tol=1e-10, max_iters=5000)
    w = np.full(8, 1 / 8)
    swings = []
    for _ in range(40):  # the undamped map, by hand: its steps do not shrink
        nxt = np.exp((s - 2.0 * gram @ w) / 0.01 - ((s - 2.0 * gram @ w) / 0.01).max())
        nxt /= nxt.sum()
        swings.append(np.abs(nxt - w).sum())
        w = nxt
    assert min(swings[-10:]) > 0.1
    sol = solve_weights(s, gram, p)
    assert sol.converged
    np.testing.assert_allclose(sol.w, scipy_maximiser(s, gram, 2.0, 0.01), atol=1e-4)


def test_modes_on_hand_made_embeddings():
    # rows: e1 twice (a duplicate pair), e2, and (e1+e2)/sqrt2; the target points along e1
    r = 1 / np.sqrt(2)
    z = np.array([[1, 0], [1, 0], [0, 1], [r, r]], dtype=np.float64)
    s, gram = z @ np.array([1.0, 0.0]), z @ z.T
    align = solve_weights(s, gram, JointUpdateAwareParams(objective_mode="align_only", tau=0.5)).w
    e = np.exp(np.array([1, 1, 0, r]) / 0.5)
    np.testing.assert_allclose(align, e / e.sum(), rtol=1e-12)  # softmax(s / tau) by hand
    uniform = solve_weights(s, gram, JointUpdateAwareParams(objective_mode="uniform")).w
    np.testing.assert_allclose(uniform, np.full(4, 0.25))
    diverse = solve_weights(s, gram, JointUpdateAwareParams(objective_mode="diverse_only", beta=1.0, tau=0.1,
                                                              tol=1e-12)).w
    np.testing.assert_allclose(diverse, scipy_maximiser(np.zeros(4), gram, 1.0, 0.1), atol=1e-5)
    assert diverse[0] == pytest.approx(diverse[1]) and diverse[0] < diverse[2]  # the duplicates share less
    full = solve_weights(s, gram, JointUpdateAwareParams(beta=1.0, tau=0.1, tol=1e-12)).w
    np.testing.assert_allclose(full, scipy_maximiser(s, gram, 1.0, 0.1), atol=1e-5)
    assert full[0] > full[2]  # aligned beats orthogonal even though e1 is duplicated


def test_the_weighter_scales_to_mean_one_and_reads_the_target_mean(make_ctx):
    rng = np.random.default_rng(5)
    target = rng.normal(size=(6, 4))
    z = rng.normal(size=(8, 4))
    w8 = WEIGHTERS.build("joint_update_aware", {"beta": 0.5, "tau": 0.1, "tol": 1e-12})
    assert np.array_equal(w8.weights(np.ones(8), np.arange(8), np.zeros(8), 0), np.ones(8))  # before any update
    w8.update(make_ctx(8, target={"embed": target}))
    w8.batch_hidden = 3.0 * z  # scale is irrelevant: rows are normalised
    weights = w8.weights(np.ones(8), np.arange(8), np.zeros(8), 5)
    zn = z / np.linalg.norm(z, axis=1, keepdims=True)
    tn = target / np.linalg.norm(target, axis=1, keepdims=True)
    u = tn.mean(0) / np.linalg.norm(tn.mean(0))
    np.testing.assert_allclose(weights, 8 * scipy_maximiser(zn @ u, zn @ zn.T, 0.5, 0.1), atol=1e-4)
    assert weights.mean() == pytest.approx(1.0)
    log = w8.batch_log()
    assert log["converged"] and log["ess"] == pytest.approx(weights.sum() ** 2 / (weights**2).sum())
    restored = WEIGHTERS.build("joint_update_aware", {"beta": 0.5, "tau": 0.1, "tol": 1e-12})
    restored.load_state_dict(w8.state_dict())
    restored.batch_hidden = 3.0 * z
    np.testing.assert_allclose(restored.weights(np.ones(8), np.arange(8), np.zeros(8), 5), weights)
    w8.batch_hidden = z[:, :3]
    with pytest.raises(FlexfeedError, match="batch hidden states of shape"):
        w8.weights(np.ones(8), np.arange(8), np.zeros(8), 5)


@pytest.mark.parametrize("args", [{"tau": 0.0}, {"damping": 1.5}, {"objective_mode": "both"}, {"beta": -1.0}])
def test_bad_parameters_are_refused(args):
    with pytest.raises(FlexfeedError):
        WEIGHTERS.build("joint_update_aware", args)


def test_batch_rows_pool_to_the_stored_embedding_of_the_same_text(tiny_checkpoint):
    """Z (right-padded training batch, BatchHidden) and u's rows (embed stage, left padding) are one function."""
    import torch

    from pipeline.batch_hidden import BatchHidden
    from stages.args import EmbedArgs, ModelArgs
    from stages.batching import pad_batch
    from stages.embed import EmbedStage
    from stages.models import load_model

    ids = [[5, 9, 14, 3, 22, 7], [8, 4], [30, 31, 32, 33]]
    model = load_model(ModelArgs(model_name_or_path=str(tiny_checkpoint)), trainable=False).eval()
    for pooling in ("last", "mean"):
        stage = EmbedStage(ModelArgs(model_name_or_path=str(tiny_checkpoint)),
                           EmbedArgs(backend="hf", pooling=pooling, layer=-2), padding_side="left")
        stored = stage.compute({"input_ids": ids})
        batch = pad_batch(ids, pad_id=0, side="right")
        with torch.no_grad():
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
        z = BatchHidden(layer=-2, pooling=pooling).pool(out.hidden_states, batch["attention_mask"]).numpy()
        z /= np.linalg.norm(z, axis=1, keepdims=True)
        np.testing.assert_allclose(z, stored, atol=2e-3)  # the store keeps float16


def test_configs_it_cannot_work_under_are_refused_before_training(tiny_checkpoint, tmp_path):
    from pipeline.config import load_config
    from pipeline.prepared import prepare
    from pipeline.train import build_flex_run, training_arguments
    from tests.helpers.run_fixtures import make_run_dir

    path = make_run_dir(tmp_path, tiny_checkpoint)
    run = ["train_type=weight", "component=joint_update_aware"]
    for override in ("embed.backend=sentence-transformers", f"embed.model_name_or_path={tiny_checkpoint}"):
        with pytest.raises(FlexfeedError, match="compares each batch's hidden states"):
            load_config(path, [*run, override])  # at load: another encoder puts the target in another space
    cfg = load_config(path, [*run, "refresh.enabled=false"])
    with pytest.raises(FlexfeedError, match="never refreshes it"):
        build_flex_run(cfg, training_arguments(cfg), prepare(cfg, need_target=True))
