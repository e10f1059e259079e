"""Judge models for NICE's rewards: a model reads prompt, reference and a sampled completion and gives a score.

One interface (`RewardModel.score(items) -> list[float]`) with three backends, chosen by
`grads.nice_reward_backend`:

- `transformers`: the judge checkpoint `nice_reward_model` loaded with transformers, on the GPU when
  there is one, else the CPU. A sequence-classification checkpoint (its config's architecture ends in
  `ForSequenceClassification`) is scored by its head, as DataFlex does: sigmoid of a single logit, else
  the softmax probability of the last class. Any other checkpoint is a causal LM that writes its answer
  after the prompt (greedy when `nice_reward_temperature` is 0), and the first number of that answer,
  clipped to [0, 1], is the score.
- `vllm`: the same causal-LM judge through vllm (imported only here; refused when the config is loaded
  on a machine without vllm or a GPU).
- `api`: an OpenAI-compatible chat-completions endpoint; the key is read from the environment variable
  named by `nice_reward_api_key_env` (DataFlex's `DF_API_KEY`), never from the config.

Every backend reads the same judge prompt: DataFlex's layout (a 0.0-1.0 score of the candidate against the
reference, ending in `Score:`), with the target's whole decoded prompt as the instruction. A reply with no
number scores 0.0 and is counted in `unparsed`.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from stages.values import FieldError
from store.errors import FlexfeedError

log = logging.getLogger(__name__)

JUDGE_PROMPT_VERSION = "nice-judge-1"
"""Bump when the prompt text or the score parsing changes: part of the grads_nice key."""

_HEAD = ("You are a reward model. Your task is to evaluate an AI's response to an instruction{against}. "
         "Provide a single score between 0.0 (worst) and 1.0 (best).\n\n")
JUDGE_PROMPT = (_HEAD.format(against=", given a reference answer")
                + "A score of 1.0 means the Candidate response is correct, helpful and agrees with the Reference "
                  "answer.\nA score of 0.0 means it is incorrect, unhelpful or contradicts the Reference.\n\n"
                  "### Instruction:\n{prompt}\n### Reference:\n{reference}\n### Candidate:\n{completion}\nScore:")
JUDGE_PROMPT_NO_REFERENCE = (_HEAD.format(against="")
                             + "A score of 1.0 means the Candidate response is correct, helpful and safe.\n"
                               "A score of 0.0 means it is incorrect, unhelpful or unsafe.\n\n"
                               "### Instruction:\n{prompt}\n### Candidate:\n{completion}\nScore:")
_NUMBER = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+|\d+)")
API_ATTEMPTS = 3


@dataclass(frozen=True)
class Judged:
    """One completion to score, as text: the target's prompt, the sampled completion, the reference answer."""

    prompt: str
    completion: str
    reference: str


def judge_prompt(item: Judged) -> str:
    """The judge's input for one completion (the no-reference form when the reference is empty)."""
    completion = item.completion.strip() or "No response."
    if item.reference.strip():
        return JUDGE_PROMPT.format(prompt=item.prompt.strip(), reference=item.reference.strip(), completion=completion)
    return JUDGE_PROMPT_NO_REFERENCE.format(prompt=item.prompt.strip(), completion=completion)


def parse_score(text: str) -> float | None:
    """The first number of a judge's reply clipped to [0, 1]; None when the reply has none."""
    match = _NUMBER.search(text)
    if match is None:
        return None
    return min(1.0, max(0.0, float(match.group())))


