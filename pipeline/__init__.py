"""The online half of flexfeed: config, trainer, strategies, refresh, CLI and report."""
