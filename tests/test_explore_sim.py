"""The trace-replaying GPU stays faithful to the kernel replay; the live path through the engine."""
import json
import subprocess
import sys

import numpy as np
import pytest

from kdvfs_plugins.clocks import ClockPair
from kdvfs_plugins.devices.simulated import TraceDevice
from kdvfs_plugins.sim.gpu import VirtualGPU
from kdvfs_plugins.sim.readings import Readings
from kdvfs_plugins.sim.stretch import StretchGPU
from kdvfs_plugins.sim.trace import Trace, replay
from kdvfs_plugins.studies.explore import TraceDriver, _config, _engine, execute
from kdvfs_plugins.studies.planning import plan_lookup


def requests_for(layout, clocks_for, current=None):
    """The changes an actuator makes in one step of ``layout`` at ``clocks_for`` (stretch -> clocks)."""
    out = {}
    for j, region in enumerate(layout.regions):
        want = clocks_for(region)
        if want != current:
            out[j] = current = want
    return out


@pytest.mark.parametrize("name, plan", [
    ("default", None),
    ("optimizer low", {"optimizer": ClockPair(870, 2619)}),
    ("backward locked", {"backward": ClockPair(1500, 2619)}),
    ("mixed, memory clock", {"forward/matmul": ClockPair(1980, 1593), "backward/elementwise": ClockPair(1200, 2619),
                             "optimizer": ClockPair(1005, 2619)}),
])
def test_stretch_gpu_matches_the_kernel_replay(name, plan):
    trace = Trace.gpt1b()
    clocks_for = (lambda r: None) if plan is None else plan_lookup(plan)
    ref = replay(VirtualGPU(noise=True, seed=3), trace, steps=2, warmup_steps=2, clocks_for=None if plan is None else clocks_for)
    gpu = StretchGPU(trace, seed=3, noise=True, issue_ahead=False)
    runs = []
    for _ in range(4):
        runs.append(gpu.run_step(requests_for(gpu.next_layout, clocks_for, gpu.clocks)))
    t = np.mean([r.time_s.sum() for r in runs[2:]])
    e = np.mean([r.energy_j.sum() for r in runs[2:]])
    assert t == pytest.approx(ref.step_time_s, rel=2e-3)
    assert e == pytest.approx(ref.energy_j, rel=3e-3)


def test_power_usage_lags_a_second_and_the_instant_field_a_refresh():
    """As measured on the H100: usage is a ~1 s running average; the instant field follows in ~0.1 s."""
    r = Readings(idle_power_w=70.0)
    r.advance(0.0, 0.0, 2.0, 140.0)        # 2 s at 70 W
    r.advance(2.0, 140.0, 4.0, 1540.0)     # then 2 s at 700 W
    assert r.instant_w(1.95) == pytest.approx(70.0)
    assert r.instant_w(2.15) == pytest.approx(700.0)
    half = r.usage_w(2.5)
    assert 300 < half < 450                # half-way through its second, as the card's 50% at 0.5-0.6 s
    assert r.usage_w(3.05) == pytest.approx(700.0)
    assert r.counter_mj(2.05) == 140_000


def _drive(steps, **cfg):
    gpu = StretchGPU(Trace.gpt1b(), seed=2, noise=True)
    dev = TraceDevice(gpu)
    eng = _engine(_config(run_dir="unused", window_steps=5, **cfg), dev)
    drive = TraceDriver(eng, dev)
    for _ in range(steps):
        drive.step()
    eng.meter.poll()
    return eng, gpu


def test_the_meter_reads_a_simulated_run_as_a_real_one_from_power_readings(tmp_path):
    eng, gpu = _drive(40, mode="observe")
    assert eng.meter.sampler is not None and eng.meter.sampler.reads > 0     # integrated power, not the counter
    assert eng.meter.sampler.counter_reads >= 1                              # anchored to the counter
    wins = list(eng.meter.windows)
    assert len(wins) >= 5
    per_step = np.mean([w.energy_j / w.steps for w in wins[1:]])
    assert per_step == pytest.approx(gpu.energy_j / 40, rel=0.03)
    # step times from markers dated when each step ran: the trace's step, not host time
    times = [s.gpu_time_ms for s in eng.meter.steps]
    assert np.median(times) == pytest.approx(1e3 * gpu.now_s / 40, rel=0.02)
    eng.close()


