"""The `flexfeed` command: a thin click layer over plain functions.

Each command imports what it runs inside its own body: `flexfeed --help` and `flexfeed store info` must not
pay for torch, transformers and zarr, which the training and stage modules load at import.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import sys

import click

from store.errors import FlexfeedError

# what a user interrupting each command keeps, and how to go on (the stage and store commands' by default)
INTERRUPTED = {
    "train": "interrupted; committed shards and saved checkpoints are kept, rerun with "
             "resume_from_checkpoint=true to continue from the last checkpoint",
}
INTERRUPTED_DEFAULT = "interrupted; committed shards are kept, rerun to continue"


def os_error_line(exc: BaseException) -> str | None:
    """One line for a file system refusal a user can fix (full disk, read-only, no permission); None otherwise."""
    seen = set()
    while exc is not None and id(exc) not in seen:  # the OSError may be the cause of what reached us
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            where = f" writing {exc.filename}" if exc.filename else ""
            return (f"no space left on the device{where} (free space: `flexfeed store gc STORE` removes the debris "
                    "of interrupted writes; or point store:/output_dir at another disk; committed shards are kept, "
                    "rerun to continue)")
        if isinstance(exc, OSError) and exc.errno == errno.EROFS:
            where = f" ({exc.filename})" if exc.filename else ""
            return (f"cannot write to a read-only file system{where} (reading a complete store needs no write "
                    "access; to compute or refresh signals, copy the store to a writable folder and point "
                    "`store:` at it)")
        if isinstance(exc, PermissionError):
            return f"permission denied: {exc.filename or exc} (run as a user who may write there, or use another folder)"
        exc = exc.__cause__ or exc.__context__
    return None


def one_line_errors(fn):
    """Turn a FlexfeedError, a full or read-only disk, or Ctrl-C into one clear line on stderr (exit 2, or 130)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except FlexfeedError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            ctx = click.get_current_context(silent=True)
            click.echo(INTERRUPTED.get(ctx.info_name if ctx else "", INTERRUPTED_DEFAULT), err=True)
            sys.exit(130)
        except (OSError, RuntimeError) as exc:  # torch reports a failed checkpoint write as a RuntimeError
            line = os_error_line(exc)
            if line is None:
                raise
            click.echo(f"error: {line}", err=True)
            sys.exit(2)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="flexfeed")
def main():
    """flexfeed: schedule which data an LLM sees, in what proportion and with what weight."""


# --------------------------------------------------------------------------- store
@main.group()
def store():
    """Inspect and maintain a signal store."""


@store.command("info")
@click.argument("path")
@click.option("--step", type=int, default=None, help="Current model version (training step) for staleness.")
@click.option("--max-staleness", type=int, default=None, help="Shards older than this many steps are stale.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@one_line_errors
def store_info(path, step, max_staleness, as_json):
    """Show signals, dims, dtypes, shard counts, versions, staleness, size on disk and sources."""
    from store.maintenance import human_bytes, info
    from store.store import Store

    data = info(Store.open(path), step, max_staleness)
    if as_json:
        click.echo(json.dumps(data, indent=1))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{data['path']}  dataset {data['dataset_fingerprint']}  "
                        f"{data['num_rows']} rows in {data['num_shards']} shards of {data['shard_rows']}")
    for col in ("signal", "key", "dtype", "dim", "shards", "stale", "versions", "size", "index"):
        table.add_column(col)
    for s in data["signals"]:
        versions = s["versions"]
        vtext = "-" if not versions else (str(versions[0]) if len(versions) == 1 else f"{versions[0]}..{versions[-1]}")
        table.add_row(s["name"], s["key"], s["dtype"], str(s["dim"] or "-"),
                      f"{s['shards_committed']}/{s['shards_total']}", str(s["shards_stale"]), vtext,
                      human_bytes(s["bytes"]), s["index"])
    Console().print(table)
    for line in _sources_lines(data["signals"]):
        click.echo(line)
    click.echo(f"total size {human_bytes(data['bytes'])}, format {data['format_version']}")


def _sources_lines(signals: list[dict]) -> list[str]:
    """One line per signal that records where its model, adapter or checkpoint files were read from."""
    return [f"sources of {s['name']} {s['key']}: " + ", ".join(f"{k} {v}" for k, v in sorted(s["sources"].items()))
            for s in signals if s.get("sources")]


@store.command("verify")
@click.argument("path")
@one_line_errors
def store_verify(path):
    """Check every header, commit record and shard checksum; exit 1 naming each problem (`bad:` lines)."""
    from tqdm import tqdm

    from store.maintenance import num_records, verify_path

    total = num_records(path)
    with tqdm(total=total, unit="shard", desc="verify", disable=total < 8) as bar:
        report = verify_path(path, progress=lambda: bar.update(1))
    for problem in report.problems:
        click.echo(f"bad: {problem}", err=True)
    click.echo(f"verified {report.checked} shards: {'ok' if report.ok else f'{len(report.problems)} bad'}")
    if not report.ok and any(f.paths for f in report.findings):
        click.echo(f"run `flexfeed store repair {path}` to set the damaged files aside; the next "
                   "`flexfeed stage all CONFIG` recomputes them", err=True)
    sys.exit(0 if report.ok else 1)


