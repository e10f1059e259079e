"""The component catalog: every registered strategy with its aliases, parameters, signals, paper and rule.

`flexfeed components` prints it and docs/components.md is generated from it (pipeline/components_doc.py),
so what a user reads is what the registries hold. A component is described from its class alone: its
`Params` dataclass (types, defaults, the docstring under each field), the `needs()` of an instance built
with default parameters, and its `paper` and `rule`.
"""

from __future__ import annotations

import dataclasses
import json
import typing

from stages.values import literal_choices
from store.errors import FlexfeedError

from .config.groups import PlanStageArgs
from .config.reference import field_docs, type_text
from .strategies.base import SignalNeed
from .strategies.registry import FAMILY_REGISTRIES, Registry, build_params


def components() -> dict:
    """Every registered component by family (select, mix, reorder, weight), and what `train_type: plan` offers."""
    out = {family: [component_entry(registry, name) for name in registry.names()]
           for family, registry in FAMILY_REGISTRIES.items()}
    out["plan"] = plan_entry()
    return out


def component_entry(registry: Registry, name: str) -> dict:
    """One component: names, class, summary, paper, rule, parameters and the signals it reads."""
    cls = registry.resolve(name)
    doc = (cls.__doc__ or "").strip()
    return {
        "name": name,
        "aliases": registry.aliases(name),
        "class": f"{cls.__module__}:{cls.__qualname__}",
        "summary": doc.splitlines()[0] if doc else "",
        "paper": cls.paper,
        "rule": cls.rule,
        "params": param_entries(cls.Params),
        **signal_entries(registry, cls),
    }


def param_entries(params_cls: type) -> list[dict]:
    """A Params dataclass's fields in declaration order: name, type, default (or required) and docstring."""
    docs = inherited_field_docs(params_cls)
    hints = typing.get_type_hints(params_cls)
    out = []
    for f in dataclasses.fields(params_cls):
        required = _required(f)
        default = None if required else f.default if f.default is not dataclasses.MISSING else f.default_factory()
        out.append({"name": f.name, "type": type_text(hints.get(f.name, f.type)), "required": required,
                    "default": json_value(default), "doc": docs.get(f.name, "")})
    return out


def _required(f: dataclasses.Field) -> bool:
    """A field without a default: the component cannot be built before a config gives it."""
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def inherited_field_docs(params_cls: type) -> dict[str, str]:
    """Field docstrings of a dataclass and of the dataclasses it extends (the nearest one written wins)."""
    docs: dict[str, str] = {}
    for klass in reversed(params_cls.__mro__):
        if dataclasses.is_dataclass(klass):
            docs.update({name: text for name, text in field_docs(klass).items() if text})
    return docs


def json_value(value):
    """A default as JSON holds it: tuples as lists, anything JSON has no word for as its repr."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [json_value(v) for v in value]
    if isinstance(value, dict):
        return {str(k): json_value(v) for k, v in value.items()}
    return repr(value)


def signal_entries(registry: Registry, cls: type) -> dict:
    """`signals`: the needs of a default-built instance (None when a parameter is required);
    `signals_vary_with`: the parameters whose other values change those needs (each other value of a Literal or
    bool parameter is tried; a parameter of open range is not), or the required ones."""
    required = [f.name for f in dataclasses.fields(cls.Params) if _required(f)]
    if required:
        return {"signals": None, "signals_vary_with": required}
    base = _needs(cls, registry, {})
    varying = [field for field, values in _alternatives(cls.Params).items()
               if any(_needs(cls, registry, {field: v}) not in (None, base) for v in values)]
    return {"signals": [need_entry(n) for n in base], "signals_vary_with": varying}


def need_entry(need: SignalNeed) -> dict:
    """A signal need as the catalog shows it."""
    return {"name": need.name, "split": need.split, "refresh": need.refresh, "live": need.live, "rows": need.rows}


def _needs(cls: type, registry: Registry, params: dict) -> list[SignalNeed] | None:
    """The needs of `cls` built with `params` (None when those parameters are refused on their own)."""
    try:
        built = build_params(cls.Params, params, f"{registry.family} component {cls.name!r}")
    except FlexfeedError:
        return None
    return list(cls(built).needs())


def _alternatives(params_cls: type) -> dict[str, list]:
    """For each field with a closed set of values (a Literal, a bool), the values other than its default."""
    hints = typing.get_type_hints(params_cls)
    defaults = params_cls()
    out = {}
    for f in dataclasses.fields(params_cls):
        annotation = hints.get(f.name, f.type)
        choices = [True, False] if annotation is bool else literal_choices(annotation)
        if choices:
            out[f.name] = [c for c in choices if c != getattr(defaults, f.name)]
    return out


def plan_entry() -> dict:
    """What `train_type: plan` offers: the keys of a stage and the components each family's stage may name."""
    return {
        "stage_keys": param_entries(PlanStageArgs),
        "families": {family: registry.names() for family, registry in FAMILY_REGISTRIES.items()},
    }


def need_text(need: dict) -> str:
    """A need in a few words: `grads_sgd (target)`, `loss (train, live)`, `embed (train, offline)`."""
    how = "live" if need["live"] else "refreshed when stale" if need["refresh"] else "offline"
    probe = ", probe rows only" if need["rows"] == "probe" else ""
    return f"{need['name']} ({need['split']}, {how}{probe})"


def reads_text(entry: dict) -> str:
    """The signals a component reads, and the parameters they depend on."""
    if entry["signals"] is None:
        return f"depends on its required parameters: {', '.join(entry['signals_vary_with'])}"
    text = ", ".join(need_text(n) for n in entry["signals"]) or "nothing from the store"
    if entry["signals_vary_with"]:
        text += f"; depends on {', '.join(entry['signals_vary_with'])}"
    return text


def default_text(param: dict) -> str:
    """A parameter's default as YAML writes it (or `(required)`)."""
    if param["required"]:
        return "(required)"
    value = param["default"]
    return value if isinstance(value, str) else json.dumps(value)


def text_lines(data: dict) -> list[str]:
    """The catalog as plain text, family by family (what `flexfeed components` prints)."""
    lines = []
    for family in FAMILY_REGISTRIES:
        lines.append(f"{family}:")
        for entry in data[family]:
            aliases = f" (also {', '.join(entry['aliases'])})" if entry["aliases"] else ""
            lines += [f"  {entry['name']}{aliases}", f"    rule:  {entry['rule'] or '-'}",
                      f"    paper: {entry['paper'] or '-'}", f"    reads: {reads_text(entry)}"]
            lines += [f"    {p['name']}: {p['type']} = {default_text(p)}  {p['doc']}".rstrip() for p in entry["params"]]
        lines.append("")
    plan = data["plan"]
    lines.append("plan (train_type: plan, a list of stages; each stage names a component of its family):")
    lines += [f"  {p['name']}: {p['type']} = {default_text(p)}  {p['doc']}".rstrip() for p in plan["stage_keys"]]
    return lines
