"""The signal store: per-sample signals keyed by content, committed shard by shard."""

__version__ = "0.1.0"
