"""The sampler benchmark: rotating arms, and its figures from a short run on the simulated GPU."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_sampler_gil as bench  # noqa: E402


def test_each_arm_takes_every_position_over_as_many_rounds_as_arms():
    arms = [0.0, 100.0, 500.0]
    orders = [bench.round_order(r, arms) for r in range(3)]
    assert orders[0] == arms and all(sorted(o) == arms for o in orders)
    for a in arms:
        assert sorted(o.index(a) for o in orders) == [0, 1, 2]


def test_a_short_run_reports_each_arm_against_no_sampler(tmp_path, capsys):
    out = tmp_path / "sampler.json"
    bench.main(["--device", "simulated", "--rounds", "2", "--block-s", "0.2", "--step-ms", "10",
                "--periods-ms", "10", "--step-end-periods-ms", "10", "--json", str(out)])
    result = json.loads(out.read_text())
    thread, step_end = result["arms"]
    assert (thread["where"], step_end["where"]) == ("thread", "step_end") and result["steps"] == 20
    for row in (thread, step_end):
        assert row["period_ms"] == 10.0 and len(row["slowdown_pct_per_round"]) == 2
        assert 0 < row["reads_per_s"] <= 100
        lo, hi = row["ci95"]
        assert lo <= row["slowdown_pct_median"] <= hi
    # the thread that reads power uses CPU; at step ends the reading is the loop's own
    assert thread["sampler_cpu_pct"] > 0
    text = capsys.readouterr().out
    assert "power read by the thread every 10 ms: " in text and "power read at step ends every 10 ms: " in text


def test_periods_must_be_positive(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--device", "simulated", "--periods-ms", "0"])
    assert "positive milliseconds" in capsys.readouterr().err
