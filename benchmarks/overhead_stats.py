"""Overhead figures from blocks of steps run with and without kdvfs, in ABBA order.

On a host whose step time drifts (block medians of a few steps moving by 15% from one block to
the next were seen on shared GPU hosts), a median over all steps of each arm mixes that drift
with the overhead. Blocks that ran back to back see nearly the same host, so:

- each round's overhead is the ratio of its two adjacent blocks (on / off);
- the figure is the median of the rounds, with a bootstrap interval over rounds;
- adjacent blocks of the *same* arm (ABBA puts them next to each other where rounds meet) show
  what two blocks differ by without any change at all: the noise a round's figure carries.
"""
from __future__ import annotations

import random
import statistics
from typing import Optional, Sequence


#: Said beside every overhead figure of a run on the CPU: the CPU's step and kdvfs's share of it
#: are nothing like a GPU's, so the figure only shows that the benchmark runs.
CPU_CAVEAT = "(CPU smoke run: this figure says nothing about kdvfs's overhead on a GPU)"


def cpu_caveat(on_cpu: bool) -> str:
    """``"  " + CPU_CAVEAT`` for a run on the CPU, else nothing: to append to an overhead line."""
    return f"  {CPU_CAVEAT}" if on_cpu else ""


def round_order(rnd: int, names: Sequence) -> list:
    """The order of round ``rnd``, one block per arm: the last round's order turned right by one.
    A round starts with the arm the last one ended with (adjacent blocks of the same arm show the
    noise), and every arm takes every place in turn (a drift within rounds falls on all arms
    alike). For two arms this is ABBA order."""
    k = -rnd % len(names)
    return list(names[k:]) + list(names[:k])


def rotated_arm(block: int, names: Sequence[str]) -> str:
    """The arm of block ``block`` when rounds follow :func:`round_order`."""
    rnd, place = divmod(block, len(names))
    return round_order(rnd, names)[place]


def abba_arm(block: int) -> str:
    """The arm of block ``block`` in the order on, off, off, on, on, off, ..."""
    return rotated_arm(block, ("on", "off"))


def pct(x: float, y: float) -> float:
    return (x / y - 1.0) * 100.0


def round_overheads_pct(on_ms: Sequence[float], off_ms: Sequence[float]) -> list[float]:
    """Each round's overhead: its block with kdvfs against its block without, in percent."""
    if len(on_ms) != len(off_ms):
        raise ValueError(f"{len(on_ms)} blocks with kdvfs against {len(off_ms)} without: rounds need one of each")
    return [pct(x, y) for x, y in zip(on_ms, off_ms)]


def same_arm_neighbours_pct(block_ms: Sequence[float], arms: Sequence[str]) -> list[float]:
    """Later over earlier, in percent, for each pair of adjacent blocks of the same arm."""
    return [pct(block_ms[i + 1], block_ms[i]) for i in range(len(block_ms) - 1) if arms[i] == arms[i + 1]]


def bootstrap_median_ci(values: Sequence[float], level: float = 0.95, resamples: int = 4000,
                        seed: int = 0) -> tuple[float, float]:
    """A percentile bootstrap interval for the median of ``values`` (deterministic for a seed)."""
    if not values:
        raise ValueError("no values to bootstrap")
    rng = random.Random(seed)
    n = len(values)
    meds = sorted(statistics.median(rng.choices(values, k=n)) for _ in range(resamples))
    lo = int((1.0 - level) / 2.0 * resamples)
    return meds[lo], meds[min(resamples - 1, resamples - 1 - lo)]


def summarise(on_block_ms: Sequence[float], off_block_ms: Sequence[float], block_ms: Sequence[float],
              arms: Sequence[str]) -> dict:
    """Round figures, their median and 95% interval, and the same-arm noise, as plain data."""
    rounds = round_overheads_pct(on_block_ms, off_block_ms)
    noise = same_arm_neighbours_pct(block_ms, arms)
    lo, hi = bootstrap_median_ci(rounds)
    return {
        "overhead_pct_per_round": rounds,
        "overhead_pct_median_of_rounds": statistics.median(rounds),
        "overhead_pct_median_of_rounds_ci95": [lo, hi],
        "same_arm_neighbours_pct": noise,
        "same_arm_neighbours_median_abs_pct": statistics.median(abs(x) for x in noise) if noise else None,
    }


def format_summary(s: dict, label: str = "", noise: bool = True) -> str:
    rounds = s["overhead_pct_per_round"]
    lo, hi = s["overhead_pct_median_of_rounds_ci95"]
    lines = [f"overhead{' ' + label if label else ''} per round (a round's blocks, median of {len(rounds)}): "
             f"{s['overhead_pct_median_of_rounds']:+.3f} % (95% bootstrap interval {lo:+.2f} to {hi:+.2f}; "
             f"rounds from {min(rounds):+.2f} to {max(rounds):+.2f})"]
    if noise and s["same_arm_neighbours_median_abs_pct"] is not None:
        lines.append(f"noise: adjacent blocks of the same arm differ by {s['same_arm_neighbours_median_abs_pct']:.2f} % "
                     f"(median |difference| of {len(s['same_arm_neighbours_pct'])} pairs)")
    return "\n".join(lines)


