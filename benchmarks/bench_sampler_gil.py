"""What kdvfs's power sampler costs a training thread that holds Python's GIL.

A training loop that the CPU paces (DeepSpeed ZeRO-2's was, on the two-GPU hosts) holds the GIL
nearly all the time. The sampler thread wakes once per power period and takes the GIL twice:
when its wait ends, and again after the power reading, which releases it. Each time the
training thread hands the GIL over and waits to get it back, which costs more the slower the
host wakes a waiting thread. kdvfs's own accounts (the adapters' host time, the threads' CPU
time) do not see that wait. With ``power_readings="step_end"`` the training thread reads power
itself at step ends and the thread wakes only for the counter.

This runs a pure-Python loop in blocks of fixed work, cut into "steps" of ``--step-ms``, with no
sampler, with a sampler thread at each period asked, and with readings at step ends, in an order
that rotates from round to round. It prints each arm's slowdown against the round's block without
a sampler: the median of rounds with a 95% bootstrap interval, the readings per second and the
sampler thread's CPU time. It asserts nothing.

    python benchmarks/bench_sampler_gil.py --device observe --periods-ms 100,500
    python benchmarks/bench_sampler_gil.py --device simulated --rounds 4 --block-s 0.1   # no GPU
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

from overhead_stats import bootstrap_median_ci, pct, round_order  # next to this script

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


OFF = "off"


def arm_name(where: str, period_ms: float) -> str:
    return f"{where} every {period_ms:g} ms"


def run_block(device, arm: tuple, iterations: int, steps: int, counter_period_s: float) -> dict:
    """One block: ``iterations`` of work in ``steps`` equal steps, under ``arm`` = (where, period ms)."""
    where, period_ms = arm
    sampler = None
    if where != OFF:
        sampler = EnergySampler(device, EnergySeries(), period_ms / 1e3, counter_period_s,
                                power_on_steps=where == "step_end")
        sampler.start()
    per_step = max(1, iterations // steps)
    at_step_end = sampler.on_step_end if sampler is not None and sampler.power_on_steps else None
    t0 = time.perf_counter()
    for _ in range(steps):
        busy(per_step)
        if at_step_end is not None:
            at_step_end()
    elapsed_s = time.perf_counter() - t0
    if sampler is None:
        return {"s": elapsed_s, "reads": 0, "cpu_s": 0.0}
    sampler.stop()
    return {"s": elapsed_s, "reads": sampler.reads, "cpu_s": sampler.cpu_time_s}


def summarise(rounds: list[dict], arms: list[tuple]) -> list[dict]:
    """Each sampler arm against the round's block without one."""
    rows = []
    off = (OFF, 0.0)
    for arm in arms:
        if arm == off:
            continue
        ratios = [pct(r[arm]["s"], r[off]["s"]) for r in rounds]
        lo, hi = bootstrap_median_ci(ratios)
        secs = sum(r[arm]["s"] for r in rounds)
        rows.append({
            "arm": arm_name(*arm), "where": arm[0], "period_ms": arm[1],
            "slowdown_pct_median": statistics.median(ratios), "ci95": [lo, hi], "slowdown_pct_per_round": ratios,
            "reads_per_s": sum(r[arm]["reads"] for r in rounds) / secs,
            "sampler_cpu_pct": 100.0 * sum(r[arm]["cpu_s"] for r in rounds) / secs,
        })
    return rows


def _periods(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="observe", help="observe (a real GPU, read only) or simulated")
    p.add_argument("--index", type=int, default=0, help="GPU index (NVML's)")
    p.add_argument("--periods-ms", default="100,500", help="sampler-thread power periods to compare with none")
    p.add_argument("--step-end-periods-ms", default="100",
                   help="periods of power_readings='step_end' to compare with none (empty: none)")
    p.add_argument("--counter-period-ms", type=float, default=5000.0, help="energy counter period, as kdvfs's")
    p.add_argument("--step-ms", type=float, default=70.0, help="length of a step of the loop")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--block-s", type=float, default=1.0, help="seconds of work per block")
    p.add_argument("--json", default=None, help="also write the results to this file")
    a = p.parse_args(argv)
    try:
        thread_periods, step_periods = _periods(a.periods_ms), _periods(a.step_end_periods_ms)
    except ValueError:
        p.error("--periods-ms, --step-end-periods-ms: milliseconds, comma-separated")
    if not thread_periods + step_periods or any(x <= 0 for x in thread_periods + step_periods):
        p.error("--periods-ms, --step-end-periods-ms: positive milliseconds, comma-separated "
                "(no sampler is always measured)")
    arms = [(OFF, 0.0)] + [("thread", x) for x in thread_periods] + [("step_end", x) for x in step_periods]
    device = open_device(a.device, a.index)
    try:
        iterations = calibrate(a.block_s)
        steps = max(1, round(a.block_s * 1e3 / a.step_ms))
        rounds = []
        for rnd in range(a.rounds):
            rounds.append({arm: run_block(device, arm, iterations, steps, a.counter_period_ms / 1e3)
                           for arm in round_order(rnd, arms)})
            print(f"round {rnd}: " + ", ".join(f"{arm_name(*arm) if arm[0] != OFF else OFF} {rounds[-1][arm]['s']:.3f} s"
                                               for arm in arms), flush=True)
    finally:
        device.close()
    rows = summarise(rounds, arms)
    base = statistics.median(r[(OFF, 0.0)]["s"] for r in rounds)
    print(f"\n{a.device} device, {iterations} iterations per block in {steps} steps ({base:.3f} s without a "
          f"sampler), {a.rounds} rounds")
    for r in rows:
        lo, hi = r["ci95"]
        label = "power read by the thread" if r["where"] == "thread" else "power read at step ends"
        print(f"{label} every {r['period_ms']:g} ms: {r['slowdown_pct_median']:+.3f}% (95% bootstrap interval "
              f"{lo:+.3f} to {hi:+.3f}); {r['reads_per_s']:.1f} readings/s, sampler thread CPU "
              f"{r['sampler_cpu_pct']:.3f}% of the time")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": a.device, "iterations": iterations, "steps": steps, "rounds": a.rounds,
                       "block_s_without": base, "arms": rows}, f, indent=1)


if __name__ == "__main__":
    main()