def test_a_plan_changes_clocks_per_region_through_the_actuator():
    eng, gpu = _drive(12, mode="apply", region_clocks={"optimizer": {"sm_mhz": 1005, "mem_mhz": 2619}})
    assert gpu.clock_changes >= 2 * 10                          # into and out of the optimizer, each step
    assert eng.actuator.changes_applied >= 2 * 10
    eng.close()


def test_executing_a_plan_is_deterministic_and_lowers_energy():
    plan = {"optimizer": ClockPair(1005, 2619)}
    a = execute(Trace.gpt1b(), plan, seed=4, steps=6)
    b = execute(Trace.gpt1b(), plan, seed=4, steps=6)
    assert a == b
    assert a.energy_change < 0 and abs(a.time_change) < 0.01


def test_simulate_explore_json_has_the_keys():
    out = subprocess.run([sys.executable, "-m", "kdvfs_plugins.cli", "simulate", "--trace", "gpt1b", "--explore",
                          "--seeds", "1", "--explore-max-steps", "300", "--json"],
                         capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-2000:]
    d = json.loads(out.stdout)
    assert d["model_prediction"] is True and "live engine" in d["path"]
    assert {"oracle_energy_change", "oracle_time_change", "seeds", "summary"} <= set(d)
    s = d["seeds"][0]
    assert {"seed", "energy_change", "time_change", "steps", "exploration_time_change", "applied"} <= set(s)
    assert s["steps"] <= 300 + 30
    for key in ("energy_change", "time_change", "steps", "exploration_time_change"):
        assert set(d["summary"][key]) == {"min", "median", "max"}


def _small_step_trace():
    """Two steps of a small training step: compute-bound matrix products (forward, backward) and a
    long memory-bound optimizer, as the GPT's kernels but few of them (fast to replay)."""
    from kdvfs_plugins.sim.trace import Trace

    rows, t = [], 0.0
    for step in range(2):
        for phase, category, n, dur_us in (("forward", "gemm", 20, 900.0), ("backward", "gemm", 40, 900.0),
                                           ("optimizer", "optimizer", 30, 400.0)):
            for i in range(n):
                rows.append({"step": str(step), "phase": phase, "category": category, "kernel": f"{category}_{i}",
                             "start_us": f"{t:.3f}", "dur_us": str(dur_us)})
                t += dur_us + 5.0
    return Trace.from_rows(rows, source="small")


def test_the_phase_search_finds_what_replays_confirm_and_the_oracle_keeps_it():
    from kdvfs_plugins.studies.explore import oracle
    from kdvfs_plugins.studies.planning import PHASE_SEARCH_FRACTIONS, PlanningContext, phase_search

    trace = _small_step_trace()
    ctx = PlanningContext(trace)
    found = phase_search(ctx, switch_latency_ms=6.0)
    default = ctx.default_observation()
    # strict: not slower than the default within the replay's resolution, and it saves
    assert found.time_change <= 1e-4 and found.energy_change < -0.002, found
    assert found.clocks_by_name["optimizer"].sm_mhz < 1980
    # its figures are a replay's, not a prediction's
    again = ctx.observe(found.clocks_by_name, 6.0, True)
    assert again.step_energy_j == pytest.approx(found.energy_j) and again.step_time_s == pytest.approx(found.time_s)
    # no single lock of the search's grid within the budget does better
    sm_mhz = sorted(c.sm_mhz for c in ctx.clocks if c is not None and c.mem_mhz == 2619)
    for fr in PHASE_SEARCH_FRACTIONS:
        lock = ClockPair(min(sm_mhz, key=lambda f: abs(f - fr * sm_mhz[-1])), 2619)
        for phase in ("forward", "backward", "optimizer"):
            ob = ctx.observe({phase: lock}, 6.0, True)
            if ob.step_time_s <= default.step_time_s * (1 + 1e-4):
                assert ob.step_energy_j >= found.energy_j - 1e-9
    best = oracle(trace, max_slowdown=0.0, switch_latency_ms=6.0)
    assert best.executed_energy_change <= found.energy_change + 1e-9
