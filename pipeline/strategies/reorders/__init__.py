"""Built-in reorders (curriculum patterns over scores); importing this package registers them with `REORDERS`."""

from . import curriculum
from .curriculum import PatternReorder, read_score_file

__all__ = ["curriculum", "PatternReorder", "read_score_file"]
