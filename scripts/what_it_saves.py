"""The README's "What it saves" table, from the commands that print each row (model predictions).

    python scripts/what_it_saves.py

Each row names its command; the figures are that command's JSON output, formatted. The docs
build (``scripts/build_docs.py``) runs this script and checks the README's table against it.
"""
from __future__ import annotations

import json
import subprocess
import sys


def kdvfs(*args: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "kdvfs_plugins.cli", "simulate", *args, "--json"],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def row(rows: list, granularity: str, objective: str) -> dict:
    return next(r for r in rows if r["granularity"] == granularity and r["objective"] == objective)


def pct(x: float) -> str:
    return f"{x:+.2%}".replace("-", "−")


def span(values) -> str:
    lo, hi = min(values), max(values)
    return pct(lo) if abs(hi - lo) < 5e-5 else f"{pct(lo)} to {pct(hi)}"


def main() -> int:
    compare = kdvfs("--compare")
    instant = kdvfs("--compare", "--switch-latency-ms", "0")
    explore = kdvfs("--explore", "--seeds", "5")
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
