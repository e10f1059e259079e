"""Weighters: per-sample loss weights. Importing a module registers its weighter in WEIGHTERS."""

from . import adapt, loss
from .adapt import AdaptWeighter
from .loss import LossWeighter

__all__ = ["adapt", "loss", "AdaptWeighter", "LossWeighter"]
