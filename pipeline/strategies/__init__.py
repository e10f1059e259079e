"""Strategy families: selectors (which rows), mixers (domain proportions), weighters (per-sample weights)."""

from .base import Mixer, Selection, Selector, SignalNeed, Strategy, Weighter
from .context import DecisionContext, InMemorySignals, SignalSource
from .registry import MIXERS, SELECTORS, WEIGHTERS, Registry, registry_for

__all__ = [
    "Strategy", "Selector", "Mixer", "Weighter", "Selection", "SignalNeed",
    "DecisionContext", "SignalSource", "InMemorySignals",
    "Registry", "SELECTORS", "MIXERS", "WEIGHTERS", "registry_for",
]
