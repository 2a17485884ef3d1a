"""How long the planner takes: a random 2000 x 220 instance and a realistic GPT step.

Prints timings (wall clock and CPU time of this process; the planner uses one core); it asserts
nothing. Run: ``python benchmarks/bench_planner.py``.

The realistic instance is the measured H100 GPT step (``data/h100-gpt1b-step-kernels.csv``, step 0):
consecutive kernels of one phase and category form a region named ``phase/category``; their time
and energy away from the default clocks follow a simple model (part of the time scales with the SM
clock, part with the memory clock; power grows with clock and voltage). Savings printed for it are
model predictions, not measurements.
"""
from __future__ import annotations

import csv
import time
from importlib import resources

import numpy as np

from kdvfs_plugins.clocks import ClockPair
from kdvfs_plugins.planner import PlanningProblem, SwitchModel, plan

SM_MHZ = np.arange(1980, 344, -15)  # 110 SM clocks
MEM_MHZ = (2619, 1593)
# Share of a kernel class's time that scales with the SM clock (the rest with the memory clock).
SM_SHARE = {"gemm": 0.9, "attention": 0.85, "optimizer": 0.15, "memset": 0.3}
DEFAULT_SM_SHARE = 0.2


def clock_pairs() -> tuple:
    """220 locked pairs; entry 0 of the problem is the unlocked default state (None)."""
    return tuple(ClockPair(int(s), m) for m in MEM_MHZ for s in SM_MHZ)


def random_problem(n: int = 2000, n_names: int = 40, seed: int = 0) -> PlanningProblem:
    rng = np.random.default_rng(seed)
    clocks = clock_pairs()
    phases = ("forward", "backward", "optimizer", "communication")
    names = tuple(f"{phases[rng.integers(4)]}/g{rng.integers(n_names)}" for _ in range(n))
    t = rng.uniform(1e-4, 2e-3, (n, len(clocks)))
    e = t * rng.uniform(300.0, 700.0, (n, len(clocks)))
    return PlanningProblem(names, t, e, clocks, 0)


def _scaled(t0: np.ndarray, share: np.ndarray, power0: np.ndarray):
    """Time and energy at every clock pair for kernels measured at the default state."""
    pairs = clock_pairs()
    sm = np.array([p.sm_mhz for p in pairs], float)
    mem = np.array([p.mem_mhz for p in pairs], float)
    # Under the power cap the card held about 1695 MHz for the whole step: the default state.
    f_sm = sm / 1695.0
    f_mem = mem / 2619.0
    t = t0[:, None] * (share[:, None] / f_sm + (1 - share[:, None]) / np.minimum(1.0, f_mem))
    # Dynamic power ~ f * V^2 with V rising with f: roughly f^2.5 over this range; 100 W static.
    volt = 0.7 + 0.3 * (sm / 1980.0)
    volt_def = 0.7 + 0.3 * (1695.0 / 1980.0)
    dyn = (power0[:, None] - 100.0) * (share[:, None] * f_sm * (volt / volt_def) ** 2 + (1 - share[:, None]) * f_mem)
    # Matrix products cannot exceed the 700 W cap: past it they slow down.
    power = np.minimum(100.0 + dyn, 700.0)
    over = (100.0 + dyn) / power
    t = t * np.where(share[:, None] > 0.5, over, 1.0)
    return np.hstack([t0[:, None], t]), np.hstack([(t0 * power0)[:, None], t * power])


def gpt_problem() -> PlanningProblem:
    path = resources.files("kdvfs_plugins.data") / "h100-gpt1b-step-kernels.csv"
    with path.open() as f:
        rows = [r for r in csv.DictReader(f) if r["step"] == "0"]
    names, t0, share, power0, gaps = [], [], [], [], []
    end_prev = None
    for r in rows:
        name = f"{r['phase']}/{r['category']}"
        start, dur = float(r["start_us"]) * 1e-6, float(r["dur_us"]) * 1e-6
        if names and names[-1] == name:
            t0[-1] += dur
            gaps[-1] += max(0.0, start - end_prev)
        else:
            if names:
                gaps[-1] += max(0.0, start - end_prev)
            names.append(name)
            t0.append(dur)
            gaps.append(0.0)
            s = SM_SHARE.get(r["category"], DEFAULT_SM_SHARE)
            share.append(s)
            power0.append(690.0 if s > 0.5 else 520.0)
        end_prev = start + dur
    t, e = _scaled(np.array(t0), np.array(share), np.array(power0))
    return PlanningProblem(tuple(names), t, e, (None,) + clock_pairs(), 0,
                           gap_time_s=np.array(gaps), gap_energy_j=90.0 * np.array(gaps))


def bench(label: str, problem: PlanningProblem, cases) -> None:
    print(f"\n{label}: {problem.n_occurrences} occurrences x {problem.n_clocks} clock states, "
          f"{len(set(problem.names))} region names")
    print(f"  {'granularity':<10} {'objective':<8} {'switch model':<28} {'wall s':>7} {'cpu s':>7} {'time':>8} "
          f"{'energy':>8} {'switches':>8} {'gap':>7}")
    for granularity, objective, slowdown, switch in cases:
        t0, c0 = time.perf_counter(), time.process_time()
        r = plan(problem, granularity=granularity, objective=objective, max_slowdown=slowdown, switch=switch)
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        sw = f"{switch.mode} {switch.latency_s * 1e3:g} ms floor {switch.effective_min_interval_s * 1e3:g} ms"
        print(f"  {granularity:<10} {objective:<8} {sw:<28} {dt:7.3f} {dc:7.3f} {r.time_change:+8.2%} "
              f"{r.energy_change:+8.2%} {r.switches:8d} {r.gap_bound:7.2%}")


def main() -> None:
    stall = SwitchModel()
    cases = [("kernel", obj, 0.02, sw) for obj in ("strict", "relaxed", "edp")
             for sw in (stall, SwitchModel(latency_s=0.0005, min_interval_s=0.002),
                        SwitchModel(latency_s=0.001, lands_late=True))]
    bench("random", random_problem(), cases)
    gpt = gpt_problem()
    cases = [(g, obj, 0.02, sw) for sw in (SwitchModel(latency_s=0.0), SwitchModel(latency_s=0.0005, lands_late=True),
                                           stall)
             for obj in ("strict", "relaxed", "edp") for g in ("iteration", "pass", "kernel")]
    bench("GPT step (model predictions)", gpt, cases)


if __name__ == "__main__":
    main()
