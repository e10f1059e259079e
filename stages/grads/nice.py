"""NiceTargetStage: NICE's policy-gradient features of target rows (signal `grads_nice`).

For a target row with prompt x and reference answer y*, ``m`` completions y_1..y_m are sampled from
the model and scored by a reward r_j = r(x, y_j, y*) that need not be differentiable (a function of
token ids, or a judge model: stages.grads.reward_models). REINFORCE estimates the gradient of the
expected reward as (1/m) sum_j (r_j - b_j) grad log p(y_j | x), with log p(y_j | x) the *summed*
log-probability of the completion's tokens and, from m = 2 on, the leave-one-out baseline
b_j = mean of the other samples' rewards (b_j = 0 for m = 1). The row's feature is that estimate in
the loss-gradient convention the train `grads` features use (minus it: a step *down* the feature raises
the expected reward, as a step down LESS's target gradient lowers the target loss), projected and
normalised:

    normalise( sum_j (r_j - b_j) * n_j * f_j / m )

where f_j is the projected gradient of y_j's token-mean loss (prompt masked) and n_j its token count,
so n_j * f_j is the projected gradient of -log p(y_j | x). The projection is linear, so this is the
projection of the policy gradient itself.

A row whose advantages are all zero (every reward equal, or a single sample scored 0) has a zero policy
gradient estimate: its feature is the zero vector, which adds nothing to the selector's cosine sums.
Such rows are counted in ``tied_rows``, logged per shard, and visible in the stored signal as all-zero rows.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import replace

import numpy as np
import torch

from stages.args import GradsArgs, ModelArgs
from stages.base import SignalDesc
from stages.batching import IGNORE_INDEX, length_sorted_batches, pad_batch
from stages.grads.features import compute_features
from stages.grads.reward_models import Judged, RewardModel, build_reward_model
from stages.grads.rewards import call_reward, load_reward
from stages.grads.stage import GradsStage
from stages.models import load_tokenizer
from store.errors import FlexfeedError

log = logging.getLogger(__name__)


def split_row(input_ids: list[int], labels: list[int], row: int) -> tuple[list[int], list[int]]:
    """(prompt, reference): the leading label-masked tokens, and every labelled token after them."""
    start = next((i for i, lab in enumerate(labels) if lab != IGNORE_INDEX), len(labels))
    if start == 0:
        raise FlexfeedError(f"target row {row} has no prompt: its first token is trained",
                            hint="NICE needs sft target rows (stage: sft, prompt masked from labels)")
    reference = [int(t) for t, lab in zip(input_ids[start:], labels[start:]) if lab != IGNORE_INDEX]
    return [int(t) for t in input_ids[:start]], reference


def row_seed(seed: int, prompt: list[int], reference: list[int]) -> int:
    """A 63-bit sampling seed from the stage seed and the row's content (stable everywhere)."""
    text = json.dumps(["nice", int(seed), prompt, reference], separators=(",", ":"))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") & ((1 << 63) - 1)


def advantages(rewards: torch.Tensor) -> torch.Tensor:
    """(rows, m) rewards -> r_j - b_j, b_j the mean of the row's other rewards (0 when m is 1); exactly 0
    for every sample of a row whose rewards all tie."""
    rewards = rewards.double()
    m = rewards.shape[1]
    if m == 1:
        return rewards.clone()
    baseline = (rewards.sum(dim=1, keepdim=True) - rewards) / (m - 1)
    out = rewards - baseline
    out[(rewards == rewards[:, :1]).all(dim=1)] = 0.0  # exactly, whatever the rounding of the baseline
    return out


def _strip_eos(ids: list[int], eos: set[int]) -> list[int]:
    return ids[:-1] if ids and ids[-1] in eos else ids