def quantiles_at(values: Sequence[float], qs: Sequence[float]) -> list[float]:
    """The quantiles of ``values`` at ``qs`` (whole percents), interpolated between neighbours."""
    if not values:
        raise ValueError("no values")
    if len(values) == 1:
        return [float(values[0])] * len(qs)
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return [cuts[round(q * 100) - 1] for q in qs]


def step_quantiles(on_ms: Sequence[float], off_ms: Sequence[float],
                   qs: Sequence[float] = (0.1, 0.25, 0.5, 0.75, 0.9)) -> list[dict]:
    """Each arm's step-time quantiles, and their ratio in percent.

    Host hiccups only ever add time to a step, so the low quantiles are the steps none reached:
    there the ratio is what kdvfs adds to an undisturbed step. Where it grows towards the high
    quantiles, kdvfs's cost depends on the host's disturbances (or adds some of its own)."""
    return [{"q": q, "with_ms": a, "without_ms": b, "overhead_pct": pct(a, b)}
            for q, a, b in zip(qs, quantiles_at(on_ms, qs), quantiles_at(off_ms, qs))]


def format_step_quantiles(rows: Sequence[dict], label: str = "with / without kdvfs") -> str:
    return (f"step-time quantiles, {label}: "
            + "; ".join(f"p{round(r['q'] * 100):02d} {r['with_ms']:.2f} / {r['without_ms']:.2f} ms "
                        f"({r['overhead_pct']:+.2f}%)" for r in rows))


def long_session_figures(engine, steps: int) -> dict:
    """What one long kdvfs session's profiled steps cost, by kdvfs's own measure (its cadence):
    the steps it profiled, the spacing in force, each one's extra GPU time against the median plain
    step, and the share of the time that comes to. A benchmark's short blocks each start a session
    and end before the cadence has spaced its profiled steps, so they cannot show this."""
    cadence, records = engine.cadence, engine.meter.steps
    plain = [r.gpu_time_ms for r in records if not r.region_time_ms]
    plain_ms = statistics.median(plain) if plain else None
    return {
        "steps": steps, "profiled_steps": [r.step for r in records if r.region_time_ms],
        "interval_steps": cadence.interval, "extra_ms_per_profiled_step": cadence.extra_ms,
        "median_plain_gpu_ms": plain_ms,
        "profiling_share": (cadence.extra_ms / (cadence.interval * plain_ms)
                            if cadence.extra_ms is not None and plain_ms else None),
        "thread_cpu_ms_per_step": engine.thread_cpu_s * 1e3 / steps if steps else None,
    }


def format_long_session(c: dict) -> str:
    cost = ("no profiled step judged yet" if c["profiling_share"] is None else
            f"each added {c['extra_ms_per_profiled_step']:.1f} ms to a {c['median_plain_gpu_ms']:.1f} ms step: "
            f"{c['profiling_share']:.2%} of the time")
    threads = c.get("thread_cpu_ms_per_step")
    return (f"one kdvfs session over {c['steps']} steps: profiled steps {c['profiled_steps']}, now one in "
            f"{c['interval_steps']}; {cost}"
            + ("" if threads is None else f"; kdvfs's threads used {threads:.3f} ms of CPU time per step"))


def long_run_estimate(stats: dict, session: dict, profiled_timed_steps: int) -> Optional[dict]:
    """The overhead a long run would see: the blocks' median of rounds (their timed steps
    plain, so the hooks of every step, kdvfs's threads and what a session start leaves behind)
    plus the long session's profiled share (kdvfs's measure, not a timing of this benchmark).

    ``profiled_timed_steps``: timed steps of the blocks that kdvfs profiled; their cost is then in
    the rounds as well, and the sum counts it twice: an upper bound."""
    share = session.get("profiling_share")
    if share is None:
        return None
    lo, hi = stats["overhead_pct_median_of_rounds_ci95"]
    add = share * 100.0
    return {"overhead_pct": stats["overhead_pct_median_of_rounds"] + add, "ci95": [lo + add, hi + add],
            "profiling_pct": add, "profiled_timed_steps": profiled_timed_steps}


def format_long_run_estimate(e: dict) -> str:
    lo, hi = e["ci95"]
    caveat = ("" if not e["profiled_timed_steps"] else
              f"; {e['profiled_timed_steps']} timed steps were profiled, counted twice: an upper bound")
    return (f"long-run estimate: median of rounds + profiled share {e['profiling_pct']:.2f}% = "
            f"{e['overhead_pct']:+.2f}% (interval {lo:+.2f} to {hi:+.2f}){caveat}")
