"""The README's "What it saves" table, from the commands that print each row (model predictions).

    python scripts/what_it_saves.py

Each row names its command; the figures are that command's JSON output, formatted. The docs
build (``scripts/build_docs.py``) runs this script and checks the README's table against it.
"""
from __future__ import annotations

import json
import subprocess
import sys


def start(*args: str) -> subprocess.Popen:
    """``kdvfs simulate ARGS --json``, started: the three commands run side by side."""
    return subprocess.Popen([sys.executable, "-m", "kdvfs_plugins.cli", "simulate", *args, "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def result(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(proc.args)} failed:\n{err[-2000:]}")
    return json.loads(out)


def row(rows: list, granularity: str, objective: str) -> dict:
    return next(r for r in rows if r["granularity"] == granularity and r["objective"] == objective)


def pct(x: float) -> str:
    return f"{x:+.2%}".replace("-", "−")


def span(values) -> str:
    lo, hi = min(values), max(values)
    return pct(lo) if abs(hi - lo) < 5e-5 else f"{pct(lo)} to {pct(hi)}"


def main() -> int:
    procs = [start("--explore", "--seeds", "5"), start("--compare"), start("--compare", "--switch-latency-ms", "0")]
    explore, compare, instant = (result(p) for p in procs)
    strict, relaxed = row(compare["rows"], "kernel", "strict"), row(compare["rows"], "kernel", "relaxed")
    free = row(instant["rows"], "kernel", "strict")
    seeds = explore["seeds"]
    applied = [s for s in seeds if s["applied"]]
    lines = [
        "| plan | energy | step time | printed by |",
        "| --- | --- | --- | --- |",
        f"| kernel level, strict (no slowdown), changes issued ahead | {pct(strict['executed_energy_change'])} | "
        f"{pct(strict['executed_time_change'])} | `kdvfs simulate --compare` |",
        f"| kernel level, strict, if switches were instant | {pct(free['executed_energy_change'])} | "
        f"{pct(free['executed_time_change'])} | `kdvfs simulate --compare --switch-latency-ms 0` |",
        f"| kernel level, up to {compare['max_slowdown']:.0%} slower | {pct(relaxed['executed_energy_change'])} | "
        f"{pct(relaxed['executed_time_change'])} | `kdvfs simulate --compare` |",
        f"| found online by `mode=\"auto\"` in ≤ {max(s['steps'] for s in seeds)} steps "
        f"({len(applied)} of {len(seeds)} seeds applied) | {span([s['energy_change'] for s in seeds])} | "
        f"{span([s['time_change'] for s in seeds])} | `kdvfs simulate --explore --seeds 5` |",
    ]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
