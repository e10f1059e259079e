"""Values a user writes, checked in one place: type coercion, ranges, `Literal` choices, "did you mean".

The stage argument groups (stages.args), the run config (pipeline.config), the strategy registry's
parameter parser and dataset_info.json all use these, so every refusal reads the same. It lives in
`stages` because stages may not import `pipeline`. An error about one field is a FieldError, which the
config loader relabels with the file and key the value came from.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import functools
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass

from store.errors import FlexfeedError


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """A hint naming the closest choice, or listing a few when nothing is close."""
    choices = sorted(set(choices))
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    if close:
        return f"did you mean {close[0]!r}?"
    shown = ", ".join(choices[:12]) + (", ..." if len(choices) > 12 else "")
    return f"choose one of: {shown}"


class FieldError(FlexfeedError):
    """One value refused: `field` names where it was written, `problem` what is wrong with it."""

    def __init__(self, field: str, problem: str, hint: str | None = None):
        self.field, self.problem = field, problem
        super().__init__(f"{field}{problem}", hint)

    def at(self, where: str) -> FieldError:
        """The same refusal, naming `where` (e.g. the config file and key) instead of the bare field."""
        return FieldError(where, self.problem, self.hint)


@dataclass(frozen=True)
class Range:
    """Sane bounds of a number: [low, high], or (low, high] when low_open; values in `allow` pass."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    allow: tuple = ()

    def check(self, value, where: str) -> None:
        """Refuse a number outside the bounds; None and non-numbers pass (types are coerce's job)."""
        if value is None or value in self.allow or isinstance(value, bool) or not isinstance(value, (int, float)):
            return
        if value != value:  # NaN passes every comparison below
            raise FieldError(where, " is NaN", "write a number")
        low = self.low
        if low is not None and (value <= low if self.low_open else value < low):
            bound = f"> {low}" if self.low_open else f">= {low}"
            raise FieldError(where, f" must be {bound}, got {value!r}", f"write a value {bound}")
        if self.high is not None and value > self.high:
            raise FieldError(where, f" is {value!r}, beyond the sane limit {self.high:g}",
                             f"write a value <= {self.high:g} (is a digit or an exponent off?)")


def bounded(default, *, low=None, high=None, low_open: bool = False, allow: tuple = ()):
    """A dataclass field with a default and a Range that check_fields enforces."""
    return dataclasses.field(default=default, metadata={"range": Range(low, high, low_open, allow)})


def check_range(value, where: str, *, low=None, high=None, low_open: bool = False, allow: tuple = ()) -> None:
    """Refuse a number outside [low, high] (or (low, high] when low_open); values in `allow` pass."""
    Range(low, high, low_open, allow).check(value, where)


def literal_choices(annotation) -> tuple | None:
    """The allowed values of a `Literal[...]` annotation (or an optional one), else None."""
    if typing.get_origin(annotation) is typing.Literal:
        return typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        literals = [a for a in args if typing.get_origin(a) is typing.Literal]
        if literals and all(a is type(None) or a in literals for a in args):
            return tuple(v for a in literals for v in typing.get_args(a)) + ((None,) if type(None) in args else ())
    return None


def check_choice(value, annotation, where: str) -> None:
    """Refuse a value that is not one of a `Literal` annotation's choices; other annotations pass."""
    choices = literal_choices(annotation)
    if choices is not None and value not in choices:
        raise FieldError(where, f": unknown value {value!r}",
                         did_you_mean(str(value), (str(c) for c in choices if c is not None)))


@functools.cache
def _hints(cls: type) -> dict:
    return typing.get_type_hints(cls)


def check_fields(obj) -> None:
    """Refuse any field of a dataclass outside its Range or its Literal choices (call from __post_init__)."""
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        check_choice(value, hints.get(f.name), f.name)
        if "range" in f.metadata:
            f.metadata["range"].check(value, f.name)


def _type_name(annotation) -> str:
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def _union_order(arg) -> int:
    """Try the stricter alternatives first, so `1` for `int | str` stays an int."""
    order = {bool: 0, int: 1, float: 2}
    return order.get(arg, 3 if arg is not str else 4)


def yaml_bool_choice(value, allowed):
    """YAML 1.1 reads `no`/`off`/`yes`/`on` as booleans: for a string choice that is one of those words, the
    word back (e.g. eval_strategy: no); any other value unchanged."""
    if not isinstance(value, bool):
        return value
    allowed = {str(a) for a in allowed if a is not None}
    return next((w for w in (("yes", "on", "true") if value else ("no", "off", "false")) if w in allowed), value)


def _coerce_union(value, annotation, where: str):
    args = typing.get_args(annotation)
    if value is None and type(None) in args:
        return None
    choices = literal_choices(annotation)
    if choices is not None:
        value = yaml_bool_choice(value, choices)
        check_choice(value, annotation, where)
        return value
    enums = [a for a in args if isinstance(a, type) and issubclass(a, enum.Enum)]
    if enums and isinstance(value, bool):
        value = yaml_bool_choice(value, [m.value for m in enums[0]])
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


def coerce(value, annotation, where: str):
    """Check (and lightly convert) a YAML value against a field annotation; unknown shapes pass through."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return _coerce_union(value, annotation, where)
    if origin is typing.Literal:
        value = yaml_bool_choice(value, typing.get_args(annotation))
        check_choice(value, annotation, where)
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
        value = yaml_bool_choice(value, allowed)
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
