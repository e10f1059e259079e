"""DoReMi's per-sample excess (what flexfeed stores) against the exact per-token excess, on a tiny Llama.

DoReMi clips max(l_proxy - l_ref, 0) per token; flexfeed clips per sample, because only per-sample
reference losses are stored. Both variants are run along the same proxy trajectory (two domains, packed
rows of equal length, so token and sample averages weigh rows alike) and compared step by step.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from pipeline.strategies import MIXERS

CODE = ["def add(a, b):\n    return a + b\n", "import os\nprint(os.getcwd())\n", "for i in range(10):\n    print(i * i)\n",
        "class Point:\n    def __init__(self, x):\n        self.x = x\n", "while n > 0:\n    n = n - 1\n"]
PROSE = ["The quick brown fox jumps over the lazy dog.", "Rivers flow to the sea and the sea returns the rain.",
         "The capital of France is Paris. The capital of Italy is Rome.",
         "Bright stars shine above quiet hills at night.", "Old sailors tell long stories about storms and gulls."]
SEQ_TOKENS = 16
ROWS_PER_DOMAIN = 8
ETA, EPS = 1.0, 1e-3


def packed_rows(tok, texts):
    """Texts tokenised and packed into rows of SEQ_TOKENS tokens (pt style: no padding, equal lengths)."""
    ids: list[int] = []
    for text in texts * 4:
        ids += tok(text)["input_ids"] + [tok.eos_token_id]
    return torch.tensor([ids[i * SEQ_TOKENS:(i + 1) * SEQ_TOKENS] for i in range(ROWS_PER_DOMAIN)])


def token_losses(model, x) -> np.ndarray:
    """Next-token cross-entropy of every predicted position: (rows, SEQ_TOKENS - 1)."""
    with torch.no_grad():
        logits = model(input_ids=x).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                                 reduction="none")
    return loss.view(x.shape[0], -1).double().numpy()


def train_steps(model, x, steps, opt):
    model.train()
    for _ in range(steps):
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def exact_step(alpha, excess):
    """DoReMi's update written out: alpha * exp(eta * excess), normalised, smoothed toward uniform."""
    prime = [a * math.exp(ETA * e) for a, e in zip(alpha, excess)]
    return [(1 - EPS) * p / sum(prime) + EPS / len(alpha) for p in prime]


@pytest.mark.timeout(60)
def test_per_sample_excess_against_exact_per_token_online_doremi(make_ctx):
    from demo.tiny import build_tiny_llama, train_tokenizer

    torch.manual_seed(0)
    tok = train_tokenizer((CODE + PROSE) * 4, vocab_size=300)
    a_rows, b_rows = packed_rows(tok, CODE), packed_rows(tok, PROSE)
    x = torch.cat([a_rows, b_rows])
    domains = np.repeat([0, 1], ROWS_PER_DOMAIN)
    rows = np.arange(len(x))

    start = build_tiny_llama(tok, seed=0)
    ref = copy.deepcopy(start)  # reference: a short run that saw code twice as often as prose
    train_steps(ref, torch.cat([a_rows, a_rows, b_rows]), 8, torch.optim.AdamW(ref.parameters(), lr=5e-3))
    ref_tok = token_losses(ref, x)
    ctx = make_ctx(domain_ids=domains, domain_names=["code", "prose"], train={"ref_loss": ref_tok.mean(axis=1)})

    proxy = copy.deepcopy(start)
    opt = torch.optim.AdamW(proxy.parameters(), lr=5e-3)
    mixer = MIXERS.build("doremi", {"reweight_eta": ETA, "reweight_eps": EPS})
    exact_alpha, exact_history, sample_history, gaps = [0.5, 0.5], [], [], []
    for step in range(1, 11):
        proxy_tok = token_losses(proxy, x)
        diff = proxy_tok - ref_tok
        per_token = [np.maximum(diff[domains == k], 0).mean() for k in (0, 1)]
        per_sample = [np.maximum(diff[domains == k].mean(axis=1), 0).mean() for k in (0, 1)]

        mixer.observe(domains, proxy_tok.mean(axis=1), rows, step)
        before = mixer.alpha.copy() if mixer.alpha is not None else np.full(2, 0.5)
        mixer.proportions(ctx)
        sampled = mixer.alpha.copy()  # the weights alpha_t (the draw stays on the reference mixture)
        np.testing.assert_allclose(ctx.log["doremi/excess"], per_sample, rtol=1e-9, atol=1e-12)
        exact_before = list(exact_alpha)
        exact_alpha = exact_step(exact_alpha, per_token)

        # Clipping the mean can only lower the excess (max of a mean <= mean of maxes).
        assert all(s <= t + 1e-12 for s, t in zip(per_sample, per_token))
        # Same direction: both move weight toward the domain with the larger excess.
        if abs(per_sample[0] - per_sample[1]) > 1e-3:
            assert np.sign(sampled[0] - before[0]) == np.sign(exact_alpha[0] - exact_before[0])
        gaps.append(max(t - s for s, t in zip(per_sample, per_token)))
        exact_history.append(exact_alpha)
        sample_history.append(sampled)
        train_steps(proxy, x, 1, opt)

    exact_avg = np.mean(exact_history, axis=0)
    sample_avg = np.array(list(mixer.final_weights().values()))
    diff_avg = float(np.abs(exact_avg - sample_avg).max())
    print(f"excess gap per step (per-token - per-sample, max over domains): {np.round(gaps, 3).tolist()}")
    print(f"averaged weights: per-token {np.round(exact_avg, 4).tolist()}, per-sample {np.round(sample_avg, 4).tolist()}"
          f", max difference {diff_avg:.4f}")
    # Early on the proxy is worse than the reference on every token and the two rules coincide.
    assert gaps[0] < 1e-9
    # Both runs end up favouring the same domain, with close averaged weights.
    assert np.argmax(exact_avg) == np.argmax(sample_avg)
    assert diff_avg < 0.05
