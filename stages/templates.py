"""Rendering a conversation as text segments, each marked trained (assistant) or masked (everything else).

Built in, and LLaMA-Factory's named templates (stages.named_templates, listed in docs/data.md):

- ``default``: a plain, tokenizer-independent layout (documented in docs/data.md)::

      {system}\\n\\n### User:\\n{user}\\n### Assistant:\\n{assistant}</s>\\n### User:\\n...

  The system block appears only when there is a system text; ``</s>`` stands for the tokenizer's
  eos token. Each assistant text plus its eos is trained; all the rest is masked.
- ``chat``: the tokenizer's own chat template. Turn boundaries come from rendering prefixes of the
  conversation: the text that rendering ``messages[:k]`` with a generation prompt adds to the
  previous turn is the prompt of turn k (masked), and what rendering ``messages[:k+1]`` adds after
  that is the assistant turn (trained, including the template's end-of-turn markers).
- ``llama3``, ``qwen``, ... (``NAMED``): LLaMA-Factory's templates by their names, its ``default`` as
  ``lf_default``.
"""

from __future__ import annotations

import json

from stages.conversations import Conversation
from stages.named_templates import NAMED, NamedTemplate, render_named
from stages.values import FieldError, did_you_mean
from store.errors import FlexfeedError

TEMPLATES = ("default", "chat", *NAMED)
USER_HEADER = "### User:\n"
ASSISTANT_HEADER = "### Assistant:\n"

Segment = tuple[str, bool]  # (text, trained)


def has_chat_template(tokenizer) -> bool:
    """Whether the tokenizer ships a chat template."""
    return bool(getattr(tokenizer, "chat_template", None))


def resolve_template(name: str | None, tokenizer) -> str:
    """`default` or `chat`; None picks chat when the tokenizer has a chat template."""
    if name is None:
        return "chat" if has_chat_template(tokenizer) else "default"
    check_template_name(name)
    if name == "chat" and not has_chat_template(tokenizer):
        raise FlexfeedError("template 'chat' was asked for, but the tokenizer has no chat template",
                            "use template: default, or a tokenizer whose tokenizer_config.json has chat_template")
    return name


def check_template_name(name: str) -> None:
    """Refuse a template name flexfeed does not know (a FieldError naming the closest and listing all)."""
    if name not in TEMPLATES:
        close = did_you_mean(name, TEMPLATES)
        close = close + " " if close.startswith("did you mean") else ""
        raise FieldError("template", f" is {name!r}, not a known template",
                         f"{close}known: {', '.join(TEMPLATES)}; or leave it unset (automatic)")


def named_template(name: str | None) -> NamedTemplate | None:
    """The LLaMA-Factory template of that name, None for `default`, `chat` and unset."""
    return NAMED.get(name) if name else None


def template_special_tokens(name: str | None) -> list[str]:
    """Special tokens the template writes (added to the tokenizer when it lacks them)."""
    tmpl = named_template(name)
    return list(tmpl.special_tokens) if tmpl else []


def render_default(conv: Conversation, eos_token: str) -> list[Segment]:
    """Segments of the plain default template (see the module docstring)."""
    head = ""
    if conv.system:
        head += conv.system + "\n\n"
    if conv.tools:
        head += "Tools:\n" + conv.tools + "\n\n"
    segments: list[Segment] = []
    for k in range(0, len(conv.messages), 2):
        user, assistant = conv.messages[k]["content"], conv.messages[k + 1]["content"]
        sep = "" if k == 0 else "\n"
        segments.append((head + sep + USER_HEADER + user + "\n" + ASSISTANT_HEADER, False))
        segments.append((assistant + eos_token, True))
        head = ""
    return segments


def _parse_tools(tools: str | None):
    if not tools:
        return None
    try:
        parsed = json.loads(tools)
    except json.JSONDecodeError:
        raise FlexfeedError(f"tools are not JSON: {tools[:60]!r}", "write tools as a JSON list of function specs") from None
    return parsed if isinstance(parsed, list) else [parsed]


def render_chat(conv: Conversation, tokenizer) -> list[Segment]:
    """Segments of the tokenizer's chat template, split at turn boundaries by rendering prefixes."""
    messages = ([{"role": "system", "content": conv.system}] if conv.system else []) + conv.messages
    offset = 1 if conv.system else 0
    tools = _parse_tools(conv.tools)

    def render(upto: int, generation: bool) -> str:
        return tokenizer.apply_chat_template(messages[:upto], tools=tools, tokenize=False,
                                             add_generation_prompt=generation)

    segments: list[Segment] = []
    done = ""
    for k in range(offset + 1, len(messages), 2):
        prompt = render(k, True)
        full = render(k + 1, False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise FlexfeedError(
                "the tokenizer's chat template renders earlier turns differently once later turns are added, "
                "so the assistant turns cannot be located",
                "use template: default for this tokenizer",
            )
        segments.append((prompt[len(done):], False))
        segments.append((full[len(prompt):], True))
        done = full
    return segments


def render(conv: Conversation, template: str, tokenizer) -> list[Segment]:
    """Masked/trained text segments of a conversation in the resolved template."""
    if template == "chat":
        return render_chat(conv, tokenizer)
    tmpl = named_template(template)
    if tmpl is not None:
        bos = tokenizer.bos_token if tokenizer.bos_token_id is not None else ""
        return render_named(conv, tmpl, bos or "", tokenizer.eos_token or "")
    return render_default(conv, tokenizer.eos_token)
