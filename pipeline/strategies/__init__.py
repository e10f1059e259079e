"""Strategy families: selectors (which rows), mixers (domain proportions), reorders (in what order), weighters
(per-sample weights)."""

from .base import Mixer, Reorderer, Selection, Selector, SignalNeed, Strategy, Weighter
from .context import DecisionContext, InMemorySignals, SignalSource
from .registry import FAMILY_REGISTRIES, MIXERS, REORDERS, SELECTORS, WEIGHTERS, Registry, registry_for

__all__ = [
    "Strategy", "Selector", "Mixer", "Reorderer", "Weighter", "Selection", "SignalNeed",
    "DecisionContext", "SignalSource", "InMemorySignals",
    "Registry", "SELECTORS", "MIXERS", "REORDERS", "WEIGHTERS", "FAMILY_REGISTRIES", "registry_for",
]
