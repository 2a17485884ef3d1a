"""The one device protocol: clocks, energy, power, and markers for GPU-aligned timing."""
from __future__ import annotations

import abc
import time
from dataclasses import dataclass
from typing import Optional

from ..clocks import ClockPair, ClockTable


@dataclass(frozen=True)
class DeviceInfo:
    kind: str
    index: int
    name: str
    uuid: str
    driver: str
    clocks: ClockTable
    power_limit_w: float
    can_write_clocks: bool


class Marker(abc.ABC):
    """A point in the GPU's work stream, recorded at a region boundary.

    ``record`` happens on the training thread and must be cheap. ``wait`` blocks the calling
    (worker) thread until the GPU reaches the point, and must release the GIL while it blocks.
    """

    @abc.abstractmethod
    def query(self) -> bool:
        """Has the GPU reached this marker?"""

    @abc.abstractmethod
    def wait(self) -> None:
        """Block until the GPU reaches this marker."""

    @abc.abstractmethod
    def elapsed_ms(self, later: "Marker") -> float:
        """GPU time from this marker to ``later`` (both reached)."""

    #: Whether the host time at which the GPU reached this marker follows from an earlier marker's
    #: (its ``elapsed_ms`` on one GPU clock), so that not every marker needs a thread to wait on it.
    dated_by_anchor = False

    def gpu_time_s(self) -> Optional[float]:
        """Absolute GPU-timeline position in seconds, where the device has one (simulated)."""
        return None


class HostMarker(Marker):
    """A marker for work that runs on the host: reached as soon as it is recorded."""

    __slots__ = ("t",)

    def __init__(self) -> None:
        self.t = time.perf_counter()

    def query(self) -> bool:
        return True

    def wait(self) -> None:
        return None

    def elapsed_ms(self, later: "Marker") -> float:
        return (later.t - self.t) * 1e3  # type: ignore[attr-defined]


class CudaMarker(Marker):
    """A CUDA event on the current stream. Recording costs about 12 µs of CPU time on an H100."""

    __slots__ = ("event",)
    dated_by_anchor = True

    def __init__(self, event) -> None:
        self.event = event
        event.record()

    def query(self) -> bool:
        return self.event.query()

    def wait(self) -> None:
        # Releases the GIL; the pool's events make the waiting thread sleep, not spin (see there).
        self.event.synchronize()

    def elapsed_ms(self, later: "Marker") -> float:
        return self.event.elapsed_time(later.event)  # type: ignore[attr-defined]


class CudaMarkerPool:
    """Makes CUDA-event markers, reusing the events of markers already resolved.

    Creating a CUDA event costs more than recording one, and a profiled step records hundreds.

    The events are blocking-sync: a thread waiting for one sleeps until the GPU reaches it. A
    default event's wait spins, and kdvfs's worker waits for the GPU most of every step, so it
    kept one CPU core busy per GPU, taken from a training loop that the CPU often paces. Waking
    from sleep takes tens of microseconds longer, against a clock switch of milliseconds.
    """

    def __init__(self, torch_module, prewarm: int = 512, blocking: bool = True) -> None:
        self._torch = torch_module
        self._blocking = blocking
        # Created and recorded once now: the first profiled step would otherwise create hundreds
        # of events on the training thread (measured: a 68 ms step took 103 ms on an H100).
        self._free: list = []
        for _ in range(prewarm):
            ev = torch_module.cuda.Event(enable_timing=True, blocking=blocking)
            ev.record()
            self._free.append(ev)

    def __call__(self) -> CudaMarker:
        ev = self._free.pop() if self._free else self._torch.cuda.Event(enable_timing=True, blocking=self._blocking)
        return CudaMarker(ev)

    def release(self, markers) -> None:
        if len(self._free) < 4096:
            self._free.extend(m.event for m in markers if isinstance(m, CudaMarker))


def make_real_marker_factory():
    """CUDA events when torch sees a GPU, host markers otherwise."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is present wherever training runs
        return HostMarker
    if torch.cuda.is_available():
        return CudaMarkerPool(torch)
    return HostMarker


class Device(abc.ABC):
    """A GPU whose clocks kdvfs reads and (where allowed) sets.

    Implementations map their backend's errors to :mod:`kdvfs_plugins.errors` in one place.
    """

    kind: str = "abstract"
    #: Capabilities that code asks for (never the kind string): a model, not a GPU (figures from it
    #: are model predictions); readings answered on a virtual timeline (``timeline_s``,
    #: ``power_mw_at``, ``energy_mj_at``) rather than by polling in host time.
    simulated: bool = False
    virtual_timeline: bool = False
    #: Which reading ``power_mw`` gives: ``instant`` (NVML's 100 ms field) or ``usage`` (the ~1 s average).
    power_source: str = "usage"

    @abc.abstractmethod
    def info(self) -> DeviceInfo: ...

    @property
    def clock_table(self) -> ClockTable:
        return self.info().clocks

    @property
    def can_write_clocks(self) -> bool:
        return self.info().can_write_clocks

    @abc.abstractmethod
    def current_clocks(self) -> ClockPair:
        """The clocks the device runs at now (a reading, not a setting)."""

    @abc.abstractmethod
    def set_clocks(self, clocks: ClockPair, marker: Optional[Marker] = None) -> None:
        """Lock the SM and memory clocks. ``marker`` is the boundary the change belongs to."""

    @abc.abstractmethod
    def reset_clocks(self, marker: Optional[Marker] = None) -> None:
        """Remove kdvfs's locks: the driver picks clocks again."""

    @abc.abstractmethod
    def energy_mj(self) -> int:
        """The device's energy counter (mJ). Slow on real GPUs: never call on the training thread."""

    @abc.abstractmethod
    def power_mw(self) -> int:
        """Current power reading in mW (fast)."""

    @abc.abstractmethod
    def marker(self) -> Marker:
        """Record a marker on the current stream."""

    def release_markers(self, markers) -> None:
        """Markers the meter has finished with; their events may be reused."""
        release = getattr(getattr(self, "_marker_factory", None), "release", None)
        if release is not None:
            release(markers)

    def close(self) -> None:
        """Release backend resources (not the clocks: the guard restores those)."""
