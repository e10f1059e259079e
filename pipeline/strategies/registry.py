"""One registry per strategy family: names -> classes, params validated, import paths allowed."""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
import typing

from stages.values import coerce, did_you_mean
from store.errors import FlexfeedError

from .base import Mixer, Reorderer, Selector, Weighter


def build_params(cls, params: dict | None, where: str):
    """Instantiate a Params dataclass from a dict, refusing unknown keys with a hint."""
    params = dict(params or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in params:
        if key not in fields:
            raise FlexfeedError(f"unknown parameter {key!r} for {where}", did_you_mean(key, fields))
    kwargs = {k: coerce(v, hints.get(k, object), f"{where}.{k}") for k, v in params.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise FlexfeedError(f"bad parameters for {where}: {exc}", "see the README's component reference") from None


class Registry:
    """Name -> strategy class for one family."""

    def __init__(self, family: str, base: type):
        self.family = family
        self.base = base
        self._classes: dict[str, type] = {}
        self._aliases: dict[str, str] = {}

    def register(self, name: str, *aliases: str):
        """Class decorator: make a strategy available under `name` (and aliases, e.g. DataFlex names)."""

        def deco(cls):
            if not issubclass(cls, self.base):
                raise TypeError(f"{cls.__name__} must subclass {self.base.__name__}")
            cls.name = name
            self._classes[name] = cls
            for alias in aliases:
                self._aliases[alias] = name
            return cls

        return deco

    def names(self) -> list[str]:
        _load_builtins()
        return sorted(self._classes)

    def aliases(self, name: str) -> list[str]:
        """The other names a registered component answers to (e.g. DataFlex's), sorted."""
        _load_builtins()
        return sorted(alias for alias, target in self._aliases.items() if target == name)

    def resolve(self, name: str) -> type:
        """A registered name/alias, or `package.module:Class` (loaded only because the config names it)."""
        _load_builtins()
        if ":" in name:
            module_name, _, attr = name.partition(":")
            try:
                cls = getattr(importlib.import_module(module_name), attr)
            except (ImportError, AttributeError) as exc:
                raise FlexfeedError(f"cannot load {self.family} component {name!r}: {exc}",
                                    "check the import path `package.module:Class` and that it is installed") from None
            if not (isinstance(cls, type) and issubclass(cls, self.base)):
                raise FlexfeedError(f"{name!r} is not a {self.base.__name__} subclass",
                                    f"subclass pipeline.strategies.{self.base.__name__}")
            return cls
        key = self._aliases.get(name, name)
        if key not in self._classes:
            known = list(self._classes) + list(self._aliases)
            raise FlexfeedError(f"unknown {self.family} component {name!r}", did_you_mean(name, known))
        return self._classes[key]

    def build(self, name: str, params: dict | None = None, seed: int = 0):
        """Build a strategy from its name and `component_args`."""
        cls = self.resolve(name)
        return cls(build_params(cls.Params, params, f"{self.family} component {name!r}"), seed=seed)


SELECTORS = Registry("select", Selector)
MIXERS = Registry("mix", Mixer)
WEIGHTERS = Registry("weight", Weighter)
REORDERS = Registry("reorder", Reorderer)
FAMILY_REGISTRIES = {"select": SELECTORS, "mix": MIXERS, "reorder": REORDERS, "weight": WEIGHTERS}
"""One registry per family, in the data plan's order."""


def registry_for(family: str) -> Registry:
    """The registry of a strategy family (select, mix, reorder, weight)."""
    return FAMILY_REGISTRIES[family]


_BUILTINS = ("selectors", "mixers", "reorders", "weighters")


def _load_builtins() -> None:
    """Import the built-in strategy modules (they register themselves): every module of each family's
    package, so a new component is one new file."""
    for mod in _BUILTINS:
        name = f"{__package__}.{mod}"
        try:
            package = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue
        for info in pkgutil.iter_modules(package.__path__):
            if not info.name.startswith("_"):
                importlib.import_module(f"{name}.{info.name}")
