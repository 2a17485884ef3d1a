"""The ``kdvfs/...`` figures the framework adapters hand to their loggers."""
from __future__ import annotations

from typing import Sequence

from .events import StepRecord, WindowRecord


class StepMetrics:
    """Builds one log entry from the latest step records; keeps the host time of the last entry,
    so that ``kdvfs/overhead_ms`` covers every step since then, not only those of one poll."""

    def __init__(self) -> None:
        self._host_logged_s = 0.0
        self._steps_since_log = 0

    @property
    def logged_host_s(self) -> float:
        """The host time the last entry accounted up to."""
        return self._host_logged_s

    def count(self, records: Sequence[StepRecord]) -> None:
        """Steps the GPU has finished since the last call (call with every poll's records)."""
        self._steps_since_log += len(records)

    def take(self, last: StepRecord, windows: Sequence[WindowRecord], host_time_s: float) -> dict[str, float]:
        """The entry for now, given the adapter's host time in total; starts the next interval."""
        metrics = {
            "kdvfs/gpu_time_ms": last.gpu_time_ms,
            "kdvfs/clock_changes": float(last.clock_changes),
            "kdvfs/overhead_ms": (host_time_s - self._host_logged_s) * 1e3 / max(1, self._steps_since_log),
        }
        self._host_logged_s, self._steps_since_log = host_time_s, 0
        if windows:
            win = windows[-1]
            metrics["kdvfs/energy_j_per_step"] = win.energy_j / win.steps
            metrics["kdvfs/power_w"] = win.avg_power_w
        return metrics
