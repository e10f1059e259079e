"""The files `flexfeed train` writes into its output_dir: their names, the writer, and the report's readers."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from store.errors import FlexfeedError

RUN_FILE = "flexfeed_run.json"
"""Summary: steps, losses, log history, per-domain validation loss, final mixer weights."""
DECISIONS_FILE = "flexfeed_decisions.jsonl"
"""One JSON line per window: rows per domain, proportions, selector statistics, refresh counts."""
WEIGHTS_FILE = "flexfeed_weights.jsonl"
"""Weighters: the global batch's weights and losses at every step."""
MIX_FILE = "flexfeed_mix.jsonl"
"""Mixers: the mean loss of each domain in every step's global batch."""
DOMAIN_WEIGHTS_FILE = "domain_weights.json"
"""Mixers with final weights (DoReMi): what a `static` mixer of a later run reads."""


def rank_file(rank: int) -> str:
    """Multi-process runs: each rank's digest of its decisions (identical files prove the ranks agreed)."""
    return f"flexfeed_rank{int(rank)}.json"


def write_jsonl(path: Path, records: list[dict]) -> None:
    """One sorted-key JSON object per line."""
    with open(path, "w") as fh:
        for r in records:
            fh.write(json.dumps(r, sort_keys=True) + "\n")


@dataclass
class RunData:
    """What one run directory holds; optional files become empty lists."""

    path: Path
    run: dict
    decisions: list[dict] = field(default_factory=list)
    weights: list[dict] = field(default_factory=list)
    mix: list[dict] = field(default_factory=list)

    @property
    def kind(self) -> str:
        return str(self.run.get("train_type", "static"))

    @property
    def label(self) -> str:
        comp = self.run.get("component")
        return f"{self.kind}/{comp} ({self.path.name})" if comp else f"{self.kind} ({self.path.name})"

    @property
    def domains(self) -> list[str]:
        return [str(d) for d in self.run.get("domains") or []]


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSON-lines file ([] when it does not exist); a clear error naming a bad line."""
    if not path.is_file():
        return []
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise FlexfeedError(f"{path}, line {n}: invalid JSON ({exc.msg})",
                                "the run may have been interrupted while writing: rerun it or delete the line") from None
    return out


def read_json_object(path: Path, bad_json_hint: str, not_object: str, not_object_hint: str) -> dict:
    """A JSON file that must hold one object; a clear error naming the file otherwise."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise FlexfeedError(f"{path}: invalid JSON at line {exc.lineno}: {exc.msg}", bad_json_hint) from None
    if not isinstance(data, dict):
        raise FlexfeedError(f"{path}: {not_object}", not_object_hint)
    return data


def load_run(run_dir: str | Path) -> RunData:
    """Read a run directory written by `flexfeed train`."""
    path = Path(run_dir)
    run_file = path / RUN_FILE
    if not run_file.is_file():
        raise FlexfeedError(f"no {RUN_FILE} in {path}", "pass a run directory written by `flexfeed train`")
    run = read_json_object(run_file, "the run did not finish writing it: rerun training",
                            "expected a JSON object", "pass a run directory written by `flexfeed train`")
    return RunData(path=path, run=run, decisions=read_jsonl(path / DECISIONS_FILE),
                   weights=read_jsonl(path / WEIGHTS_FILE), mix=read_jsonl(path / MIX_FILE))
