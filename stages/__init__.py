"""Offline stages: pure functions shard -> arrays, fanned out over Dask, committed to the store."""
