"""The figures the adapters log: host time per step since the last entry, energy and power."""
from __future__ import annotations

import pytest

from kdvfs_plugins.events import StepRecord, WindowRecord
from kdvfs_plugins.step_metrics import StepMetrics


def record(step: int, gpu_ms: float = 80.0, changes: int = 0) -> StepRecord:
    return StepRecord(step=step, gpu_time_ms=gpu_ms, region_time_ms={}, clock_changes=changes)


def test_overhead_covers_every_step_since_the_last_entry():
    m = StepMetrics()
    m.count([record(0)])
    m.count([])  # a poll where the GPU had finished nothing
    m.count([record(1), record(2)])
    first = m.take(record(2, gpu_ms=81.0, changes=3), [], host_time_s=0.009)
    assert first == {"kdvfs/gpu_time_ms": 81.0, "kdvfs/clock_changes": 3.0,
                     "kdvfs/overhead_ms": pytest.approx(3.0)}  # 9 ms over 3 steps
    m.count([record(3)])
    second = m.take(record(3), [], host_time_s=0.010)
    assert second["kdvfs/overhead_ms"] == pytest.approx(1.0)  # only what came after the first entry
    assert m.logged_host_s == 0.010


def test_energy_and_power_come_from_the_latest_window():
    m = StepMetrics()
    m.count([record(9)])
    wins = [WindowRecord(first_step=0, last_step=4, energy_j=200.0, duration_s=0.5, gpu_time_ms_per_step=100.0),
            WindowRecord(first_step=5, last_step=9, energy_j=220.0, duration_s=0.4, gpu_time_ms_per_step=80.0)]
    out = m.take(record(9), wins, host_time_s=0.001)
    assert out["kdvfs/energy_j_per_step"] == pytest.approx(44.0) and out["kdvfs/power_w"] == pytest.approx(550.0)


def test_an_entry_before_any_counted_step_does_not_divide_by_zero():
    out = StepMetrics().take(record(0), [], host_time_s=0.002)
    assert out["kdvfs/overhead_ms"] == pytest.approx(2.0)
