"""NICE's target feature is the REINFORCE gradient r * grad log p(y|x) of the summed log-probability, with a
leave-one-out baseline: checked against torch.autograd per sample, on completions of different lengths."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stages.args import GradsArgs, ModelArgs
from stages.grads.nice import NiceTargetStage, advantages

PROMPT = [5, 6, 7]
COMPLETIONS = [[8, 9], [10, 11, 12, 13, 14, 15, 16], [17], [18, 19, 20, 21]]  # lengths 2, 7, 1, 4
REWARDS = [1.0, 0.0, 0.5, 0.25]


@pytest.fixture(scope="module")
def stage(tiny_checkpoint) -> NiceTargetStage:
    """A loaded stage (4 samples, unnormalised features) whose LoRA weights are all non-zero."""
    model_args = ModelArgs(model_name_or_path=str(tiny_checkpoint), lora_rank=4, attn_implementation="eager")
    st = NiceTargetStage(model_args, GradsArgs(proj_dim=48, grad_type="sgd", batch_size=3, nice_num_samples=4,
                                               normalize=False))
    st.setup()
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in st._model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return st


def _projected_grad_log_p(stage, completion: list[int], token_mean: bool = False) -> torch.Tensor:
    """Projected grad of sum_t log p(y_t | x, y_<t) (or of its token mean), by plain autograd on one sequence."""
    model, projector = stage._model, stage._projector
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    ids = torch.tensor([PROMPT + completion])
    model.eval()
    logits = model(input_ids=ids).logits[0].double()
    logp = torch.log_softmax(logits[len(PROMPT) - 1:-1], dim=-1)
    total = logp.gather(1, torch.tensor(completion)[:, None]).sum()
    if token_mean:
        total = total / len(completion)
    grads = torch.autograd.grad(total, [p for _, p in params])
    return sum(projector.project(n, g.float()[None])[0] for (n, _), g in zip(params, grads)).double()


def test_leave_one_out_advantages_by_hand():
    got = advantages(torch.tensor([REWARDS, [0.3, 0.3, 0.3, 0.3], [1.0, 0.0, 0.0, 0.0]]))
    r = np.array(REWARDS)
    by_hand = [r[j] - (r.sum() - r[j]) / 3 for j in range(4)]
    np.testing.assert_allclose(got[0].numpy(), by_hand)
    assert got[1].eq(0).all(), "tied rewards: no advantage at all"
    np.testing.assert_allclose(got[2].numpy(), [1.0, -1 / 3, -1 / 3, -1 / 3])
    np.testing.assert_allclose(advantages(torch.tensor([[0.7], [0.0]])).numpy(), [[0.7], [0.0]])  # m = 1: no baseline


def test_feature_is_minus_the_reinforce_gradient_with_leave_one_out_baseline(stage):
    rolls = [{"prompt": PROMPT, "reference": [8, 9], "completions": COMPLETIONS, "rewards": REWARDS}]
    got = stage.policy_gradients(rolls)[0]
    g = [_projected_grad_log_p(stage, c) for c in COMPLETIONS]
    m = len(COMPLETIONS)
    b = [(sum(REWARDS) - r) / (m - 1) for r in REWARDS]
    policy_gradient = sum((r - bj) * gj for r, bj, gj in zip(REWARDS, b, g)) / m
    # the stored feature is in the loss-gradient convention of the train features: minus the ascent direction
    expected = -policy_gradient
    assert expected.norm() > 0
    np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=2e-3, atol=1e-6 * float(expected.abs().max()))

    # the old estimator (token-mean log-likelihood, mean-reward baseline) points elsewhere when lengths differ:
    # this test would have caught it
    mean_r = sum(REWARDS) / m
    old = -sum((r - mean_r) * _projected_grad_log_p(stage, c, token_mean=True) for r, c in zip(REWARDS, COMPLETIONS)) / m
    cos = float(old @ expected / (old.norm() * expected.norm()))
    assert cos < 0.99, f"old and new estimators agree (cos {cos:.4f}); the test cannot tell them apart"
    np.testing.assert_raises(AssertionError, np.testing.assert_allclose, (old / old.norm()).numpy(),
                             (expected / expected.norm()).numpy(), rtol=2e-3, atol=1e-3)


def test_one_sample_has_no_baseline(stage):
    single = NiceTargetStage(stage.model_args, GradsArgs(proj_dim=48, grad_type="sgd", nice_num_samples=1,
                                                         normalize=False))
    single._model, single._projector = stage._model, stage._projector
    got = single.policy_gradients([{"prompt": PROMPT, "reference": [8], "completions": [COMPLETIONS[1]],
                                    "rewards": [0.75]}])[0]
    np.testing.assert_allclose(got.numpy(), (-0.75 * _projected_grad_log_p(stage, COMPLETIONS[1])).numpy(),
                               rtol=2e-3, atol=1e-6)
    assert single.signal().spec["nice"]["baseline"] == "none"
    assert stage.signal().spec["nice"]["baseline"] == "leave_one_out"
    assert stage.signal().spec["code_version"] == "grads-nice-2"
