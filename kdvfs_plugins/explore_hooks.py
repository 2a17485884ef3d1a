"""The engine's hooks of an explorer, one or per pipeline stage: it answers for the clocks while it
explores and takes the meter's step and window records.

A class that mixes this in provides ``clocks_for(region, step)``, ``observe_step(step,
gpu_time_ms, region_time_ms)`` and ``observe_window(first_step, last_step, energy_j)``.
"""
from __future__ import annotations

from .hookspecs import hookimpl


class ExplorerHooks:
    """``kdvfs_choose_clocks``, ``kdvfs_step_measured`` and ``kdvfs_window_measured`` for an explorer."""

    # trylast, registered after the plan policy: it answers before the policy, while a third-party
    # policy (a plain hookimpl) still answers first.
    @hookimpl(trylast=True)
    def kdvfs_choose_clocks(self, region, step):
        return self.clocks_for(region, step)

    @hookimpl
    def kdvfs_step_measured(self, record):
        self.observe_step(record.step, record.gpu_time_ms, record.region_time_ms)

    @hookimpl
    def kdvfs_window_measured(self, window):
        self.observe_window(window.first_step, window.last_step, window.energy_j)