class RewardModel:
    """Scores completions with a judge; `spec()` is what determines the scores (part of the grads_nice key)."""

    backend = ""

    def __init__(self, args):
        self.args = args
        self.unparsed = 0
        """Replies with no number (scored 0.0), over this object's life."""

    def spec(self) -> dict:
        """The settings that determine the scores (no path, no key)."""
        raise NotImplementedError

    def score(self, items: Sequence[Judged]) -> list[float]:
        """One score in [0, 1] per item, in order."""
        raise NotImplementedError

    def _parse_all(self, replies: Sequence[str]) -> list[float]:
        scores = [parse_score(r) for r in replies]
        missing = sum(s is None for s in scores)
        if missing:
            self.unparsed += missing
            log.warning("NICE %s judge: %d of %d replies have no number; they score 0.0 (first: %r)",
                        self.backend, missing, len(scores), next(r for r, s in zip(replies, scores) if s is None)[:80])
        return [0.0 if s is None else s for s in scores]

    def _sampling_spec(self) -> dict:
        a = self.args
        return {"temperature": a.nice_reward_temperature, "top_p": a.nice_reward_top_p, "top_k": a.nice_reward_top_k,
                "seed": a.nice_reward_seed, "max_new_tokens": a.nice_reward_max_new_tokens,
                "max_model_len": a.nice_reward_max_model_len}


def judge_dir(path: str) -> Path:
    """The local folder of a judge checkpoint (flexfeed loads local checkpoints only)."""
    root = Path(path).expanduser()
    if not (root / "config.json").is_file():
        raise FlexfeedError(f"grads.nice_reward_model {path!r} is not a local checkpoint folder (no config.json)",
                            "download the judge model and give its folder")
    return root


def judge_identity(path: str) -> str:
    """The judge's weight hash (its folder's weights and config, not its path)."""
    from store.hashing import fingerprint_directory

    return fingerprint_directory(judge_dir(path))


def is_classifier(path: str) -> bool:
    """Whether the judge checkpoint is a sequence-classification reward model (scored by its head)."""
    config = json.loads((judge_dir(path) / "config.json").read_text())
    return any(str(a).endswith("ForSequenceClassification") for a in config.get("architectures") or [])


