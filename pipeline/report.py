"""`flexfeed report`: PNG plots and one self-contained HTML page for one or several training runs.

Everything is read from the files a run leaves behind (see pipeline/train.py) and, optionally, from
signal stores; sections without data are left out, so a static run or a run without evaluation
still gives a readable page.
"""

from __future__ import annotations

import base64
import html
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from store.errors import FlexfeedError
from store.maintenance import human_bytes

from .plan_record import filter_pools, fired_steps, repeats, served_order, stage_labels
from .run_files import RunData, load_run, read_json_object

REPORT_FILE = "report.html"
SUMMARY_FILE = "summary.json"
STORE_HEADER = "store.json"
FIG_DPI = 100


@dataclass
class Section:
    title: str
    body: str


# --------------------------------------------------------------------------- figures
def new_figure(ncols: int = 1, nrows: int = 1, width: float = 6.0, height: float = 3.6):
    # Figure without pyplot: no global backend state, and savefig to PNG renders with Agg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height * nrows), dpi=FIG_DPI, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def save_png(fig, out_dir: Path, name: str) -> Path:
    path = out_dir / name
    fig.savefig(path, format="png")
    return path


def _colors(names: list[str]) -> dict[str, tuple]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if len(names) <= 10 else "tab20"]
    return {name: cmap(i % cmap.N) for i, name in enumerate(names)}


def _loss_curve(run: RunData) -> tuple[list[int], list[float]]:
    pts = [(int(h["step"]), float(h["loss"])) for h in run.run.get("log_history") or []
           if isinstance(h, dict) and "loss" in h and "step" in h]
    return [s for s, _ in pts], [v for _, v in pts]


