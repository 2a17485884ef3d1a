"""Shared test helpers: deterministic work sources, a region recorder plugin, a lagging marker."""
from __future__ import annotations

import time

from kdvfs_plugins import hookimpl
from kdvfs_plugins.devices.base import Marker
from kdvfs_plugins.sim.gpu import Work


class FixedWork:
    """Each marker costs the next duration from a list (cycled): a deterministic virtual GPU load."""

    def __init__(self, durations_s=(0.001,), category="gemm"):
        self.durations_s = list(durations_s)
        self.category = category
        self.i = 0

    def __call__(self):
        d = self.durations_s[self.i % len(self.durations_s)]
        self.i += 1
        return [Work(self.category, d)]


class RegionRecorder:
    """A plugin that records every region boundary it is told about."""

    def __init__(self):
        self.events = []
        self.changes = []

    @hookimpl
    def kdvfs_region_enter(self, event):
        self.events.append(("enter", event.region, event.step))

    @hookimpl
    def kdvfs_region_exit(self, event):
        self.events.append(("exit", event.region, event.step))

    @hookimpl
    def kdvfs_clocks_applied(self, change):
        self.changes.append(change)

    def phases(self, step=None):
        """Entered region names (phases only) in order."""
        return [r for kind, r, s in self.events if kind == "enter" and "/" not in r and (step is None or s == step)]


class TimedMarker(Marker):
    """Reached when the host clock passes ``t`` (a GPU running behind the training thread)."""

    def __init__(self, t):
        self.t = t

    def query(self):
        return time.perf_counter() >= self.t

    def wait(self):
        d = self.t - time.perf_counter()
        if d > 0:
            time.sleep(d)

    def elapsed_ms(self, later):
        return (later.t - self.t) * 1e3
