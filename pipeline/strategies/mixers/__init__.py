"""Mixers: domain sampling proportions. Importing a module registers its mixer in MIXERS."""

from . import doremi, odm, random_mix, static
from .doremi import DoReMiMixer
from .odm import ODMMixer
from .random_mix import RandomMixer
from .static import StaticMixer
from .weights_file import WEIGHTS_FILE, read_domain_weights, write_domain_weights

__all__ = ["doremi", "odm", "random_mix", "static", "DoReMiMixer", "ODMMixer", "RandomMixer", "StaticMixer",
           "WEIGHTS_FILE", "read_domain_weights", "write_domain_weights"]
