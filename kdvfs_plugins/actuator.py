"""Applies clock changes when the GPU, not the CPU, reaches a region boundary.

The training thread only records a marker and queues a job (no NVML call, no synchronisation).
One worker thread waits on each job's marker (``Event.synchronize`` releases the GIL) and then
calls the device. Changes that match the clocks already requested are dropped before they are
queued; a change that is overtaken by a later one already reached is skipped; and changes are
at least ``min_interval_s`` of GPU time apart.

Markers that are reached when recorded (host and virtual markers) are applied inline: there is
nothing to wait for, and the virtual timeline needs the change before the next work is costed.
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional

from .clocks import ClockPair
from .devices.base import HostMarker, Marker
from .devices.observe import observe_instead
from .errors import DeviceError, NoPermissionError
from .events import ClockChange
from .log import logger

_UNSET = object()


@dataclass
class _Job:
    marker: Marker
    clocks: object  # ClockPair, None (reset to default) or _UNSET for a stamp
    region: str
    step: int
    on_reached: Optional[Callable[[float], None]] = None


class Actuator:
    def __init__(self, device, guard=None, *, min_interval_s: float = 0.001,
                 on_applied: Optional[Callable[[ClockChange], None]] = None,
                 on_device_changed: Optional[Callable[[object], None]] = None):
        self.device = device
        self.guard = guard
        self.min_interval_s = min_interval_s
        self.on_applied = on_applied
        self.on_device_changed = on_device_changed
        self._requested: Optional[ClockPair] = None  # what the last queued change asks for
        self._applied: Optional[ClockPair] = None
        self._last_apply_s: Optional[float] = None
        self._last_apply_gpu_s: Optional[float] = None
        self._queue: "queue.Queue[Optional[_Job]]" = queue.Queue()
        self._thread: Optional[threading.Thread] = None
        self._lock = threading.Lock()
        self.changes_applied = 0
        self.changes_skipped = 0
        self.errors: list[str] = []

    # ------------------------------------------------------------------ training thread
    @property
    def requested(self) -> Optional[ClockPair]:
        return self._requested

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="kdvfs-actuator", daemon=True)
            self._thread.start()

    def submit(self, marker: Marker, clocks: Optional[ClockPair], region: str, step: int) -> bool:
        """Ask for ``clocks`` from ``marker`` on. Returns False if it matches what is in force."""
        if clocks == self._requested:
            return False
        self._requested = clocks
        self._dispatch(_Job(marker, clocks, region, step))
        return True

    def stamp(self, marker: Marker, on_reached: Callable[[float], None]) -> None:
        """Call ``on_reached(host_time_s)`` when the GPU reaches ``marker`` (for energy windows)."""
        self._dispatch(_Job(marker, _UNSET, "", -1, on_reached))

    def _dispatch(self, job: _Job) -> None:
        if getattr(job.marker, "reached_on_record", False) or isinstance(job.marker, HostMarker):
            self._handle(job, inline=True)
        else:
            self.start()
            self._queue.put(job)

    def flush(self, timeout_s: float = 30.0) -> None:
        """Wait until every queued job has been handled (end of training, not per step)."""
        if self._thread is None:
            return
        done = threading.Event()
        self._queue.put(_Job(HostMarker(), _UNSET, "", -1, lambda _t: done.set()))
        done.wait(timeout_s)

    def stop(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=30.0)
            self._thread = None

    # ------------------------------------------------------------------ worker thread
    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            try:
                job.marker.wait()
                self._handle(job, inline=False)
            except Exception as exc:  # the worker must outlive any one bad job
                self._note_error(f"{type(exc).__name__}: {exc}")

    def _superseded(self) -> bool:
        """A later change is queued and the GPU has already passed its boundary."""
        with self._queue.mutex:
            for later in self._queue.queue:
                if later is not None and later.clocks is not _UNSET:
                    return later.marker.query()
        return False

    def _handle(self, job: _Job, inline: bool) -> None:
        reached_s = time.perf_counter()
        if job.clocks is _UNSET:
            if job.on_reached is not None:
                job.on_reached(reached_s)
            return
        if not inline and self._superseded():
            self.changes_skipped += 1
            return
        self._respect_floor(job)
        clocks: Optional[ClockPair] = job.clocks  # type: ignore[assignment]
        previous = self._applied
        written = self._apply(clocks, job.marker)
        self._applied = clocks
        self.changes_applied += 1
        if self.on_applied is not None:
            self.on_applied(ClockChange(job.region, job.step, clocks, previous, reached_s, time.perf_counter(), written))

    def _respect_floor(self, job: _Job) -> None:
        gpu_t = job.marker.gpu_time_s()
        if gpu_t is not None:
            if self._last_apply_gpu_s is not None and gpu_t - self._last_apply_gpu_s < self.min_interval_s:
                from .devices.simulated import VirtualMarker

                job.marker = VirtualMarker(self._last_apply_gpu_s + self.min_interval_s)
            self._last_apply_gpu_s = job.marker.gpu_time_s()
            return
        now = time.perf_counter()
        if self._last_apply_s is not None:
            wait = self.min_interval_s - (now - self._last_apply_s)
            if wait > 0:
                time.sleep(wait)
        self._last_apply_s = time.perf_counter()

    def _apply(self, clocks: Optional[ClockPair], marker: Marker) -> bool:
        def change():
            if clocks is None:
                self.device.reset_clocks(marker)
            else:
                self.device.set_clocks(clocks, marker)

        try:
            if self.guard is not None and self.device.kind == "nvml":
                return self.guard.write(change)
            change()
            return self.device.kind != "observe"
        except NoPermissionError as exc:
            self._fall_back_to_observe(exc)
            change()
            return False
        except DeviceError as exc:
            self._note_error(str(exc))
            return False

    def _fall_back_to_observe(self, exc: Exception) -> None:
        logger.warning("%s Falling back to observe: training goes on, clocks are measured, not set.", exc)
        self.device = observe_instead(self.device)
        if self.on_device_changed is not None:
            self.on_device_changed(self.device)

    def _note_error(self, msg: str) -> None:
        with self._lock:
            first = not self.errors
            if len(self.errors) < 100:
                self.errors.append(msg)
        if first:
            logger.warning("clock change failed: %s (further failures are counted, not printed)", msg)