class TransformersJudge(RewardModel):
    """The judge checkpoint run by transformers: a classifier's head, or a causal LM's first number."""

    backend = "transformers"

    def __init__(self, args):
        super().__init__(args)
        self.classifier = is_classifier(args.nice_reward_model)
        self._model = self._tokenizer = None

    def spec(self) -> dict:
        head = "classifier" if self.classifier else "generate"
        out = {"backend": self.backend, "model": judge_identity(self.args.nice_reward_model), "head": head,
               "prompt": JUDGE_PROMPT_VERSION, "max_model_len": self.args.nice_reward_max_model_len}
        return out if self.classifier else {**out, **self._sampling_spec()}

    def _load(self) -> None:
        if self._model is not None:
            return
        import torch
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

        root = judge_dir(self.args.nice_reward_model)
        cuda = torch.cuda.is_available()
        cls = AutoModelForSequenceClassification if self.classifier else AutoModelForCausalLM
        tokenizer = AutoTokenizer.from_pretrained(root, local_files_only=True)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.truncation_side = "left"  # keep the candidate and the closing `Score:`
        model = cls.from_pretrained(root, local_files_only=True, dtype=torch.bfloat16 if cuda else torch.float32)
        model.config.pad_token_id = tokenizer.pad_token_id
        self._model = model.to("cuda" if cuda else "cpu").eval().requires_grad_(False)
        self._tokenizer = tokenizer

    def _encode(self, texts: list[str], side: str):
        tok = self._tokenizer
        tok.padding_side = side
        limit = self.args.nice_reward_max_model_len
        if not self.classifier and limit is not None:
            limit = max(1, limit - self.args.nice_reward_max_new_tokens)  # room for the answer
        batch = tok(texts, return_tensors="pt", padding=True, truncation=limit is not None, max_length=limit)
        return {k: v.to(self._model.device) for k, v in batch.items()}

    def score(self, items: Sequence[Judged]) -> list[float]:
        import torch

        if not items:
            return []
        self._load()
        texts = [judge_prompt(i) for i in items]
        step = self.args.batch_size
        out: list[float] = []
        for start in range(0, len(texts), step):
            chunk = texts[start:start + step]
            with torch.no_grad():
                out += self._classify(chunk) if self.classifier else self._generate(chunk)
        return out

    def _classify(self, texts: list[str]) -> list[float]:
        import torch

        logits = self._model(**self._encode(texts, "right")).logits.float()
        if logits.shape[-1] == 1:
            return torch.sigmoid(logits[:, 0]).tolist()
        return torch.softmax(logits, dim=-1)[:, -1].tolist()

    def _generate(self, texts: list[str]) -> list[float]:
        import torch
        from transformers import GenerationConfig

        a, model = self.args, self._model
        sample = a.nice_reward_temperature > 0
        config = GenerationConfig(
            do_sample=sample, temperature=a.nice_reward_temperature if sample else None,
            top_p=a.nice_reward_top_p if sample else None, top_k=a.nice_reward_top_k if sample else None,
            max_new_tokens=a.nice_reward_max_new_tokens, num_beams=1, repetition_penalty=1.0,
            pad_token_id=self._tokenizer.pad_token_id, eos_token_id=self._tokenizer.eos_token_id)
        batch = self._encode(texts, "left")
        devices = [model.device] if model.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(a.nice_reward_seed)
            ids = model.generate(**batch, generation_config=config)
        replies = self._tokenizer.batch_decode(ids[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        return self._parse_all(replies)


def vllm_refusal() -> str | None:
    """Why a vllm judge cannot run on this machine (vllm missing, no CUDA GPU), or None when it can."""
    if importlib.util.find_spec("vllm") is None:
        return "vllm is not installed here"
    import torch

    if not torch.cuda.is_available():
        return "there is no CUDA GPU here"
    return None


class VllmJudge(RewardModel):
    """The causal-LM judge through vllm (one engine per process, loaded on first use)."""

    backend = "vllm"

    def __init__(self, args):
        super().__init__(args)
        why = vllm_refusal()
        if why is not None:
            raise FlexfeedError(f"grads.nice_reward_backend vllm: {why}",
                                "use nice_reward_backend: transformers (CPU or GPU), or run on a GPU machine with vllm")
        self._llm = None

    def spec(self) -> dict:
        return {"backend": self.backend, "model": judge_identity(self.args.nice_reward_model), "head": "generate",
                "prompt": JUDGE_PROMPT_VERSION, **self._sampling_spec()}

    def score(self, items: Sequence[Judged]) -> list[float]:
        if not items:
            return []
        from vllm import LLM, SamplingParams

        a = self.args
        if self._llm is None:
            self._llm = LLM(model=str(judge_dir(a.nice_reward_model)), tensor_parallel_size=a.nice_reward_tensor_parallel_size,
                            gpu_memory_utilization=a.nice_reward_gpu_memory_utilization,
                            max_model_len=a.nice_reward_max_model_len, seed=a.nice_reward_seed)
        params = SamplingParams(temperature=a.nice_reward_temperature, top_p=a.nice_reward_top_p,
                                top_k=a.nice_reward_top_k or -1, max_tokens=a.nice_reward_max_new_tokens,
                                seed=a.nice_reward_seed, truncate_prompt_tokens=a.nice_reward_max_model_len and max(
                                    1, a.nice_reward_max_model_len - a.nice_reward_max_new_tokens))
        outputs = self._llm.generate([judge_prompt(i) for i in items], params, use_tqdm=False)
        return self._parse_all([o.outputs[0].text for o in outputs])


class ApiJudge(RewardModel):
    """An OpenAI-compatible chat-completions endpoint, one request per completion."""

    backend = "api"

    def __init__(self, args):
        super().__init__(args)
        self._key = os.environ.get(args.nice_reward_api_key_env)
        if not self._key:
            raise FlexfeedError(f"the api judge's key is not set: environment variable "
                                f"{args.nice_reward_api_key_env!r} is empty",
                                f"export {args.nice_reward_api_key_env}=... (or name another variable in "
                                "grads.nice_reward_api_key_env)")

    def spec(self) -> dict:
        a = self.args
        return {"backend": self.backend, "url": a.nice_reward_api_url, "model": a.nice_reward_api_model,
                "temperature": a.nice_reward_api_temperature, "prompt": JUDGE_PROMPT_VERSION}

    def score(self, items: Sequence[Judged]) -> list[float]:
        return self._parse_all([self._ask(judge_prompt(i)) for i in items])

    def _ask(self, prompt: str) -> str:
        a = self.args
        body = json.dumps({"model": a.nice_reward_api_model, "temperature": a.nice_reward_api_temperature,
                           "messages": [{"role": "user", "content": prompt}]}).encode()
        request = urllib.request.Request(a.nice_reward_api_url, data=body, method="POST", headers={
            "Content-Type": "application/json", "Authorization": f"Bearer {self._key}"})
        error = None
        for attempt in range(API_ATTEMPTS):
            try:
                with urllib.request.urlopen(request, timeout=a.nice_reward_api_timeout_s) as reply:
                    data = json.loads(reply.read().decode())
                return str(data["choices"][0]["message"]["content"] or "")
            except urllib.error.HTTPError as exc:
                error = f"HTTP {exc.code} {exc.reason}"
                if exc.code < 500 and exc.code != 429:
                    break  # the request itself is wrong (bad key, bad model): retrying cannot help
            except (urllib.error.URLError, TimeoutError, OSError) as exc:
                error = str(getattr(exc, "reason", exc))
            except (ValueError, KeyError, IndexError, TypeError):
                raise FlexfeedError(f"the api judge at {a.nice_reward_api_url} replied without choices[0].message."
                                    "content", "point nice_reward_api_url at an OpenAI-compatible chat-completions "
                                    "endpoint") from None
            time.sleep(min(4.0, 0.5 * 2 ** attempt))
        raise FlexfeedError(f"the api judge at {a.nice_reward_api_url} failed: {error}",
                            "check the URL, the key's variable and the model name, or raise nice_reward_api_timeout_s")


BACKENDS = {"transformers": TransformersJudge, "vllm": VllmJudge, "api": ApiJudge}


def build_reward_model(args) -> RewardModel | None:
    """The configured judge, or None when rewards come from the `nice_reward` function."""
    if args.nice_reward_backend == "function":
        return None
    return BACKENDS[args.nice_reward_backend](args)


def check_reward_args(args) -> None:
    """Refuse NICE reward settings that cannot work together (called when GradsArgs is built)."""
    backend = args.nice_reward_backend
    if backend in ("transformers", "vllm") and not args.nice_reward_model:
        raise FieldError("nice_reward_model", f" is not set: the {backend} judge needs a checkpoint folder",
                         "set grads.nice_reward_model, or nice_reward_backend: function")
    if backend == "vllm":
        why = vllm_refusal()
        if why is not None:
            raise FieldError("nice_reward_backend", f": vllm refused, {why}",
                             "use nice_reward_backend: transformers (CPU or GPU), or a GPU machine with vllm")
    if backend == "api":
        url = args.nice_reward_api_url or ""
        if not re.match(r"https?://[^/\s]+", url):
            raise FieldError("nice_reward_api_url", f" is {url or 'not set'!r}: the api judge needs an http(s) URL",
                             "e.g. https://api.openai.com/v1/chat/completions")
        if not args.nice_reward_api_model:
            raise FieldError("nice_reward_api_model", " is not set: the api judge needs a model name",
                             "e.g. nice_reward_api_model: gpt-4o")
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", args.nice_reward_api_key_env or ""):
        raise FieldError("nice_reward_api_key_env", f" is {args.nice_reward_api_key_env!r}, not an environment "
                         "variable's name", "name the variable that holds the key (e.g. DF_API_KEY), not the key")
