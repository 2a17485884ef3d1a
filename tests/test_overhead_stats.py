"""The benchmarks' overhead figures: ABBA order, rounds, the bootstrap interval, the noise."""
from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from overhead_stats import (abba_arm, bootstrap_median_ci, format_long_run_estimate,  # noqa: E402
                            format_step_quantiles, long_run_estimate, quantiles_at, round_overheads_pct,
                            rotated_arm, same_arm_neighbours_pct, step_quantiles, summarise)


def test_abba_order_puts_each_arm_first_in_every_other_round():
    assert [abba_arm(b) for b in range(8)] == ["on", "off", "off", "on", "on", "off", "off", "on"]


def test_three_arms_rotate_so_rounds_meet_on_one_arm_and_each_arm_takes_each_place():
    names = ("on", "off", "alt")
    order = [rotated_arm(b, names) for b in range(9)]
    rounds = [order[i:i + 3] for i in range(0, 9, 3)]
    assert all(sorted(r) == sorted(names) for r in rounds)
    assert all(rounds[i][-1] == rounds[i + 1][0] for i in range(2))
    assert all(sorted(r[place] for r in rounds) == sorted(names) for place in range(3))


def test_rounds_need_one_block_of_each_arm():
    assert round_overheads_pct([101.0, 99.0], [100.0, 100.0]) == pytest.approx([1.0, -1.0])
    with pytest.raises(ValueError, match="rounds need one of each"):
        round_overheads_pct([1.0, 2.0], [1.0])


def test_same_arm_neighbours_are_the_blocks_where_rounds_meet():
    arms = [abba_arm(b) for b in range(6)]
    blocks = [100.0, 90.0, 99.0, 110.0, 121.0, 50.0]
    # off (90) -> off (99), on (110) -> on (121): +10% each; the other pairs differ in arm
    assert same_arm_neighbours_pct(blocks, arms) == pytest.approx([10.0, 10.0])


def test_bootstrap_interval_holds_the_median_and_narrows_with_more_rounds():
    rng = random.Random(1)
    few = [1.0 + rng.gauss(0.0, 2.0) for _ in range(8)]
    many = [1.0 + rng.gauss(0.0, 2.0) for _ in range(200)]
    lo_f, hi_f = bootstrap_median_ci(few)
    lo_m, hi_m = bootstrap_median_ci(many)
    assert lo_f <= sorted(few)[4] <= hi_f and lo_m <= 1.0 <= hi_m
    assert hi_m - lo_m < (hi_f - lo_f) / 2
    assert bootstrap_median_ci(few) == (lo_f, hi_f)  # deterministic for a seed


def test_a_drift_shared_by_adjacent_blocks_leaves_the_rounds_at_the_true_overhead():
    # Step time drifts from 80 to 100 ms over the run; kdvfs adds 0.5%. Pooled medians mix
    # the drift in whenever the arms' blocks fall unevenly; the rounds do not.
    arms = [abba_arm(b) for b in range(40)]
    base = [80.0 + 20.0 * b / 39 for b in range(40)]
    blocks = [ms * (1.005 if arm == "on" else 1.0) for ms, arm in zip(base, arms)]
    on = [ms for ms, arm in zip(blocks, arms) if arm == "on"]
    off = [ms for ms, arm in zip(blocks, arms) if arm == "off"]
    s = summarise(on, off, blocks, arms)
    # adjacent blocks are one drift step apart (about 0.6%): ABBA alternates its sign
    assert abs(s["overhead_pct_median_of_rounds"] - 0.5) < 0.7
    lo, hi = s["overhead_pct_median_of_rounds_ci95"]
    assert lo < 0.5 < hi and hi - lo < 2.0


