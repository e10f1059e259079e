"""NiceTargetStage: NICE's policy-gradient features of target rows (signal `grads_nice`).

For a target row with prompt x and reference answer y*, ``m`` completions y_1..y_m are sampled from
the model and scored by a reward r_j = r(x, y_j, y*) that need not be differentiable. With f_j the
projected gradient of y_j's token-mean loss (prompt masked), the row's feature is

    normalise( sum_j (r_j - mean(r)) * f_j / m )

REINFORCE with the mean reward as baseline: since the loss is minus the (length-normalised) log
likelihood, descending along this vector raises the expected reward. The projection is linear, so
this is the projection of the policy gradient itself. When every reward of a row is equal the
policy gradient is zero and carries no direction: the row then falls back to the plain SGD feature
of its reference answer (the `grads_sgd` value), and the count of such rows is kept in
``fallback_rows``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace

import numpy as np
import torch

from stages.args import GradsArgs, ModelArgs
from stages.base import SignalDesc
from stages.batching import IGNORE_INDEX, length_sorted_batches, pad_batch
from stages.grads.features import compute_features
from stages.grads.rewards import call_reward, load_reward
from stages.grads.stage import GradsStage
from stages.models import load_tokenizer
from store.errors import FlexfeedError


def _check_nice(args: GradsArgs) -> None:
    if args.nice_num_samples < 2:
        raise FlexfeedError(f"grads.nice_num_samples is {args.nice_num_samples}; the mean-reward baseline needs "
                            "at least 2 completions per prompt", hint="e.g. nice_num_samples: 4")
    if not args.nice_temperature > 0:
        raise FlexfeedError(f"grads.nice_temperature must be > 0, got {args.nice_temperature}",
                            hint="e.g. nice_temperature: 1.0")
    if args.nice_max_new_tokens < 1:
        raise FlexfeedError(f"grads.nice_max_new_tokens must be >= 1, got {args.nice_max_new_tokens}",
                            hint="e.g. nice_max_new_tokens: 32")
    load_reward(args.nice_reward)  # fail at construction, not on a worker


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


def _strip_eos(ids: list[int], eos: set[int]) -> list[int]:
    return ids[:-1] if ids and ids[-1] in eos else ids


class NiceTargetStage(GradsStage):
    """Signal `grads_nice`: (rows, proj_dim) policy-gradient features of target rows, one per checkpoint."""

    code_version = "grads-nice-1"

    def __init__(self, model_args: ModelArgs, args: GradsArgs, checkpoint: str | None = None):
        _check_nice(args)
        # sampled completions are trained like SFT answers: raw (sgd) gradients, no preconditioning
        super().__init__(model_args, replace(args, grad_type="sgd"), checkpoint)
        self._eos: set[int] = set()
        self.fallback_rows = 0

    def signal(self) -> SignalDesc:
        """`grads_nice`: the grads_sgd spec plus sampling, reward and this stage's code version."""
        base = super().signal()
        spec = {**base.spec, "kind": "grads_nice", "code_version": self.code_version,
                "nice": {"num_samples": self.args.nice_num_samples, "temperature": self.args.nice_temperature,
                         "max_new_tokens": self.args.nice_max_new_tokens, "reward": self.args.nice_reward,
                         "sampling": "plain", "baseline": "mean", "fallback": "sgd_reference"}}
        return SignalDesc(name="grads_nice", spec=spec, dtype=base.dtype, dim=base.dim, sources=base.sources)

    def setup(self) -> None:
        """Load the model and projector (as GradsStage) and the tokenizer's end-of-sequence ids."""
        if self._model is None:
            super().setup()
            self._set_eos(load_tokenizer(self.model_args))

    def bind_model(self, model, tokenizer, adam_state=None) -> None:
        """Compute with an already-loaded (training) model (sgd features: no Adam state is read)."""
        super().bind_model(model, tokenizer, adam_state)
        self._set_eos(tokenizer)

    def _set_eos(self, tokenizer) -> None:
        eos = tokenizer.eos_token_id
        self._eos = set(eos) if isinstance(eos, list | tuple) else ({int(eos)} if eos is not None else set())

    def rollouts(self, rows: dict[str, list]) -> list[dict]:
        """Per row: prompt, reference, sampled completions (with end-of-sequence) and their rewards."""
        self.setup()
        reward = load_reward(self.args.nice_reward)
        input_ids = rows["input_ids"]
        labels = rows.get("labels")
        if labels is None:
            raise FlexfeedError("target rows have no labels", hint="NICE needs sft target rows with labels")
        out = []
        for i, (ids, lab) in enumerate(zip(input_ids, labels)):
            prompt, reference = split_row(list(ids), list(lab), i)
            completions = self._sample(prompt, row_seed(self.args.seed, prompt, reference))
            ref = _strip_eos(reference, self._eos)
            rewards = [call_reward(reward, self.args.nice_reward, prompt, _strip_eos(c, self._eos), ref, i)
                       for c in completions]
            out.append({"prompt": prompt, "reference": reference, "completions": completions, "rewards": rewards})
        return out

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
            out[index] = compute_features(self._model, batch, self._projector, None, normalize=False).cpu()
        return out

    def compute(self, rows: dict[str, list]) -> np.ndarray:
        """(len(rows), proj_dim) float32 policy-gradient features (SGD reference feature where rewards tie)."""
        rolls = self.rollouts(rows)
        m = self.args.nice_num_samples
        seqs, labels = [], []
        for r in rolls:
            for c in r["completions"]:
                seqs.append(r["prompt"] + c)
                labels.append([IGNORE_INDEX] * len(r["prompt"]) + c)
        feats = self._features(seqs, labels).view(len(rolls), m, -1)
        rewards = torch.tensor([r["rewards"] for r in rolls], dtype=torch.float64)
        advantage = (rewards - rewards.mean(dim=1, keepdim=True)) / m
        equal = (rewards == rewards[:, :1]).all(dim=1)
        advantage[equal] = 0.0  # exactly, whatever the rounding of the mean
        out = torch.einsum("rj,rjd->rd", advantage, feats.double()).float()
        tied = [i for i in range(len(rolls)) if not bool(out[i].any())]
        if tied:
            # all rewards equal (or every advantage-weighted gradient cancels): no policy direction
            ref_ids = [list(rows["input_ids"][i]) for i in tied]
            ref_labels = [list(rows["labels"][i]) for i in tied]
            out[tied] = self._features(ref_ids, ref_labels)
        self.fallback_rows += len(tied)
        if self.args.normalize:
            out = torch.nn.functional.normalize(out, dim=1)
        return out.numpy()


def nice_stages(model_args: ModelArgs, args: GradsArgs) -> list[NiceTargetStage]:
    """One NICE target stage per checkpoint in ``args.checkpoints`` (the model as loaded when none)."""
    return [NiceTargetStage(model_args, args, c) for c in (args.checkpoints or [None])]
