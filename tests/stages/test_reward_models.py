"""NICE's judge models: transformers (classifier head or generated score), api (a local HTTP server), vllm refused."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch

from stages.args import GradsArgs, ModelArgs
from stages.base import bind_live_model
from stages.grads.nice import NiceTargetStage
from stages.grads.reward_models import (
    ApiJudge,
    Judged,
    TransformersJudge,
    VllmJudge,
    build_reward_model,
    judge_prompt,
    parse_score,
    vllm_refusal,
)
from stages.models import load_tokenizer
from store.errors import FlexfeedError

ITEMS = [Judged("add 2 and 3", "5", "5"), Judged("add 2 and 3", "seven", "5"),
         Judged("repeat word1", "word1 word1", "word1 word1 word1"), Judged("say hi", "", "")]
ROWS = {"input_ids": [[5, 6, 7, 8, 9], [12, 13, 14, 15, 2]], "labels": [[-100, -100, -100, 8, 9], [-100, -100, 14, 15, 2]]}


def _judge_args(**kw) -> GradsArgs:
    return GradsArgs(**{"proj_dim": 32, "grad_type": "sgd", "batch_size": 3, **kw})


@pytest.fixture(scope="module")
def classifier_dir(tiny_checkpoint, tmp_path_factory):
    """A tiny random Llama sequence-classification reward model (one logit) with the tiny tokenizer."""
    return _classifier(tiny_checkpoint, tmp_path_factory.mktemp("judge_cls"), num_labels=1)


def _classifier(checkpoint, out, num_labels: int):
    from transformers import AutoConfig, AutoTokenizer, LlamaForSequenceClassification

    tok = AutoTokenizer.from_pretrained(checkpoint)
    config = AutoConfig.from_pretrained(checkpoint)
    config.num_labels = num_labels
    config.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    torch.manual_seed(0)
    LlamaForSequenceClassification(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_judge_prompt_and_score_parsing():
    text = judge_prompt(ITEMS[0])
    assert "### Reference:\n5\n### Candidate:\n5\nScore:" in text and text.endswith("Score:")
    assert "### Reference" not in judge_prompt(ITEMS[3]) and "No response." in judge_prompt(ITEMS[3])
    assert [parse_score(t) for t in ["0.8", " Score: 7/10", "-3", ".5 or so", "no idea"]] == [0.8, 1.0, 0.0, 0.5, None]


def test_transformers_classifier_head_scores_each_completion_as_alone(classifier_dir):
    judge = build_reward_model(_judge_args(nice_reward_backend="transformers", nice_reward_model=str(classifier_dir)))
    assert isinstance(judge, TransformersJudge) and judge.classifier
    scores = judge.score(ITEMS)
    assert len(scores) == len(ITEMS) and all(0.0 < s < 1.0 for s in scores)
    assert len(set(scores)) == len(scores), "a random head scores different texts differently"
    # batched and padded equals one text at a time: sigmoid of the single logit (DataFlex's rule)
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(classifier_dir).eval()
    tok = AutoTokenizer.from_pretrained(classifier_dir)
    for item, got in zip(ITEMS, scores):
        with torch.no_grad():
            logit = model(**tok(judge_prompt(item), return_tensors="pt")).logits[0, 0]
        assert got == pytest.approx(torch.sigmoid(logit).item(), abs=1e-5)
    again = build_reward_model(_judge_args(nice_reward_backend="transformers", nice_reward_model=str(classifier_dir)))
    assert again.score(ITEMS) == scores
    spec = judge.spec()
    assert spec["backend"] == "transformers" and spec["head"] == "classifier" and len(spec["model"]) > 8
    assert str(classifier_dir) not in json.dumps(spec), "no path in a key"


def test_transformers_classifier_with_classes_scores_the_last_class(tiny_checkpoint, tmp_path):
    path = _classifier(tiny_checkpoint, tmp_path / "three", num_labels=3)
    scores = build_reward_model(_judge_args(nice_reward_backend="transformers", nice_reward_model=str(path))).score(ITEMS)
    assert len(scores) == 4 and all(0.0 < s < 1.0 for s in scores)


def test_transformers_generative_judge_is_deterministic_under_its_seed(tiny_checkpoint):
    args = _judge_args(nice_reward_backend="transformers", nice_reward_model=str(tiny_checkpoint),
                       nice_reward_temperature=0.9, nice_reward_seed=3, nice_reward_max_new_tokens=5)
    judge = build_reward_model(args)
    assert not judge.classifier and judge.spec()["head"] == "generate"
    state = torch.random.get_rng_state()
    scores = judge.score(ITEMS)
    assert torch.equal(state, torch.random.get_rng_state()), "judging leaves the global RNG alone"
    assert len(scores) == 4 and all(0.0 <= s <= 1.0 for s in scores)
    assert build_reward_model(args).score(ITEMS) == scores
    greedy = build_reward_model(_judge_args(nice_reward_backend="transformers", nice_reward_model=str(tiny_checkpoint),
                                            nice_reward_max_new_tokens=5))
    assert greedy.score(ITEMS) == greedy.score(ITEMS)


def test_stage_rewards_come_from_the_judge(tiny_checkpoint, classifier_dir):
    model_args = ModelArgs(model_name_or_path=str(tiny_checkpoint), lora_rank=4, attn_implementation="eager")
    args = _judge_args(nice_num_samples=2, nice_max_new_tokens=4, nice_reward_backend="transformers",
                       nice_reward_model=str(classifier_dir))
    stage = NiceTargetStage(model_args, args)
    spec = stage.signal().spec["nice"]
    assert spec["reward"]["backend"] == "transformers" and spec["reward"]["head"] == "classifier"
    rolls = stage.rollouts(ROWS)
    assert [len(r["rewards"]) for r in rolls] == [2, 2] and all(0 < x < 1 for r in rolls for x in r["rewards"])
    tok = load_tokenizer(model_args)
    # the judge reads the decoded prompt, completion and reference (end-of-sequence dropped)
    eos = tok.eos_token_id
    first = rolls[0]
    c = first["completions"][0]
    c = c[:-1] if c and c[-1] == eos else c
    item = Judged(tok.decode(first["prompt"], skip_special_tokens=True), tok.decode(c, skip_special_tokens=True),
                  tok.decode(first["reference"], skip_special_tokens=True))
    assert stage.judge().score([item]) == pytest.approx([first["rewards"][0]], abs=1e-5)
    feats = stage.compute(ROWS)
    assert feats.shape == (2, 32) and np.isfinite(feats).all()
    live = bind_live_model(NiceTargetStage(model_args, args), stage._model, tok)
    np.testing.assert_array_equal(live.compute(ROWS), feats)


# api ---------------------------------------------------------------------------------------------

class _Judge(BaseHTTPRequestHandler):
    """Answers a chat-completions POST with a score read from the candidate; records what it was sent."""

    seen: list = []
    fail_first: list = []  # status codes to answer before the real reply

    def do_POST(self):  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).seen.append({"auth": self.headers.get("Authorization"), **body})
        if type(self).fail_first:
            self.send_error(type(self).fail_first.pop(0))
            return
        prompt = body["messages"][0]["content"]
        candidate = prompt.split("### Candidate:\n")[1].split("\nScore:")[0]
        content = {"5": "1.0", "seven": "Score: 0.25 (wrong number)", "No response.": "cannot judge"}.get(
            candidate, "0.5")
        data = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def api_server():
    """A judge endpoint on 127.0.0.1 (a free port) for this test only; stopped and joined afterwards."""
    _Judge.seen, _Judge.fail_first = [], []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Judge)
    server.timeout = 5
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1/chat/completions"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _api_args(url: str, **kw) -> GradsArgs:
    return _judge_args(nice_reward_backend="api", nice_reward_api_url=url, nice_reward_api_model="judge-1",
                       nice_reward_api_key_env="FLEXFEED_TEST_JUDGE_KEY", nice_reward_api_timeout_s=5.0, **kw)


def test_api_judge_returns_the_scores_the_server_sends(api_server, monkeypatch):
    monkeypatch.setenv("FLEXFEED_TEST_JUDGE_KEY", "sk-test")
    judge = build_reward_model(_api_args(api_server))
    assert isinstance(judge, ApiJudge)
    assert judge.score(ITEMS) == [1.0, 0.25, 0.5, 0.0]
    assert judge.unparsed == 1  # "cannot judge" scores 0.0 and is counted
    sent = _Judge.seen
    assert len(sent) == 4 and all(s["auth"] == "Bearer sk-test" for s in sent)
    assert sent[0]["model"] == "judge-1" and sent[0]["temperature"] == 0.0
    assert sent[0]["messages"][0]["content"] == judge_prompt(ITEMS[0])
    assert "sk-test" not in json.dumps(judge.spec()) and judge.spec()["model"] == "judge-1"


def test_api_judge_retries_server_errors_and_not_client_errors(api_server, monkeypatch):
    monkeypatch.setenv("FLEXFEED_TEST_JUDGE_KEY", "sk-test")
    monkeypatch.setattr("stages.grads.reward_models.time.sleep", lambda s: None)
    _Judge.fail_first = [503]
    assert build_reward_model(_api_args(api_server)).score(ITEMS[:1]) == [1.0]
    _Judge.seen, _Judge.fail_first = [], [401]
    with pytest.raises(FlexfeedError, match="HTTP 401"):
        build_reward_model(_api_args(api_server)).score(ITEMS[:1])
    assert len(_Judge.seen) == 1


def test_api_judge_needs_its_key_variable(api_server, monkeypatch):
    monkeypatch.delenv("FLEXFEED_TEST_JUDGE_KEY", raising=False)
    with pytest.raises(FlexfeedError, match="FLEXFEED_TEST_JUDGE_KEY"):
        build_reward_model(_api_args(api_server))


def test_stage_with_the_api_judge(api_server, monkeypatch, tiny_checkpoint):
    monkeypatch.setenv("FLEXFEED_TEST_JUDGE_KEY", "sk-test")
    model_args = ModelArgs(model_name_or_path=str(tiny_checkpoint), lora_rank=4, attn_implementation="eager")
    stage = NiceTargetStage(model_args, _api_args(api_server, nice_num_samples=2, nice_max_new_tokens=3))
    rolls = stage.rollouts(ROWS)
    assert len(_Judge.seen) == 4 and all(r["rewards"] and set(r["rewards"]) <= {0.0, 0.25, 0.5, 1.0} for r in rolls)


# vllm --------------------------------------------------------------------------------------------

@pytest.mark.skipif(vllm_refusal() is None, reason="vllm and a GPU are here")
def test_vllm_judge_is_refused_without_vllm_in_one_line():
    with pytest.raises(FlexfeedError) as info:
        GradsArgs(nice_reward_backend="vllm", nice_reward_model="judge")
    assert "nice_reward_backend: vllm refused" in str(info.value) and "\n" not in info.value.message
    with pytest.raises(FlexfeedError, match="nice_reward_backend vllm"):
        VllmJudge(GradsArgs())
