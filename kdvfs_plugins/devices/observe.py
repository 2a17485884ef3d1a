"""Real readings, never a write: a read-only view of any device, recording what it would have set.

The default wherever clock writes are not allowed, and the only device to use on a GPU that is
shared or not yours to change. Vendor and mode are two axes: ``ObserveDevice`` wraps a device of
any vendor (NVML today) and passes every reading through; ``set_clocks`` and ``reset_clocks`` only
record.
"""
from __future__ import annotations

import dataclasses
import threading
import time
from typing import Optional

from ..clocks import ClockPair
from .base import Device, DeviceInfo, Marker


class ObserveDevice(Device):
    """``ObserveDevice(device)`` wraps ``device``; ``ObserveDevice(index, nvml=...)`` opens an NVML GPU."""

    kind = "observe"

    def __init__(self, device: "Device | int" = 0, nvml=None, marker_factory=None):
        if not isinstance(device, Device):
            from .nvml import NvmlDevice

            device = NvmlDevice(device, nvml=nvml, marker_factory=marker_factory)
        self.inner = device
        self._lock = threading.Lock()
        #: (host time, clocks or None for a reset) for every change it would have made.
        self.would_set: list[tuple[float, Optional[ClockPair]]] = []

    # capabilities: the wrapped device's, less writing
    @property
    def simulated(self) -> bool:  # type: ignore[override]
        return self.inner.simulated

    @property
    def virtual_timeline(self) -> bool:  # type: ignore[override]
        return self.inner.virtual_timeline

    @property
    def power_source(self) -> str:  # type: ignore[override]
        return self.inner.power_source

    def info(self) -> DeviceInfo:
        return dataclasses.replace(self.inner.info(), kind=self.kind, can_write_clocks=False)

    def current_clocks(self) -> ClockPair:
        return self.inner.current_clocks()

    def energy_mj(self) -> int:
        return self.inner.energy_mj()

    def power_mw(self) -> int:
        return self.inner.power_mw()

    def marker(self) -> Marker:
        return self.inner.marker()

    def release_markers(self, markers) -> None:
        self.inner.release_markers(markers)

    def close(self) -> None:
        self.inner.close()

    def __getattr__(self, name: str):
        # readings a device offers beyond the protocol (handle, timeline_s, power_mw_at, ...)
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def set_clocks(self, clocks: ClockPair, marker: Optional[Marker] = None) -> None:
        self.inner.info().clocks.check(clocks)
        with self._lock:
            self.would_set.append((time.perf_counter(), clocks))

    def reset_clocks(self, marker: Optional[Marker] = None) -> None:
        with self._lock:
            self.would_set.append((time.perf_counter(), None))


def observe_instead(device: Device) -> ObserveDevice:
    """An observe view of ``device``, same GPU and session (after a refused write)."""
    return device if isinstance(device, ObserveDevice) else ObserveDevice(device)