def test_the_long_run_estimate_adds_the_profiled_share_to_the_rounds_and_their_interval():
    stats = {"overhead_pct_median_of_rounds": 0.30, "overhead_pct_median_of_rounds_ci95": [-0.10, 0.70]}
    e = long_run_estimate(stats, {"profiling_share": 0.0018}, profiled_timed_steps=0)
    assert e["overhead_pct"] == pytest.approx(0.48) and e["ci95"] == pytest.approx([0.08, 0.88])
    assert "+0.48% (interval +0.08 to +0.88)" in format_long_run_estimate(e)
    assert "upper bound" not in format_long_run_estimate(e)
    # profiled steps among the timed ones are in the rounds already: said, not hidden
    assert "2 timed steps were profiled" in format_long_run_estimate(long_run_estimate(stats, {"profiling_share": 0.0018}, 2))
    # a session too short to judge a profiled step gives no estimate
    assert long_run_estimate(stats, {"profiling_share": None}, 0) is None


def test_quantiles_interpolate_between_neighbours():
    assert quantiles_at([10.0, 20.0, 30.0], [0.5]) == [20.0]
    assert quantiles_at([10.0, 20.0], [0.25]) == pytest.approx([12.5])
    assert quantiles_at([7.0], [0.9]) == [7.0]
    with pytest.raises(ValueError):
        quantiles_at([], [0.5])


def test_step_quantiles_tell_a_fixed_cost_from_one_that_grows_with_host_hiccups():
    # Undisturbed steps take 72 ms; a third of them meet a hiccup of up to 30 ms. kdvfs adds
    # 0.2% to every step, and in one run also 5% to the disturbed ones.
    rng = random.Random(3)
    base = [72.0 + (rng.uniform(0.0, 30.0) if rng.random() < 1 / 3 else rng.uniform(0.0, 0.2)) for _ in range(3000)]
    off = [72.0 + (rng.uniform(0.0, 30.0) if rng.random() < 1 / 3 else rng.uniform(0.0, 0.2)) for _ in range(3000)]
    fixed = step_quantiles([x * 1.002 for x in base], off)
    growing = step_quantiles([x * (1.002 if x < 72.2 else 1.05) for x in base], off)
    by_q = {r["q"]: r["overhead_pct"] for r in fixed}
    assert abs(by_q[0.1] - 0.2) < 0.1 and abs(by_q[0.5] - 0.2) < 0.1
    grown = {r["q"]: r["overhead_pct"] for r in growing}
    assert abs(grown[0.1] - 0.2) < 0.1 and grown[0.9] > 3.0
    text = format_step_quantiles(fixed)
    assert text.startswith("step-time quantiles, with / without kdvfs: p10 ") and "; p90 " in text


def test_a_cpu_run_labels_its_overhead_as_saying_nothing_about_a_gpu():
    from overhead_stats import CPU_CAVEAT, cpu_caveat

    assert cpu_caveat(False) == ""
    assert cpu_caveat(True) == f"  {CPU_CAVEAT}" and "says nothing about kdvfs's overhead on a GPU" in CPU_CAVEAT


@pytest.mark.slow
def test_megatron_cpu_smoke_run_prints_the_label_beside_the_figure(tmp_path):
    pytest.importorskip("megatron.core")
    import subprocess

    bench = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_megatron_overhead.py"
    # in a directory of its own: the run writes kdvfs_runs/ where it starts, never into the checkout
    out = subprocess.run([sys.executable, str(bench), "--tiny", "--steps", "8", "--kernel-dvfs", "--kernel-dvfs-mode",
                          "observe", "--kernel-dvfs-device", "simulated"], capture_output=True, text=True, timeout=300,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    line = next(x for x in out.stdout.splitlines() if x.startswith("overhead:"))
    assert line.endswith("(CPU smoke run: this figure says nothing about kdvfs's overhead on a GPU)")
    # ABBA rounds, as the DeepSpeed benchmark: 8 steps of 4 make one round of two blocks
    rounds = next(x for x in out.stdout.splitlines() if x.startswith("overhead per round"))
    assert "median of 1" in rounds and "95% bootstrap interval" in rounds