def plot_losses(runs: list[RunData], out_dir: Path) -> Path | None:
    """Training loss against step, one line per run."""
    curves = [(r, *_loss_curve(r)) for r in runs]
    curves = [c for c in curves if c[1]]
    if not curves:
        return None
    fig, axes = new_figure(width=8)
    ax = axes[0, 0]
    for run, steps, losses in curves:
        ax.plot(steps, losses, marker="o" if len(steps) < 30 else None, markersize=3, label=run.label)
    ax.set(title="Training loss", xlabel="optimizer step", ylabel="mean token loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_png(fig, out_dir, "loss.png")


def _proportion_series(run: RunData) -> tuple[list[int], dict[str, list[float]]]:
    recs = [d for d in run.decisions if d.get("proportions")]
    if recs:
        names = run.domains or list(recs[0]["proportions"])
        return [int(d.get("step", 0)) for d in recs], {n: [float(d["proportions"].get(n, 0.0)) for d in recs]
                                                        for n in names}
    # older runs only logged proportions into the trainer's log history
    logs = [h for h in run.run.get("log_history") or [] if any(k.endswith("_proportion") for k in h)]
    names = run.domains
    if not logs or not names:
        return [], {}
    return [int(h.get("step", 0)) for h in logs], {n: [float(h.get(f"flexfeed/{n}_proportion", 0.0)) for h in logs]
                                                   for n in names}


def plot_proportions(runs: list[RunData], out_dir: Path) -> Path | None:
    """Stacked domain proportions over steps, one subplot per run with a mixer taking the budget."""
    series = [(r, *_proportion_series(r)) for r in runs if r.kind in ("mix", "plan")]
    series = [s for s in series if s[1]]
    if not series:
        return None
    fig, axes = new_figure(ncols=len(series), width=5.5)
    for ax, (run, steps, props) in zip(axes[0], series, strict=True):
        names = list(props)
        colors = _colors(names)
        # a proportion holds from its decision step until the next one: draw steps, not slopes
        end = max(int(run.run.get("steps") or 0), steps[-1] + 1)
        xs = np.repeat(np.asarray(steps + [end], dtype=float), 2)[1:-1]
        ys = [np.repeat(np.asarray(props[n]), 2) for n in names]
        ax.stackplot(xs, ys, labels=names, colors=[colors[n] for n in names], alpha=0.85)
        ax.set(title=f"Domain proportions: {run.label}", xlabel="optimizer step", ylabel="share of batch",
               ylim=(0, 1), xlim=(xs[0], xs[-1]))
        ax.legend(fontsize=8, loc="upper right")
    return save_png(fig, out_dir, "mix_proportions.png")


def plot_mix_losses(runs: list[RunData], out_dir: Path) -> Path | None:
    """Mean training loss per domain as the mixer saw it, one subplot per run with a mixer."""
    runs = [r for r in runs if r.kind in ("mix", "plan") and r.mix]
    if not runs:
        return None
    fig, axes = new_figure(ncols=len(runs), width=5.5)
    for ax, run in zip(axes[0], runs, strict=True):
        per: dict[str, list[tuple[int, float]]] = defaultdict(list)
        for rec in run.mix:
            for dom, loss in (rec.get("domain_loss") or {}).items():
                name = run.domains[int(dom)] if str(dom).isdigit() and int(dom) < len(run.domains) else str(dom)
                per[name].append((int(rec.get("step", 0)), float(loss)))
        colors = _colors(run.domains or sorted(per))
        for name, pts in sorted(per.items()):
            ax.plot([s for s, _ in pts], [v for _, v in pts], label=name, color=colors.get(name), alpha=0.8)
        ax.set(title=f"Per-domain batch loss: {run.label}", xlabel="optimizer step", ylabel="mean sample loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return save_png(fig, out_dir, "mix_domain_loss.png")


def plot_selection(runs: list[RunData], out_dir: Path) -> Path | None:
    """Stacked bars of each window's planned rows by domain, one subplot per selecting run."""
    runs = [r for r in runs if r.kind == "select" and any(d.get("per_domain") for d in r.decisions)]
    if not runs:
        return None
    fig, axes = new_figure(ncols=len(runs), width=5.5)
    for ax, run in zip(axes[0], runs, strict=True):
        recs = [d for d in run.decisions if d.get("per_domain")]
        names = run.domains or sorted({n for d in recs for n in d["per_domain"]})
        colors = _colors(names)
        x = np.arange(len(recs))
        bottom = np.zeros(len(recs))
        for name in names:
            vals = np.asarray([float(d["per_domain"].get(name, 0)) for d in recs])
            ax.bar(x, vals, bottom=bottom, color=colors[name], label=name)
            bottom += vals
        for i, d in enumerate(recs):
            if d.get("decision"):
                ax.annotate("new", (x[i], bottom[i]), ha="center", va="bottom", fontsize=7)
        ax.set_ylim(0, max(1.0, float(bottom.max())) * 1.25)  # room for the marks and the legend
        ax.set_xticks(x, [f"w{d.get('window', i)}\n@{d.get('step', '?')}" for i, d in enumerate(recs)],
                      fontsize=7)
        ax.set(title=f"Selected rows by domain: {run.label}", xlabel="window (@ first step)", ylabel="rows")
        ax.legend(fontsize=8)
    return save_png(fig, out_dir, "selection.png")


def plot_filter(runs: list[RunData], out_dir: Path) -> Path | None:
    """Bars of the rows each filter stage kept at each firing (by domain where recorded), one subplot per run."""
    runs = [(r, pools) for r in runs if (pools := filter_pools(r))]
    if not runs:
        return None
    fig, axes = new_figure(ncols=len(runs), width=5.5)
    for ax, (run, pools) in zip(axes[0], runs, strict=True):
        bars = [(label, p) for label, ps in pools.items() for p in ps]
        names = run.domains or sorted({n for _, p in bars for n in p.per_domain})
        colors = _colors(names)
        x = np.arange(len(bars))
        if all(p.per_domain for _, p in bars):
            bottom = np.zeros(len(bars))
            for name in names:
                vals = np.asarray([float(p.per_domain.get(name, 0)) for _, p in bars])
                ax.bar(x, vals, bottom=bottom, color=colors[name], label=name)
                bottom += vals
            ax.legend(fontsize=8, loc="upper center", ncols=min(3, len(names)))
        else:
            ax.bar(x, [p.rows for _, p in bars], color="tab:gray")
        for i, (_, p) in enumerate(bars):
            ax.annotate(str(p.rows), (x[i], p.rows), ha="center", va="bottom", fontsize=7)
        ax.set_ylim(0, max(p.rows for _, p in bars) * 1.45)  # room for the counts and the legend
        ax.set_xticks(x, [f"{label}\n@{p.step}" if len(pools) > 1 else f"@{p.step}" for label, p in bars],
                      fontsize=7)
        ax.set(title=f"Rows kept by the filter: {run.label}", xlabel="decision (@ step)", ylabel="rows in the pool")
    return save_png(fig, out_dir, "filter.png")


def plot_order(runs: list[RunData], out_dir: Path) -> Path | None:
    """The scores of the served rows along the step axis (median, quartiles, range), one subplot per reorder run."""
    runs = [(r, order) for r in runs if (order := served_order(r)) is not None]
    if not runs:
        return None
    fig, axes = new_figure(ncols=len(runs), width=6.0)
    for ax, (run, order) in zip(axes[0], runs, strict=True):
        q = order.quantiles
        # a step's rows are trained together: each step's band spans [step, step + 1)
        xs = np.repeat(np.asarray(order.steps, dtype=float), 2) + np.tile([0.0, 1.0], len(order.steps))
        band = {k: np.repeat(q[:, k], 2) for k in range(q.shape[1])}
        ax.fill_between(xs, band[0], band[4], color="tab:purple", alpha=0.15, label="min - max", linewidth=0)
        ax.fill_between(xs, band[1], band[3], color="tab:purple", alpha=0.35, label="quartiles", linewidth=0)
        ax.plot(xs, band[2], color="tab:purple", linewidth=1.2, label="median")
        for step in sorted({int(d.get("step", 0)) for d in run.decisions if d.get("decision")}):
            ax.axvline(step, color="#888", linestyle=":", linewidth=0.8)
        ax.set(title=f"Order served by {order.stage}: {run.label}", xlabel="optimizer step",
               ylabel="score of the step's rows")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return save_png(fig, out_dir, "order.png")


def plot_weights(runs: list[RunData], out_dir: Path) -> Path | None:
    """Histogram of all sample weights and weight against loss, one row per weighting run."""
    runs = [r for r in runs if r.weights]
    if not runs:
        return None
    fig, axes = new_figure(ncols=2, nrows=len(runs), width=5.0)
    for row, run in zip(axes, runs, strict=True):
        w = np.concatenate([np.asarray(r.get("weights") or [], dtype=float) for r in run.weights])
        pairs = [(s, wt, ls) for r in run.weights for s, wt, ls in
                 zip([r.get("step", 0)] * len(r.get("weights") or []), r.get("weights") or [], r.get("losses") or [])]
        row[0].hist(w, bins=min(40, max(5, w.size // 4)), color="tab:blue", alpha=0.8)
        row[0].set(title=f"Sample weights: {run.label}", xlabel="weight", ylabel="samples")
        if pairs:
            steps, ws, ls = (np.asarray(v, dtype=float) for v in zip(*pairs))
            sc = row[1].scatter(ls, ws, c=steps, s=8, cmap="viridis", alpha=0.7)
            row[1].figure.colorbar(sc, ax=row[1], label="step")
        row[1].set(title=f"Weight vs loss: {run.label}", xlabel="per-sample loss", ylabel="weight")
        row[1].grid(alpha=0.3)
    return save_png(fig, out_dir, "weights.png")


def plot_eval(runs: list[RunData], out_dir: Path) -> Path | None:
    """Grouped bars of the final validation loss per domain, one bar per run."""
    runs = [r for r in runs if r.run.get("eval_loss")]
    if not runs:
        return None
    domains: list[str] = []
    for r in runs:
        domains += [d for d in r.run["eval_loss"] if d not in domains]
    fig, axes = new_figure(width=max(6.0, 1.2 * len(domains) * max(1, len(runs)) / 2))
    ax = axes[0, 0]
    width = 0.8 / len(runs)
    x = np.arange(len(domains))
    for i, run in enumerate(runs):
        vals = [float(run.run["eval_loss"].get(d, np.nan)) for d in domains]
        bars = ax.bar(x - 0.4 + width * (i + 0.5), vals, width, label=run.label)
        ax.bar_label(bars, fmt="%.3g", fontsize=7)  # close losses are hard to tell apart by height alone
    ax.set_xticks(x, domains)
    ax.set(title="Final validation loss per domain", xlabel="validation domain", ylabel="mean sample loss")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return save_png(fig, out_dir, "eval_loss.png")


def plot_stage_time(stores: list[dict], out_dir: Path) -> Path | None:
    """Horizontal bars of seconds spent per offline stage, one group per store."""
    rows = [(s["name"], stage, t["seconds"]) for s in stores for stage, t in s["stages"].items()]
    if not rows or not any(sec for _, _, sec in rows):
        return None
    fig, axes = new_figure(width=7, height=max(2.5, 0.4 * len(rows) + 1))
    ax = axes[0, 0]
    ax.barh(np.arange(len(rows)), [r[2] for r in rows], color="tab:orange")
    ax.set_yticks(np.arange(len(rows)), [f"{store}: {stage}" for store, stage, _ in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set(title="Time spent per offline stage", xlabel="seconds (sum over stage runs)")
    ax.grid(axis="x", alpha=0.3)
    return save_png(fig, out_dir, "stage_time.png")


# --------------------------------------------------------------------------- stores
def find_stores(paths) -> list[Path]:
    """Store directories: each path itself, or its subfolders that hold a store."""
    out = []
    for p in map(Path, paths):
        if (p / STORE_HEADER).is_file():
            out.append(p)
        elif p.is_dir() and (found := sorted(d for d in p.iterdir() if (d / STORE_HEADER).is_file())):
            out += found
        else:
            raise FlexfeedError(f"no flexfeed store at {p} (nor in its subfolders)",
                                "pass a store directory, or a folder of stores, to --store")
    return out


def summarize_store(path: Path) -> dict:
    """info() of a store plus its stage log added up per stage."""
    from store.maintenance import info
    from store.store import Store

    st = Store.open(path)
    stages: dict[str, dict] = {}
    for rec in st.stage_log():
        t = stages.setdefault(str(rec.get("stage", "?")), {"runs": 0, "computed": 0, "skipped": 0, "rows": 0,
                                                            "seconds": 0.0})
        t["runs"] += 1
        for k in ("computed", "skipped", "rows"):
            t[k] += int(rec.get(k) or 0)
        t["seconds"] += float(rec.get("seconds") or 0.0)
    return {"name": path.name, "path": str(path), "info": info(st), "stages": stages}


# --------------------------------------------------------------------------- HTML
def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, dict):
        return ", ".join(f"{k}: {_fmt(x)}" for k, x in v.items())
    if isinstance(v, list | tuple):
        return ", ".join(_fmt(x) for x in v)
    return "" if v is None else str(v)


def _table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _image(path: Path, caption: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(path.stem)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _component(run: RunData) -> str:
    if run.kind == "plan":
        return " -> ".join(stage_labels(run))
    return run.run.get("component") or ""


def _repeats(run: RunData) -> str:
    """Rows the run's decisions chose that it had trained on before, and the distinct rows it trained on."""
    r = repeats(run)
    if r is None:
        return ""
    chosen = f"{r.already_seen} of {r.rows} at {r.decisions} decisions; " if r.decisions else ""
    return f"{chosen}{r.rows_seen} distinct rows"


def _runs_table(runs: list[RunData]) -> str:
    rows = [[r.path.name, r.kind, _component(r), r.run.get("steps"), r.run.get("train_loss"),
             r.run.get("global_batch"), ", ".join(r.domains), r.run.get("final_weights") or "", _repeats(r)]
            for r in runs]
    return _table(["run", "train_type", "component", "steps", "train loss", "global batch", "domains",
                   "final weights", "rows seen before"], rows)


def _stage_result(run: RunData, label: str) -> str:
    """One line on what a stage did, from what the run recorded."""
    family = label.split(":", 1)[0]
    if family == "select" and (pools := filter_pools(run).get(label)):
        return "kept " + ", ".join(str(p.rows) for p in pools) + " rows"
    if family == "mix":
        props = [d["proportions"] for d in run.decisions if d.get("proportions")]
        return "last proportions " + _fmt(props[-1]) if props else ""
    if family == "reorder" and (order := served_order(run)) is not None:
        med = order.quantiles[:, 2]
        return (f"served scores over steps {int(order.steps[0])}-{int(order.steps[-1])}: median "
                f"{np.nanmin(med):.4g} to {np.nanmax(med):.4g}")
    if family == "weight" and run.weights:
        w = np.concatenate([np.asarray(r.get("weights") or [], dtype=float) for r in run.weights])
        return f"weights (every weight stage multiplied): mean {w.mean():.4g}, min {w.min():.4g}, max {w.max():.4g}"
    return ""


def _plan_table(runs: list[RunData]) -> str | None:
    rows = []
    for r in runs:
        if r.kind != "plan":
            continue
        for label, steps in fired_steps(r).items():
            rows.append([r.path.name, label, ", ".join(map(str, steps)) or "never", _stage_result(r, label)])
    if not rows:
        return None
    return _table(["run", "stage", "fired at steps", "what it did"], rows)


def _refresh_table(runs: list[RunData]) -> str | None:
    rows = []
    for r in runs:
        total: dict[str, list[float]] = defaultdict(lambda: [0, 0, 0, 0.0])
        for d in r.decisions:
            for sig, st in (d.get("refresh") or {}).items():
                t = total[sig]
                t[0] += 1
                t[1] += int(st.get("stale", 0))
                t[2] += int(st.get("recomputed_here", 0))
                t[3] += float(st.get("seconds", 0.0))
        rows += [[r.path.name, sig, *t] for sig, t in sorted(total.items())]
    if not rows:
        return None
    return _table(["run", "signal/split", "decisions", "stale shards", "shards recomputed", "seconds"], rows)


def _store_tables(stores: list[dict]) -> str:
    parts = []
    for s in stores:
        inf = s["info"]
        parts.append(f"<h3>{html.escape(s['name'])}</h3><p>{html.escape(s['path'])}: {inf['num_rows']} rows in "
                     f"{inf['num_shards']} shards of {inf['shard_rows']}, {human_bytes(inf['bytes'])} on disk.</p>")
        if inf["signals"]:
            parts.append(_table(
                ["signal", "key", "dtype", "dim", "shards committed", "stale", "versions", "size", "index",
                 "compute s"],
                [[g["name"], g["key"][:12], g["dtype"], g["dim"] or "-", f"{g['shards_committed']}/{g['shards_total']}",
                  g["shards_stale"], g["versions"], human_bytes(g["bytes"]), g.get("index") or "-",
                  g["compute_seconds"]] for g in inf["signals"]]))
        else:
            parts.append("<p>No signals yet.</p>")
        if s["stages"]:
            parts.append(_table(["stage", "runs", "shards computed", "shards skipped", "rows", "seconds"],
                                [[k, t["runs"], t["computed"], t["skipped"], t["rows"], t["seconds"]]
                                 for k, t in s["stages"].items()]))
    return "".join(parts)


def _summary_section(out_dir: Path) -> Section | None:
    path = out_dir / SUMMARY_FILE
    if not path.is_file():
        return None
    data = read_json_object(path, "fix or remove summary.json", "expected a JSON object of facts",
                             'write {"target_share": 0.4, ...}')
    # "findings" (a list of sentences) are shown as text above the table of facts
    findings = data.get("findings") if isinstance(data.get("findings"), list) else []
    lead = "".join(f"<p>{html.escape(str(f))}</p>" for f in findings)
    facts = [[k, v] for k, v in data.items() if k != "findings" or not findings]
    return Section("Summary", lead + _table(["fact", "value"], facts))


STYLE = """body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1em}td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px;
text-align:left}th{background:#f0f0f0}img{max-width:100%}figcaption{color:#555;font-size:14px}"""


def _page(sections: list[Section]) -> str:
    body = "".join(f"<section><h2>{html.escape(s.title)}</h2>{s.body}</section>" for s in sections)
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>flexfeed report</title>"
            f"<style>{STYLE}</style></head><body><h1>flexfeed report</h1>{body}</body></html>\n")


# Each plot with the sentence printed under it.
PLOTS = (
    ("Training loss", plot_losses, "Training loss logged by the trainer at each logging step; lower is better. "
     "Runs on the same data and model can be compared directly."),
    ("Rows kept by the filter", plot_filter, "Rows a data plan's filter stage kept in the pool at each of its "
     "firings, stacked by domain; the later stages draw, order and weight rows of this pool only."),
    ("Domain proportions", plot_proportions, "Share of each domain in the batches of each mixing run; a "
     "proportion holds from the decision step that set it until the next decision."),
    ("Per-domain loss seen by the mixer", plot_mix_losses, "Mean training loss of each domain's samples in "
     "the batches the mixer observed; the signal that online mixers react to."),
    ("Order of the served rows", plot_order, "Score (the reorder's ranking signal) of the rows each optimizer "
     "step trained on: median line, quartile band and min-max band; dotted lines mark decisions. A reorder "
     "inside the windows restarts its pattern at each window; one that takes the budget spans the run."),
    ("Selected samples by domain", plot_selection, "Rows planned for each window of a selecting run, "
     "stacked by domain; 'new' marks windows where the selector made a fresh decision."),
    ("Sample weights", plot_weights, "Left: distribution of all per-sample weights. Right: each sample's "
     "weight against its loss, coloured by step, showing how the weighter treats easy and hard samples."),
    ("Validation loss per domain", plot_eval, "Mean loss on each validation domain at the end of training, "
     "one bar per run; lower is better."),
)


def write_report(run_dirs: list[str], out_dir: str | None = None, stores=()) -> Path:
    """Write PNG plots and report.html for the given runs (and stores); returns the HTML path."""
    if not run_dirs:
        raise FlexfeedError("no run directory given", "pass one or more run directories written by flexfeed train")
    runs = [load_run(d) for d in run_dirs]
    out = Path(out_dir) if out_dir else runs[0].path.resolve().parent
    out.mkdir(parents=True, exist_ok=True)
    sections = [s for s in [_summary_section(out)] if s]
    sections.append(Section("Runs", _runs_table(runs) + (
        "<p>Rows seen before: of the distinct rows each decision window served, those an earlier window had "
        "served too, summed over the decisions; then the distinct rows the run served.</p>"
        if any(repeats(r) for r in runs) else "")))
    plan = _plan_table(runs)
    if plan:
        sections.append(Section("Data plan", "<p>Each stage of a composed plan, the decision steps it fired at "
                                "(the others reuse what it decided last) and what it did.</p>" + plan))
    for title, plot, caption in PLOTS:
        png = plot(runs, out)
        if png is not None:
            sections.append(Section(title, _image(png, caption)))
    refresh = _refresh_table(runs)
    if refresh:
        sections.append(Section("Signal refresh during training", "<p>Shards found stale before decisions and "
                                "recomputed with the current model, summed over decisions.</p>" + refresh))
    summaries = [summarize_store(p) for p in find_stores(stores)]
    if summaries:
        body = _store_tables(summaries)
        png = plot_stage_time(summaries, out)
        if png is not None:
            body += _image(png, "Seconds spent in each offline stage, summed over the store's stage log.")
        sections.append(Section("Signal stores", body))
    path = out / REPORT_FILE
    path.write_text(_page(sections), encoding="utf-8")
    return path
