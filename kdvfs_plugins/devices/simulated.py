"""The simulated device: a virtual H100 on a virtual timeline.

Markers advance the virtual GPU through the work done since the previous marker (from a work
source: counted torch ops, or host time as a stand-in), so region times, clock changes and the
energy counter all live on one timeline. Everything it reports is a model prediction.
"""
from __future__ import annotations

import threading
import time
from typing import Callable, Iterable, Optional

from ..clocks import ClockPair
from ..sim.gpu import VirtualGPU, Work
from .base import Device, DeviceInfo, Marker

WorkSource = Callable[[], Iterable[Work]]


class VirtualMarker(Marker):
    """A point on the virtual timeline; reached as soon as it is recorded."""

    __slots__ = ("t_s",)
    reached_on_record = True

    def __init__(self, t_s: float):
        self.t_s = t_s

    def query(self) -> bool:
        return True

    def wait(self) -> None:
        return None

    def elapsed_ms(self, later: Marker) -> float:
        return (later.t_s - self.t_s) * 1e3  # type: ignore[attr-defined]

    def gpu_time_s(self) -> float:
        return self.t_s


class HostTimeWork:
    """Work source that takes the host time between markers as GPU time at default clocks.

    A stand-in for counted ops: it keeps the engine's timing plausible when nothing better is known.
    """

    def __init__(self, category: str = "elementwise"):
        self.category = category
        self._t = time.perf_counter()

    def __call__(self) -> list[Work]:
        now = time.perf_counter()
        dt, self._t = now - self._t, now
        return [Work(self.category, dt)] if dt > 0 else []


class SimulatedDevice(Device):
    kind = "simulated"

    def __init__(self, index: int = 0, gpu: Optional[VirtualGPU] = None, work_source: Optional[WorkSource] = None,
                 *, noise: bool = True, seed: int = 0, switch_latency_ms: Optional[float] = None):
        self.index = index
        self.gpu = gpu or VirtualGPU(switch_latency_ms=switch_latency_ms, noise=noise, seed=seed + index)
        self.work_source: WorkSource = work_source or HostTimeWork()
        self._lock = threading.Lock()
        #: Every clock request with the virtual time it was made at (None = reset).
        self.requests: list[tuple[float, Optional[ClockPair]]] = []

    @property
    def switch_latency_ms(self) -> float:
        """The virtual GPU's own switch latency: the device knows it (a real GPU's is measured)."""
        return self.gpu.switch_latency_s * 1e3

    def info(self) -> DeviceInfo:
        return DeviceInfo(
            kind=self.kind, index=self.index, name=self.gpu.name, uuid=f"SIM-{self.index}",
            driver="simulated", clocks=self.gpu.clock_table, power_limit_w=700.0, can_write_clocks=True,
        )

    def _advance(self) -> float:
        for work in self.work_source():
            self.gpu.run(work)
        return self.gpu.now_s

    def marker(self) -> Marker:
        with self._lock:
            return VirtualMarker(self._advance())

    def current_clocks(self) -> ClockPair:
        return self.gpu.effective_clocks()

    def _at(self, marker: Optional[Marker]) -> float:
        t = marker.gpu_time_s() if marker is not None else None
        return self.gpu.now_s if t is None else t

    def set_clocks(self, clocks: ClockPair, marker: Optional[Marker] = None) -> None:
        self.gpu.clock_table.check(clocks)
        with self._lock:
            at = self._at(marker)
            self.requests.append((at, clocks))
            self.gpu.request_clocks(clocks, at)

    def reset_clocks(self, marker: Optional[Marker] = None) -> None:
        with self._lock:
            at = self._at(marker)
            self.requests.append((at, None))
            self.gpu.request_clocks(None, at)

    def energy_mj(self) -> int:
        return self.gpu.energy_counter_mj()

    def power_mw(self) -> int:
        return int(self.gpu.power_w() * 1000)

    def timeline_s(self) -> float:
        return self.gpu.now_s
