"""Turning one raw row (alpaca or sharegpt) into a conversation or a plain text, checking its columns."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from stages.dataset_info import DatasetSpec
from store.errors import FlexfeedError


@dataclass
class Conversation:
    """Alternating user/assistant messages (first user, last assistant), an optional system text and tools."""

    messages: list[dict] = field(default_factory=list)
    system: str | None = None
    tools: str | None = None


@dataclass(frozen=True)
class RowRef:
    """Where a row came from, for error messages."""

    path: Path
    row: int
    dataset: str

    def error(self, column: str | None, problem: str, hint: str) -> FlexfeedError:
        """A FlexfeedError naming file, row (1-based) and column."""
        col = f", column {column!r}" if column else ""
        return FlexfeedError(f"{self.path}, row {self.row}{col} (dataset {self.dataset!r}): {problem}", hint)


def _text(row: dict, column: str | None, ref: RowRef, *, required: bool, role: str) -> str | None:
    """The text in ``column``; None when optional and absent/empty; an error for any other type."""
    if column is None:
        return None
    if column not in row:
        if not required:
            return None
        present = ", ".join(repr(k) for k in row) or "(none)"
        raise ref.error(column, f"missing column for the {role} (columns in this row: {present})",
                        f"add the column, or map columns.{role} in dataset_info.json to an existing one")
    value = row[column]
    if value is None or value == "":
        if required:
            raise ref.error(column, f"the {role} is empty", "fill it in or remove the row")
        return None
    if not isinstance(value, str):
        raise ref.error(column, f"expected text for the {role}, got {type(value).__name__} {value!r:.60}",
                        "quote the value so it is a string")
    return value


def _history(row: dict, column: str | None, ref: RowRef) -> list[dict]:
    if column is None or row.get(column) in (None, ""):
        return []
    value = row[column]
    if isinstance(value, str):  # csv cells carry lists as JSON text
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise ref.error(column, "history is text but not JSON", 'write [["question", "answer"], ...]') from None
    messages = []
    if not isinstance(value, list):
        raise ref.error(column, f"history must be a list of [query, response] pairs, got {type(value).__name__}",
                        'write [["question", "answer"], ...]')
    for i, pair in enumerate(value):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise ref.error(column, f"history item {i} is not a [query, response] pair of texts: {pair!r:.60}",
                            'write [["question", "answer"], ...]')
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    return messages


def alpaca_conversation(row: dict, spec: DatasetSpec, ref: RowRef) -> Conversation:
    """instruction (+ "\\n" + input) is the prompt, output the response, history earlier turns."""
    cols = spec.columns
    prompt = _text(row, cols["prompt"], ref, required=True, role="prompt")
    query = _text(row, cols["query"], ref, required=False, role="query")
    response = _text(row, cols["response"], ref, required=True, role="response")
    user = prompt + "\n" + query if query else prompt
    messages = _history(row, cols["history"], ref)
    messages += [{"role": "user", "content": user}, {"role": "assistant", "content": response}]
    system = _text(row, cols["system"], ref, required=False, role="system")
    return Conversation(messages=messages, system=system)


def _sharegpt_messages(row: dict, spec: DatasetSpec, ref: RowRef) -> tuple[list[dict], str | None]:
    cols, tags = spec.columns, spec.tags
    column = cols["messages"]
    if column not in row or row[column] is None:
        raise ref.error(column, "missing messages column",
                        "add it, or map columns.messages in dataset_info.json to the column holding the turns")
    raw = row[column]
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError:
            raise ref.error(column, "messages are text but not JSON", "write a list of message objects") from None
    if not isinstance(raw, list) or not raw:
        raise ref.error(column, f"messages must be a non-empty list, got {type(raw).__name__}",
                        'write [{"from": "human", "value": "..."}, {"from": "gpt", "value": "..."}]')
    role_of = {tags["user_tag"]: "user", tags["assistant_tag"]: "assistant", tags["system_tag"]: "system"}
    messages = []
    for i, msg in enumerate(raw):
        if not isinstance(msg, dict):
            raise ref.error(column, f"message {i} is a {type(msg).__name__}, not an object",
                            f'write {{"{tags["role_tag"]}": ..., "{tags["content_tag"]}": ...}}')
        role = msg.get(tags["role_tag"])
        if role not in role_of:
            raise ref.error(column, f"message {i} has role {role!r} under {tags['role_tag']!r}",
                            f"roles are {', '.join(repr(t) for t in role_of)}; set tags in dataset_info.json")
        content = msg.get(tags["content_tag"])
        if not isinstance(content, str):
            raise ref.error(column, f"message {i} has no text under {tags['content_tag']!r} (got {content!r:.40})",
                            "set tags.content_tag in dataset_info.json to the key holding the text")
        messages.append({"role": role_of[role], "content": content})
    system = _text(row, cols["system"], ref, required=False, role="system")
    if messages[0]["role"] == "system":
        system = messages.pop(0)["content"]
    return messages, system


def sharegpt_conversation(row: dict, spec: DatasetSpec, ref: RowRef) -> Conversation:
    """Messages with role/content tags; a leading system message becomes the system text."""
    column = spec.columns["messages"]
    messages, system = _sharegpt_messages(row, spec, ref)
    for i, msg in enumerate(messages):
        want = "user" if i % 2 == 0 else "assistant"
        if msg["role"] != want:
            raise ref.error(column, f"turn {i} is {msg['role']!r} where {want!r} was expected",
                            "turns must alternate user, assistant, ..., ending with an assistant turn")
    if not messages or len(messages) % 2:
        raise ref.error(column, "the conversation does not end with an assistant turn",
                        "sft trains on assistant turns: end each conversation with one")
    tools_column = spec.columns["tools"]
    if tools_column and isinstance(row.get(tools_column), (list, dict)):
        # parquet/json rows may hold the function specs as objects rather than JSON text
        tools = json.dumps(row[tools_column], ensure_ascii=False)
    else:
        tools = _text(row, tools_column, ref, required=False, role="tools")
    return Conversation(messages=messages, system=system, tools=tools)


def pt_text(row: dict, spec: DatasetSpec, ref: RowRef) -> str:
    """The text of a pt row: alpaca prompt (+ "\\n" + query), or a sharegpt conversation's contents joined."""
    if spec.formatting == "alpaca":
        prompt = _text(row, spec.columns["prompt"], ref, required=True, role="prompt")
        query = _text(row, spec.columns["query"], ref, required=False, role="query")
        return prompt + "\n" + query if query else prompt
    messages, system = _sharegpt_messages(row, spec, ref)
    return "\n".join(([system] if system else []) + [m["content"] for m in messages])
