"""Reading config values: a strict YAML loader, type coercion against annotations, sanity limits."""

from __future__ import annotations

import difflib
import enum
import re
import types
import typing
from collections.abc import Iterable

import yaml

from store.errors import FlexfeedError


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


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """A hint naming the closest choice, or listing a few when nothing is close."""
    choices = sorted(set(choices))
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    if close:
        return f"did you mean {close[0]!r}?"
    shown = ", ".join(choices[:12]) + (", ..." if len(choices) > 12 else "")
    return f"choose one of: {shown}"


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


def _type_name(annotation) -> str:
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def coerce(value, annotation, where: str):
    """Check (and lightly convert) a YAML value against a field annotation; unknown shapes pass through."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        if value is None and type(None) in args:
            return None
        enums = [a for a in args if isinstance(a, type) and issubclass(a, enum.Enum)]
        if enums and isinstance(value, str):  # `SchedulerType | str`: the string must still name a member
            return coerce(value, enums[0], where)
        first_error = None
        for arg in sorted((a for a in args if a is not type(None)), key=_union_order):
            try:
                return coerce(value, arg, where)
            except FlexfeedError as exc:
                first_error = first_error or exc
        if first_error is not None:
            raise FlexfeedError(f"{where} must be {_type_name(annotation)}, got {value!r}",
                                first_error.hint or "fix the value's type")
        return value
    if annotation is typing.Any or annotation is object:
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise FlexfeedError(f"{where} must be true or false, got {value!r}", "write true or false")
        return value
    if annotation is int:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise FlexfeedError(f"{where} must be an integer, got {value!r}", "write a whole number, e.g. 100")
        return value
    if annotation is float:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise FlexfeedError(f"{where} must be a number, got {value!r}", "write a number, e.g. 1.0e-4")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise FlexfeedError(f"{where} must be a string, got {value!r}", "quote the value")
        return value
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        allowed = [m.value for m in annotation]
        if isinstance(value, annotation):
            return value.value
        if value not in allowed:
            raise FlexfeedError(f"{where}: unknown value {value!r}", did_you_mean(str(value), map(str, allowed)))
        return value
    if origin in (list, tuple) or annotation in (list, tuple):
        if isinstance(value, str) and typing.get_args(annotation) in ((str,), (str, ...)):
            value = [item.strip() for item in value.split(",") if item.strip()]
        if not isinstance(value, (list, tuple)):
            raise FlexfeedError(f"{where} must be a list, got {value!r}", "write a YAML list, e.g. [a, b]")
        args = typing.get_args(annotation)
        if args:
            return [coerce(item, args[0], f"{where}[{i}]") for i, item in enumerate(value)]
        return list(value)
    if origin is dict or annotation is dict:
        if not isinstance(value, dict):
            raise FlexfeedError(f"{where} must be a mapping, got {value!r}", "write a YAML mapping (key: value lines)")
        return dict(value)
    return value


def _union_order(arg) -> int:
    """Try the stricter alternatives first, so `1` for `int | str` stays an int."""
    order = {bool: 0, int: 1, float: 2}
    return order.get(arg, 3 if arg is not str else 4)


def check_range(value, where: str, *, low=None, high=None, low_open: bool = False, allow: tuple = ()) -> None:
    """Refuse a number outside [low, high] (or (low, high] when low_open); values in `allow` pass."""
    if value is None or value in allow or isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if value != value:  # NaN passes every comparison below
        raise FlexfeedError(f"{where} is NaN", "write a number")
    if low is not None and (value <= low if low_open else value < low):
        bound = f"> {low}" if low_open else f">= {low}"
        raise FlexfeedError(f"{where} must be {bound}, got {value!r}", f"write a value {bound}")
    if high is not None and value > high:
        raise FlexfeedError(f"{where} is {value!r}, beyond the sane limit {high:g}",
                            f"write a value <= {high:g} (is a digit or an exponent off?)")


def parse_override(text: str) -> tuple[list[str], object]:
    """`a.b=value` -> (['a', 'b'], value parsed as a YAML scalar or flow collection)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise FlexfeedError(f"bad override {text!r}", "write key=value, e.g. learning_rate=1.0e-4 or grads.proj_dim=512")
    value = parse_yaml_text(raw, f"override {text!r}") if raw.strip() else None
    return key.split("."), value
