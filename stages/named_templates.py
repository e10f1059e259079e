"""LLaMA-Factory's named chat templates (`llama3`, `qwen`, ...), rendered as masked/trained text segments.

Each template is a handful of slot strings, as LLaMA-Factory 0.9.5 registers them in
`llamafactory/data/template.py`: ``{{content}}`` is the message, ``{{bos}}``/``{{eos}}`` the tokenizer's
bos/eos token (bos only when the tokenizer has one). The first user turn is preceded by the prefix and,
when there is a system text (the row's, else the template's default), the system slot; templates that
`fuse_system` put the filled system slot in front of the first user message instead (LLaMA-Factory's
Llama2Template). Each user turn is masked, each assistant turn trained. The behaviour that is not
text, `efficient_eos`, is applied when the rows are assembled (stages.data).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from stages.conversations import Conversation
from store.errors import FlexfeedError

Segment = tuple[str, bool]  # (text, trained)
CONTENT, BOS, EOS = "{{content}}", "{{bos}}", "{{eos}}"
THOUGHT = ("<think>\n", "\n</think>\n\n")  # LLaMA-Factory's thought words


@dataclass(frozen=True, kw_only=True)
class NamedTemplate:
    """One LLaMA-Factory template: slot strings, default system text, stop words and flags."""

    user: str = CONTENT
    assistant: str = CONTENT + EOS
    """Defaults as LLaMA-Factory's: the message plus eos (just the message with efficient_eos)."""
    system: str = CONTENT
    prefix: str = ""
    default_system: str = ""
    stop_words: tuple[str, ...] = ()
    markers: tuple[str, ...] = ()
    """Special tokens written in the slots that are not stop words (added when the tokenizer lacks them)."""
    efficient_eos: bool = False
    """Assistant turns carry no eos; one eos ends the row, and each later user turn's first label is eos."""
    replace_eos: bool = False
    """LLaMA-Factory makes stop_words[0] the tokenizer's eos (not done here; no slot below writes eos then)."""
    fuse_system: bool = False
    reasoning: bool = False
    """Qwen3-style: thoughts removed and an empty `<think>` block closing each prompt (thinking off)."""

    @property
    def special_tokens(self) -> tuple[str, ...]:
        """Stop words and marker tokens: what the tokenizer must know as special tokens."""
        return tuple(dict.fromkeys(self.stop_words + self.markers))


def _chatml(**kw) -> NamedTemplate:
    return NamedTemplate(user="<|im_start|>user\n{{content}}<|im_end|>\n<|im_start|>assistant\n",
                         assistant="{{content}}<|im_end|>\n", system="<|im_start|>system\n{{content}}<|im_end|>\n",
                         replace_eos=True, **kw)


