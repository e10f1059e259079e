"""`plot_loss`: the run's loss curves as PNGs in its output folder, as LLaMA-Factory writes them.

`training_loss.png` (training loss against step, with its exponential moving average) and, when the
run evaluated, `training_eval_loss.png`: the same file names as LLaMA-Factory's `plot_loss`, so scripts
that pick them up keep working. `flexfeed report` compares several runs; this is one run's own record.
"""

from __future__ import annotations

from pathlib import Path

from .report import new_figure, save_png

SMOOTHING = 0.9
"""Weight of the past in the plotted moving average (1 - weight on the newest point)."""


def smoothed(values: list[float], weight: float = SMOOTHING) -> list[float]:
    """Exponential moving average, started at the first value."""
    out: list[float] = []
    for v in values:
        out.append(v if not out else weight * out[-1] + (1 - weight) * v)
    return out


def plot_run_losses(log_history: list[dict], out_dir: Path) -> list[Path]:
    """Write training_loss.png (and training_eval_loss.png when eval_loss was logged); their paths."""
    written = []
    for key, name, title in (("loss", "training_loss.png", "training loss"),
                             ("eval_loss", "training_eval_loss.png", "evaluation loss")):
        points = [(int(h["step"]), float(h[key])) for h in log_history if key in h and "step" in h]
        if not points:
            continue
        steps, values = [s for s, _ in points], [v for _, v in points]
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        fig, axes = new_figure(width=7)
        ax = axes[0, 0]
        ax.plot(steps, values, alpha=0.4, label="original", marker="o" if len(steps) < 30 else None, markersize=3)
        if len(values) > 1:
            ax.plot(steps, smoothed(values), label="smoothed")
        ax.set(title=f"{title} of {Path(out_dir).name}", xlabel="step", ylabel=key)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        written.append(save_png(fig, Path(out_dir), name))
    return written
