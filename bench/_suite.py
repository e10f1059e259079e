"""`make bench`: every bench in turn, stopping at the first failure, then a table of each figure against its target.

A bench fails when it exits non-zero (each checks its own targets) or when its last line is not a JSON
summary. Each bench's full output goes to bench_out/<bench>.log as well as to the terminal.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from _targets import OPS, TARGETS

HERE = Path(__file__).resolve().parent
OUT = HERE.parent / "bench_out"


def run(script: Path) -> tuple[int, dict | None]:
    """Run one bench, echoing and logging its output; its exit status and final JSON line."""
    OUT.mkdir(exist_ok=True)
    lines: list[str] = []
    with subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, bufsize=1) as proc, open(OUT / f"{script.stem}.log", "w") as log:
        for line in proc.stdout:
            sys.stdout.write(line)
            log.write(line)
            lines.append(line)
    summary = None
    for line in reversed(lines):
        if line.strip():
            try:
                summary = json.loads(line)
            except ValueError:
                summary = None
            break
    return proc.returncode, summary if isinstance(summary, dict) else None


def table(results: list[tuple[str, int, dict | None]]) -> list[str]:
    rows = [f"{'bench':<18}{'figure':<30}{'value':>14}  target      ok"]
    for name, code, summary in results:
        targets = TARGETS.get(name, {})
        if summary is None:
            rows.append(f"{name:<18}{'(no JSON summary)':<30}{'':>14}  {'':<10}  no (exit {code})")
            continue
        if not targets:
            rows.append(f"{name:<18}{'(no targets in _targets.py)':<30}{'':>14}  {'':<10}  exit {code}")
        for figure, (op, bound) in targets.items():
            value = summary.get(figure)
            ok = value is not None and OPS[op](value, bound)
            rows.append(f"{name:<18}{figure:<30}{value!s:>14}  {op} {bound!s:<7}  {'yes' if ok else 'NO'}")
    return rows


def main() -> int:
    results = []
    failed = False
    for script in sorted(HERE.glob("[a-z]*.py")):
        print(f"== {script.relative_to(HERE.parent)}", flush=True)
        code, summary = run(script)
        results.append((script.stem, code, summary))
        if code != 0 or summary is None:
            failed = True
            break
    print("\n".join(["", "== summary", *table(results)]))
    if failed:
        name, code, _ = results[-1]
        print(f"stopped at {name}: exit {code}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