NAMED: dict[str, NamedTemplate] = {
    "lf_default": NamedTemplate(user="Human: {{content}}{{eos}}\nAssistant:", assistant="{{content}}{{eos}}\n",
                                system="System: {{content}}{{eos}}\n"),
    "empty": NamedTemplate(assistant=CONTENT),
    "alpaca": NamedTemplate(
        user="### Instruction:\n{{content}}\n\n### Response:\n", assistant="{{content}}{{eos}}\n\n",
        default_system="Below is an instruction that describes a task. "
                       "Write a response that appropriately completes the request.\n\n"),
    "vicuna": NamedTemplate(
        user="USER: {{content}} ASSISTANT:",
        default_system="A chat between a curious user and an artificial intelligence assistant. "
                       "The assistant gives helpful, detailed, and polite answers to the user's questions."),
    "chatml": _chatml(stop_words=("<|im_end|>", "<|im_start|>")),
    "llama2": NamedTemplate(user="{{bos}}[INST] {{content}} [/INST]", system="<<SYS>>\n{{content}}\n<</SYS>>\n\n",
                            fuse_system=True),
    "llama3": NamedTemplate(
        user="<|start_header_id|>user<|end_header_id|>\n\n{{content}}<|eot_id|>"
             "<|start_header_id|>assistant<|end_header_id|>\n\n",
        assistant="{{content}}<|eot_id|>", system="<|start_header_id|>system<|end_header_id|>\n\n{{content}}<|eot_id|>",
        prefix=BOS, stop_words=("<|eot_id|>", "<|eom_id|>"), markers=("<|start_header_id|>", "<|end_header_id|>"),
        replace_eos=True),
    "mistral": NamedTemplate(user="[INST] {{content}}[/INST]", assistant=" {{content}}{{eos}}",
                             system="{{content}}\n\n", prefix=BOS, fuse_system=True),
    "qwen": _chatml(default_system="You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
                    stop_words=("<|im_end|>",), markers=("<|im_start|>",)),
    "qwen3": _chatml(stop_words=("<|im_end|>",), markers=("<|im_start|>",), reasoning=True),
    "qwen3_nothink": _chatml(stop_words=("<|im_end|>",), markers=("<|im_start|>",)),
    "gemma": NamedTemplate(
        user="<start_of_turn>user\n{{content}}<end_of_turn>\n<start_of_turn>model\n",
        assistant="{{content}}<end_of_turn>\n", system="{{content}}\n\n", prefix=BOS,
        stop_words=("<end_of_turn>",), markers=("<start_of_turn>",), replace_eos=True, fuse_system=True),
    "phi": NamedTemplate(user="<|user|>\n{{content}}<|end|>\n<|assistant|>\n", assistant="{{content}}<|end|>\n",
                         system="<|system|>\n{{content}}<|end|>\n", stop_words=("<|end|>",),
                         markers=("<|user|>", "<|assistant|>", "<|system|>"), replace_eos=True),
    "deepseek": NamedTemplate(user="User: {{content}}\n\nAssistant:", system="{{content}}\n\n", prefix=BOS),
    "glm4": NamedTemplate(user="<|user|>\n{{content}}<|assistant|>", assistant="\n{{content}}",
                          system="<|system|>\n{{content}}", prefix="[gMASK]<sop>",
                          stop_words=("<|user|>", "<|observation|>"), markers=("<|assistant|>", "<|system|>"),
                          efficient_eos=True),
}
"""LLaMA-Factory's `default` is `lf_default` here: flexfeed's `default` predates it (see docs/data.md)."""


def _fill(slot: str, content: str, bos: str, eos: str) -> str:
    # tokens first, the message last: a message may contain any text, even "{{eos}}"
    return slot.replace(BOS, bos).replace(EOS, eos).replace(CONTENT, content, 1)


def _without_thought(content: str) -> str:
    pattern = re.compile(f"{re.escape(THOUGHT[0])}(.*?){re.escape(THOUGHT[1])}", re.DOTALL)
    return re.sub(pattern, "", content).lstrip("\n")


def render_named(conv: Conversation, tmpl: NamedTemplate, bos: str, eos: str) -> list[Segment]:
    """Segments of a conversation in a named template: each user turn masked, each assistant turn trained."""
    if conv.tools:
        raise FlexfeedError("tools are not supported with a named template",
                            "use template: chat (the tokenizer's own template) for rows with tools")
    system = conv.system or tmpl.default_system
    system_text = _fill(tmpl.system, system, bos, eos) if system else ""
    segments: list[Segment] = []
    for k in range(0, len(conv.messages), 2):
        user, assistant = conv.messages[k]["content"], conv.messages[k + 1]["content"]
        head = ""
        if k == 0:
            head = _fill(tmpl.prefix, "", bos, eos)
            if tmpl.fuse_system:
                user = system_text + user
            else:
                head += system_text
        prompt = head + _fill(tmpl.user, user, bos, eos)
        if tmpl.reasoning:
            assistant = _without_thought(assistant)
            if THOUGHT[0].strip() not in assistant and THOUGHT[1].strip() not in assistant:
                prompt += THOUGHT[0] + THOUGHT[1]  # thinking off: an empty thought, not trained
        segments.append((prompt, False))
        segments.append((_fill(tmpl.assistant, assistant, bos, eos), True))
    return segments
