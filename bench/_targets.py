"""Every benchmark's targets in one table: bench -> {figure: (op, bound)}.

Each bench checks its own JSON summary against its entry (`_common.exit_on_misses`) and exits 1 naming
each figure that missed; `make bench` (bench/_suite.py) runs them in turn, stops at the first failure and
prints every figure against its target. A figure a bench does not report counts as missed.
"""

from __future__ import annotations

STORE_READ = {"ratio_stream": (">=", 0.7), "ratio_whole": (">=", 0.7), "rss_ok": ("==", True)}
GRADS = {"speedup_vs_less_fp32": (">=", 40.0), "speedup_vs_dataflex_fp16": (">=", 40.0),
         "floor_ratio": ("<=", 1.3), "max_rel_err": ("<=", 1e-4)}
REUSE = {"warm_over_cold": ("<=", 0.05), "recomputed_shards": ("==", 0), "relocated_over_cold": ("<=", 0.05),
         "relocated_recomputed_shards": ("==", 0), "relocated_same_keys": ("==", True)}
STAGE_SCALE = {"stage_growth_ratio": ("<=", 1.3)}
ONLINE_OVERHEAD = {"select_over_static": ("<=", 1.10), "refresh_over_pass": ("<=", 1.2)}
PROJECTION = {"kronecker_over_dense_8192": ("<=", 1.15)}
SELECTION = {"less_wins": (">=", 4), "near_wins": (">=", 4)}
MIXING = {"doremi_wins": (">=", 4), "odm_wins": (">=", 4)}
DECISION_SCALE = {"less_400k_peak_rss_mb": ("<=", 1536.0), "rss_growth_25k_to_400k": ("<=", 1.3),
                  "less_s_per_gb_spread": ("<=", 1.5), "near_1m_later_s": ("<=", 3.0)}

TARGETS: dict[str, dict[str, tuple[str, object]]] = {
    "store_read": STORE_READ, "grads": GRADS, "reuse": REUSE, "stage_scale": STAGE_SCALE,
    "online_overhead": ONLINE_OVERHEAD, "projection": PROJECTION,
    "selection": SELECTION, "mixing": MIXING, "decision_scale": DECISION_SCALE,
}
"""Benches without an entry here report figures but judge nothing yet (their scripts say what they check)."""

OPS = {"<=": lambda v, b: v <= b, ">=": lambda v, b: v >= b, "==": lambda v, b: v == b}


def misses(summary: dict, targets: dict[str, tuple[str, object]]) -> list[str]:
    """`figure = value (target op bound)` for each figure that misses (or is absent)."""
    out = []
    for name, (op, bound) in targets.items():
        value = summary.get(name)
        if value is None or not OPS[op](value, bound):
            out.append(f"{name} = {value} (target {op} {bound})")
    return out
