"""What kdvfs's power sampler costs a training thread that holds Python's GIL.

A training loop that the CPU paces (DeepSpeed ZeRO-2's was, on the two-GPU hosts) holds the GIL
nearly all the time. The sampler thread wakes once per power period and takes the GIL twice:
when its wait ends, and again after the power reading, which releases it. Each time the
training thread hands the GIL over and waits to get it back, which costs more the slower the
host wakes a waiting thread. kdvfs's own accounts (the adapters' host time, the threads' CPU
time) do not see that wait.

This runs a pure-Python loop in blocks of fixed work, with no sampler and with one at each
period asked, in an order that rotates from round to round, and prints each period's slowdown
against the round's block without: the median of rounds with a 95% bootstrap interval, the
sampler's readings per second and its CPU time. It asserts nothing.

    python benchmarks/bench_sampler_gil.py --device observe --periods-ms 100,500
    python benchmarks/bench_sampler_gil.py --device simulated --rounds 4 --block-s 0.1   # no GPU
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

from overhead_stats import bootstrap_median_ci, pct  # next to this script

from kdvfs_plugins.devices import open_device
from kdvfs_plugins.meter import EnergySampler, EnergySeries


def busy(iterations: int) -> int:
    """Python bytecode only: the GIL stays with this thread unless another one asks for it."""
    total = 0
    for i in range(iterations):
        total += i & 7
    return total


def calibrate(block_s: float) -> int:
    """Iterations of ``busy`` that take about ``block_s`` here."""
    n, spent = 100_000, 0.0
    while spent < 0.2:
        n *= 2
        t0 = time.perf_counter()
        busy(n)
        spent = time.perf_counter() - t0
    return max(1, int(n * block_s / spent))


def run_block(device, period_ms: float, iterations: int, counter_period_s: float) -> dict:
    sampler = None
    if period_ms > 0:
        sampler = EnergySampler(device, EnergySeries(), period_ms / 1e3, counter_period_s)
        sampler.start()
    t0 = time.perf_counter()
    busy(iterations)
    elapsed_s = time.perf_counter() - t0
    if sampler is None:
        return {"s": elapsed_s, "reads": 0, "cpu_s": 0.0}
    sampler.stop()
    return {"s": elapsed_s, "reads": sampler.reads, "cpu_s": sampler.cpu_time_s}


def arm_order(arms: list, rnd: int) -> list:
    """The arms rotated by the round: each takes every position equally often."""
    k = rnd % len(arms)
    return arms[k:] + arms[:k]


def summarise(rounds: list[dict], periods: list[float]) -> list[dict]:
    rows = []
    for p in periods:
        ratios = [pct(r[p]["s"], r[0.0]["s"]) for r in rounds]
        lo, hi = bootstrap_median_ci(ratios)
        secs = sum(r[p]["s"] for r in rounds)
        rows.append({
            "period_ms": p, "slowdown_pct_median": statistics.median(ratios), "ci95": [lo, hi],
            "slowdown_pct_per_round": ratios,
            "reads_per_s": sum(r[p]["reads"] for r in rounds) / secs,
            "sampler_cpu_pct": 100.0 * sum(r[p]["cpu_s"] for r in rounds) / secs,
        })
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="observe", help="observe (a real GPU, read only) or simulated")
    p.add_argument("--index", type=int, default=0, help="GPU index (NVML's)")
    p.add_argument("--periods-ms", default="100,500", help="power periods to compare with no sampler")
    p.add_argument("--counter-period-ms", type=float, default=5000.0, help="energy counter period, as kdvfs's")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--block-s", type=float, default=1.0, help="seconds of work per block")
    p.add_argument("--json", default=None, help="also write the results to this file")
    a = p.parse_args(argv)
    periods = [float(x) for x in a.periods_ms.split(",") if x.strip()]
    if not periods or any(x <= 0 for x in periods):
        p.error("--periods-ms: positive milliseconds, comma-separated (no sampler is always measured)")
    device = open_device(a.device, a.index)
    try:
        iterations = calibrate(a.block_s)
        arms = [0.0] + periods
        rounds = []
        for rnd in range(a.rounds):
            rounds.append({arm: run_block(device, arm, iterations, a.counter_period_ms / 1e3)
                           for arm in arm_order(arms, rnd)})
            print(f"round {rnd}: " + ", ".join(f"{'off' if arm == 0 else f'{arm:g} ms'} {rounds[-1][arm]['s']:.3f} s"
                                               for arm in arms), flush=True)
    finally:
        device.close()
    rows = summarise(rounds, periods)
    base = statistics.median(r[0.0]["s"] for r in rounds)
    print(f"\n{a.device} device, {iterations} iterations per block ({base:.3f} s without a sampler), "
          f"{a.rounds} rounds")
    for r in rows:
        lo, hi = r["ci95"]
        print(f"power every {r['period_ms']:g} ms: {r['slowdown_pct_median']:+.3f}% (95% bootstrap interval "
              f"{lo:+.3f} to {hi:+.3f}); {r['reads_per_s']:.1f} readings/s, sampler CPU "
              f"{r['sampler_cpu_pct']:.3f}% of the time")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": a.device, "iterations": iterations, "rounds": a.rounds,
                       "block_s_without": base, "periods": rows}, f, indent=1)


if __name__ == "__main__":
    main()