@store.command("repair")
@click.argument("path")
@one_line_errors
def store_repair(path):
    """Move what verify reports (damaged records, shards, signal headers) under quarantine/, for stage all to redo."""
    from store.repair import repair

    report = repair(path)
    for f in report.moved:
        click.echo(f"set aside: {f}")
    for f in report.busy:
        click.echo(f"busy: {f} (a writer holds it now; rerun repair once it is done)", err=True)
    if report.moved:
        click.echo(f"moved {len(report.moved)} items to {report.folder} (note.txt says why); "
                   "run `flexfeed stage all CONFIG` to recompute them")
    elif not report.busy:
        click.echo("nothing to repair: verify finds no damage")
    sys.exit(1 if report.busy else 0)


@store.command("gc")
@click.argument("path")
@click.option("--finished-runs", is_flag=True,
              help="Also drop the refreshed signal copies of training runs that finished (not of killed runs).")
@one_line_errors
def store_gc(path, finished_runs):
    """Remove uncommitted debris (interrupted writes, orphan signals, stale indexes); works on a full disk."""
    from store.maintenance import gc, human_bytes
    from store.store import Store

    report = gc(Store.open(path), drop_finished_runs=finished_runs)
    click.echo(f"removed {len(report.removed)} items, freed {human_bytes(report.bytes_freed)}")


# --------------------------------------------------------------------------- stage / train / report
def _load(config, overrides, training: bool = True):
    from .config import load_config

    return load_config(config, list(overrides), training=training)


@main.group()
def stage():
    """Offline stages that fill the signal store (embed, loss, grads, hidden, ngram, index, all)."""


def _stage_command(which: str, doc: str):
    @stage.command(which, help=doc)
    @click.argument("config")
    @click.argument("overrides", nargs=-1)
    @click.option("--scheduler", default=None, help="Address of an existing Dask scheduler (default: a LocalCluster).")
    @one_line_errors
    def command(config, overrides, scheduler):
        from .stage_job import run_stage_job

        cfg = _load(config, overrides, training=False)
        if scheduler:
            cfg.runner.scheduler = scheduler
        results = run_stage_job(cfg, which)
        for r in results:
            click.echo(r.summary())
        click.echo(f"recomputed_shards={sum(len(r.computed) for r in results)}")

    return command


for _which, _doc in (
    ("embed", "One L2-normalised embedding per sample (hf, sentence-transformers or vllm backend)."),
    ("loss", "Per-sample mean token loss and token count (training or reference model)."),
    ("grads", "Projected per-sample LoRA gradient features (Adam-preconditioned for train, SGD for target)."),
    ("hidden", "Pooled features of several hidden layers of a reference model (coincide's `hidden` signal)."),
    ("ngram", "Hashed word and word-pair counts of each row's text, no model (dsir's `ngram` signal)."),
    ("index", "Build or refresh the FAISS index of a signal."),
    ("all", "Run embed, loss, grads, hidden and ngram (when a component reads them) and index in order, then "
            "derive the clusterings and masks the components read."),
):
    _stage_command(_which, _doc)


@main.command()
@click.argument("config")
@click.argument("overrides", nargs=-1)
@click.option("--local_rank", "--local-rank", "local_rank", type=int, default=None, hidden=True,
              help="Set by the deepspeed launcher; the LOCAL_RANK environment variable carries the same.")
@one_line_errors
def train(config, overrides, local_rank):
    """Train with dynamic selection, mixing or weighting from CONFIG (key=value overrides)."""
    from .train import end_process_group
    from .train import train as run_train

    if local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(local_rank))

    summary = run_train(_load(config, overrides))
    end_process_group()  # the command ends the process: the group the run started ends with it
    click.echo(f"trained {summary['steps']} steps ({summary['train_type']}), output in {summary['output_dir']}")


@main.command()
@click.argument("run_dirs", nargs=-1, required=True)
@click.option("--out", "out_dir", default=None, help="Folder for report.html and the PNGs (default: first run's parent).")
@click.option("--store", "store_paths", multiple=True, help="Store directories to summarise.")
@one_line_errors
def report(run_dirs, out_dir, store_paths):
    """Write PNG plots and one HTML page for one or several runs."""
    from .report import write_report

    path = write_report(list(run_dirs), out_dir=out_dir, stores=list(store_paths))
    click.echo(f"report written to {path}")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON (sorted keys) instead of text.")
@one_line_errors
def components(as_json):
    """List every registered component by family: aliases, parameters, signals read, paper and rule."""
    from .components import components as catalog
    from .components import text_lines

    data = catalog()
    click.echo(json.dumps(data, indent=1, sort_keys=True) if as_json else "\n".join(text_lines(data)))


if __name__ == "__main__":
    main()
