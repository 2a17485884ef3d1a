"""Real readings, never a write: records what it would have set.

The default wherever clock writes are not allowed, and the only device to use on a GPU that is
shared or not yours to change.
"""
from __future__ import annotations

import threading
import time
from typing import Optional

from ..clocks import ClockPair
from .base import Marker
from .nvml import NvmlDevice


class ObserveDevice(NvmlDevice):
    kind = "observe"

    def __init__(self, index: int = 0, nvml=None, marker_factory=None):
        super().__init__(index, nvml=nvml, marker_factory=marker_factory)
        self._lock = threading.Lock()
        #: (host time, clocks or None for a reset) for every change it would have made.
        self.would_set: list[tuple[float, Optional[ClockPair]]] = []

    def set_clocks(self, clocks: ClockPair, marker: Optional[Marker] = None) -> None:
        self.info().clocks.check(clocks)
        with self._lock:
            self.would_set.append((time.perf_counter(), clocks))

    def reset_clocks(self, marker: Optional[Marker] = None) -> None:
        with self._lock:
            self.would_set.append((time.perf_counter(), None))


def observe_instead(device: NvmlDevice) -> ObserveDevice:
    """An observe device on the same GPU and NVML session as ``device`` (after a refused write)."""
    obs = ObserveDevice.__new__(ObserveDevice)
    obs.__dict__.update(device.__dict__)
    obs._info = None
    obs._lock = threading.Lock()
    obs.would_set = []
    return obs
