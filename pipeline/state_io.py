"""Strategy state in checkpoints: JSON for structure, one .npz for arrays, no pickle anywhere."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np

from store.atomic import atomic_write_bytes

STATE_JSON = "flexfeed_state.json"
STATE_NPZ = "flexfeed_state.npz"


def _split(obj, arrays: dict, path: str):
    if isinstance(obj, np.ndarray):
        key = f"a{len(arrays)}"
        arrays[key] = obj
        return {"__array__": key}
    if isinstance(obj, dict):
        return {str(k): _split(v, arrays, f"{path}.{k}") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_split(v, arrays, f"{path}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _join(obj, arrays):
    if isinstance(obj, dict):
        if set(obj) == {"__array__"}:
            return arrays[obj["__array__"]]
        return {k: _join(v, arrays) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_join(v, arrays) for v in obj]
    return obj


def save_state(directory: str | Path, state: dict) -> None:
    """Write state atomically (arrays first, then the JSON that refers to them)."""
    directory = Path(directory)
    arrays: dict[str, np.ndarray] = {}
    tree = _split(state, arrays, "")
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(directory / STATE_NPZ, buf.getvalue())
    atomic_write_bytes(directory / STATE_JSON, json.dumps(tree, sort_keys=True).encode())


def load_state(directory: str | Path) -> dict | None:
    """The saved state, or None when the checkpoint has none."""
    directory = Path(directory)
    if not (directory / STATE_JSON).exists():
        return None
    tree = json.loads((directory / STATE_JSON).read_text())
    with np.load(directory / STATE_NPZ, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    return _join(tree, arrays)
