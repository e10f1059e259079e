"""Reorder family: the order in which the rows of a window are served (curriculum patterns)."""
