"""Reading config text: a strict YAML loader and `key=value` overrides (values are checked by stages.values)."""

from __future__ import annotations

import re

import yaml

from stages.values import check_range, coerce, did_you_mean
from store.errors import FlexfeedError

__all__ = ["StrictLoader", "check_range", "coerce", "did_you_mean", "parse_override", "parse_yaml_text"]


class StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys and reads `1e-4` as a float (YAML 1.1 wants `1.0e-4`)."""


def _mapping_without_duplicates(loader: StrictLoader, node: yaml.MappingNode, deep: bool = False):
    seen: dict = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first on line {seen[key] + 1})", key_node.start_mark)
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)
StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def parse_yaml_text(text: str, where: str):
    """Parse YAML text; a syntax error becomes a FlexfeedError naming the line."""
    try:
        return yaml.load(text, Loader=StrictLoader)  # noqa: S506 (StrictLoader is a SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise FlexfeedError(f"malformed YAML in {where}{line}: {problem}",
                            "fix the syntax there (indentation, a missing ':' or quote)") from None
    except RecursionError:
        raise FlexfeedError(f"YAML in {where} is nested too deeply", "a run config is flat key: value lines") from None


def parse_override(text: str) -> tuple[list[str], object]:
    """`a.b=value` -> (['a', 'b'], value parsed as a YAML scalar or flow collection)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise FlexfeedError(f"bad override {text!r}", "write key=value, e.g. learning_rate=1.0e-4 or grads.proj_dim=512")
    value = parse_yaml_text(raw, f"override {text!r}") if raw.strip() else None
    return key.split("."), value