class NiceTargetStage(GradsStage):
    """Signal `grads_nice`: (rows, proj_dim) policy-gradient features of target rows, one per checkpoint."""

    code_version = "grads-nice-2"

    def __init__(self, model_args: ModelArgs, args: GradsArgs, checkpoint: str | None = None):
        # GradsArgs checks the ranges and the reward settings; the reward itself is found here, not on a worker
        self._judge: RewardModel | None = build_reward_model(args)
        if self._judge is None:
            load_reward(args.nice_reward)
        # sampled completions are trained like SFT answers: raw (sgd) gradients, no preconditioning
        super().__init__(model_args, replace(args, grad_type="sgd"), checkpoint)
        self._eos: set[int] = set()
        self._tokenizer = None
        self._reward_spec = None
        self.tied_rows = 0
        """Target rows whose advantages were all zero (zero feature), over this object's life."""
        self.rows_seen = 0

    def __getstate__(self):
        state = super().__getstate__()
        state["_judge"] = None  # a worker builds its own judge (a loaded model or an api key stays here)
        state["_tokenizer"] = None
        return state

    def judge(self) -> RewardModel | None:
        """The configured judge model (None when rewards come from the `nice_reward` function)."""
        if self._judge is None and self.args.nice_reward_backend != "function":
            self._judge = build_reward_model(self.args)
        return self._judge

    def signal(self) -> SignalDesc:
        """`grads_nice`: the grads_sgd spec plus sampling, reward, estimator and this stage's code version."""
        base = super().signal()
        a = self.args
        if self._reward_spec is None:  # a judge's spec hashes its weights: once, and shipped with the stage
            judge = self.judge()
            self._reward_spec = a.nice_reward if judge is None else judge.spec()
        spec = {**base.spec, "kind": "grads_nice", "code_version": self.code_version,
                "nice": {"num_samples": a.nice_num_samples, "temperature": a.nice_temperature,
                         "max_new_tokens": a.nice_max_new_tokens, "max_prompt_tokens": a.nice_max_prompt_tokens,
                         "reward": self._reward_spec, "sampling": "plain",
                         "log_prob": "sum", "baseline": "leave_one_out" if a.nice_num_samples >= 2 else "none",
                         "tied": "zero"}}
        return SignalDesc(name="grads_nice", spec=spec, dtype=base.dtype, dim=base.dim, sources=base.sources)

    def setup(self) -> None:
        """Load the model and projector (as GradsStage) and the tokenizer's end-of-sequence ids."""
        if self._model is None:
            super().setup()
            self._set_tokenizer(load_tokenizer(self.model_args))

    def bind_model(self, model, tokenizer, adam_state=None) -> None:
        """Compute with an already-loaded (training) model (sgd features: no Adam state is read)."""
        super().bind_model(model, tokenizer, adam_state)
        self._set_tokenizer(tokenizer)

    def _set_tokenizer(self, tokenizer) -> None:
        self._tokenizer = tokenizer
        eos = tokenizer.eos_token_id
        self._eos = set(eos) if isinstance(eos, list | tuple) else ({int(eos)} if eos is not None else set())

    def rollouts(self, rows: dict[str, list]) -> list[dict]:
        """Per row: prompt (as sampled from), reference, sampled completions (with end-of-sequence), rewards."""
        self.setup()
        input_ids = rows["input_ids"]
        labels = rows.get("labels")
        if labels is None:
            raise FlexfeedError("target rows have no labels", hint="NICE needs sft target rows with labels")
        keep = self.args.nice_max_prompt_tokens
        out = []
        for i, (ids, lab) in enumerate(zip(input_ids, labels)):
            prompt, reference = split_row(list(ids), list(lab), i)
            seed = row_seed(self.args.seed, prompt, reference)
            prompt = prompt[-keep:] if keep else prompt
            out.append({"prompt": prompt, "reference": reference, "completions": self._sample(prompt, seed)})
        self._score(out)
        return out

    def _score(self, rolls: list[dict]) -> None:
        """Set each rollout's rewards: the judge's, in one call for the shard, or the reward function's."""
        judge = self.judge()
        if judge is None:
            reward = load_reward(self.args.nice_reward)
            for i, r in enumerate(rolls):
                ref = _strip_eos(r["reference"], self._eos)
                r["rewards"] = [call_reward(reward, self.args.nice_reward, r["prompt"], _strip_eos(c, self._eos), ref, i)
                                for c in r["completions"]]
            return
        decode = self._tokenizer.decode
        items = [Judged(prompt=decode(r["prompt"], skip_special_tokens=True),
                        completion=decode(_strip_eos(c, self._eos), skip_special_tokens=True),
                        reference=decode(_strip_eos(r["reference"], self._eos), skip_special_tokens=True))
                 for r in rolls for c in r["completions"]]
        scores = judge.score(items)
        m = self.args.nice_num_samples
        for k, r in enumerate(rolls):
            r["rewards"] = [float(s) for s in scores[k * m:(k + 1) * m]]

    def _sample(self, prompt: list[int], seed: int) -> list[list[int]]:
        """num_samples completions of one prompt, seeded; the global RNG state is left as it was."""
        from transformers import GenerationConfig

        model = self._model
        device = next(model.parameters()).device
        eos = sorted(self._eos)
        # every sampling knob set explicitly, so a checkpoint's generation_config cannot change it
        config = GenerationConfig(
            do_sample=True, temperature=float(self.args.nice_temperature), top_k=0, top_p=1.0, typical_p=1.0,
            min_p=None, repetition_penalty=1.0, no_repeat_ngram_size=0, min_length=0, num_beams=1,
            epsilon_cutoff=0.0, eta_cutoff=0.0, max_new_tokens=self.args.nice_max_new_tokens,
            num_return_sequences=self.args.nice_num_samples, pad_token_id=self._pad_id,
            eos_token_id=eos or None,
        )
        ids = torch.tensor([prompt], dtype=torch.long, device=device)
        was_training = model.training
        model.eval()
        # one prompt per generate call: its completions do not depend on which rows share the shard
        devices = [device] if device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices), torch.no_grad():
                torch.manual_seed(seed)
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
        finally:
            model.train(was_training)
        completions = []
        for seq in out[:, len(prompt):].tolist():
            end = next((k + 1 for k, t in enumerate(seq) if t in self._eos), len(seq))
            completions.append(seq[:end])
        return completions

    def _features(self, seqs: list[list[int]], labels: list[list[int]]):
        """(len(seqs), proj_dim) unnormalised projected gradients of each sequence's token-mean loss."""
        out = torch.zeros(len(seqs), self.args.proj_dim, dtype=torch.float32)
        for index in length_sorted_batches([len(s) for s in seqs], self.args.batch_size):
            batch = pad_batch([seqs[i] for i in index], [labels[i] for i in index], pad_id=self._pad_id)
            out[index] = compute_features(self._model, batch, self._projector, None, normalize=False,
                                          compute_dtype=self.args.compute_dtype).cpu()
        return out

    def policy_gradients(self, rolls: list[dict]) -> torch.Tensor:
        """(rows, proj_dim) float64 projected -(1/m) sum_j (r_j - b_j) grad log p(y_j | x), before normalising."""
        m = self.args.nice_num_samples
        seqs, labels, lengths = [], [], []
        for r in rolls:
            for c in r["completions"]:
                seqs.append(r["prompt"] + c)
                labels.append([IGNORE_INDEX] * len(r["prompt"]) + c)
                lengths.append(len(c))
        # n_j times the token-mean loss gradient is the summed one: -grad log p(y_j | x)
        feats = self._features(seqs, labels).double() * torch.tensor(lengths, dtype=torch.float64)[:, None]
        adv = advantages(torch.tensor([r["rewards"] for r in rolls], dtype=torch.float64))
        return torch.einsum("rj,rjd->rd", adv / m, feats.view(len(rolls), m, -1))

    def compute(self, rows: dict[str, list]) -> np.ndarray:
        """(len(rows), proj_dim) float32 policy-gradient features (the zero vector where rewards tie)."""
        rolls = self.rollouts(rows)
        out = self.policy_gradients(rolls)
        tied = advantages(torch.tensor([r["rewards"] for r in rolls])).eq(0).all(dim=1)
        out[tied] = 0.0
        self.tied_rows += int(tied.sum())
        self.rows_seen += len(rolls)
        if bool(tied.any()):
            log.warning("grads_nice: %d of %d target rows have tied rewards (no sample scored differently): their "
                        "feature is zero, so they add nothing to the selector's scores", int(tied.sum()), len(rolls))
        if self.args.normalize:
            out = torch.nn.functional.normalize(out, dim=1)
        return out.float().numpy()


def nice_stages(model_args: ModelArgs, args: GradsArgs) -> list[NiceTargetStage]:
    """One NICE target stage per checkpoint in ``args.checkpoints`` (the model as loaded when none)."""
    return [NiceTargetStage(model_args, args, c) for c in (args.checkpoints or [None])]
