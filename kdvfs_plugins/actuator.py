"""Applies clock changes when the GPU, not the CPU, reaches a region boundary.

The training thread only records a marker and queues a job (no NVML call, no synchronisation).
One worker thread waits on each job's marker (``Event.synchronize`` releases the GIL) and then
calls the device. Changes that match the clocks already requested are dropped before they are
queued; a change that is overtaken by a later one already reached is skipped; and changes are
at least ``min_interval_s`` of GPU time apart.

Markers that are reached when recorded (host and virtual markers) are applied inline: there is
nothing to wait for, and the virtual timeline needs the change before the next work is costed.

Issue ahead (``lead_s`` > 0, normally the switch latency). A change lands ``latency`` after it is
written, so a change written when the GPU reaches its boundary runs the first ``latency`` of the
next region at the old clocks. Training steps repeat, so the boundary's time is predictable: the
actuator keeps, per step cycle, when the GPU reached each of its markers, and predicts a queued
change's boundary from the last cycle with the same sequence of markers (re-anchored at the latest
marker reached, so errors do not add up over the step). The change is then written ``lead_s``
before the predicted boundary, never later than the boundary itself and never closer than the
floor to the previous change. Without a prediction (the first cycles, a changed sequence) or when
the last two cycles disagree by more than the tolerance (timing unstable), it falls back to
writing at the boundary. A cycle starts with the first change of each training step; stamps (the
meter's step markers) are anchors too.
"""
from __future__ import annotations

import queue
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Optional

from .clocks import ClockPair
from .devices.base import HostMarker, Marker
from .devices.observe import observe_instead
from .errors import DeviceError, NoPermissionError
from .events import ClockChange
from .log import logger

_UNSET = object()
#: Worker poll period while a change is due ahead of its marker (the marker cannot wake it then).
POLL_S = 1e-4
#: Two cycles agree (the prediction is stable) when every marker's offset differs by at most this
#: share of the lead, or by ``MIN_TOLERANCE_S``: an early landing by that much is what it may cost.
TOLERANCE_OF_LEAD = 0.25
MIN_TOLERANCE_S = 2e-4
#: Cycles of marker times kept for the prediction.
_KEEP_CYCLES = 4
#: Markers in one cycle at most. A cycle starts at a step's first change; in a run whose clocks
#: stop changing (observe mode, a fixed plan) the step stamps would otherwise grow one cycle forever.
MAX_CYCLE_MARKERS = 4096


@dataclass
class _Job:
    marker: Marker
    clocks: object  # ClockPair, None (reset to default) or _UNSET for a stamp
    region: str
    step: int
    on_reached: Optional[Callable[[float], None]] = None
    #: (cycle, position in the cycle) for the boundary prediction; None: not predicted (flush)
    slot: Optional[tuple[int, int]] = None
    #: written ahead of the marker already (the marker is still awaited, for the timeline)
    applied_ahead: bool = False


class BoundaryPredictor:
    """Predicts when the GPU reaches a marker from the previous step cycles' marker times.

    ``slot(label, step, is_change)`` numbers markers in dispatch order (a new cycle at the first
    change of each step); ``reached(slot, t_s)`` records when the GPU got there (any one clock:
    host seconds, or GPU-timeline seconds); ``predict(slot)`` answers the predicted time or None
    (no earlier cycle with the same marker sequence, or the last two disagree by more than
    ``tolerance_s``). Thread-safe: slots are taken on the training thread, the rest on the worker.
    """

    def __init__(self, tolerance_s: float):
        self.tolerance_s = tolerance_s
        self._lock = threading.Lock()
        self._cycle = -1
        self._cycle_step: Optional[int] = None
        self._labels: dict[int, list] = {}
        self._times: dict[int, dict[int, float]] = {}
        self._last: Optional[tuple[int, int, float]] = None  # latest reached (cycle, pos, t)

    def slot(self, label: str, step: int, is_change: bool) -> tuple[int, int]:
        with self._lock:
            if self._cycle < 0 or (is_change and step != self._cycle_step) \
                    or len(self._labels[self._cycle]) >= MAX_CYCLE_MARKERS:
                self._cycle += 1
                self._cycle_step = step
                self._labels[self._cycle] = []
                self._times[self._cycle] = {}
                for old in [c for c in self._labels if c < self._cycle - _KEEP_CYCLES]:
                    del self._labels[old], self._times[old]
            self._labels[self._cycle].append(label)
            return self._cycle, len(self._labels[self._cycle]) - 1

    def reached(self, slot: tuple[int, int], t_s: float) -> None:
        with self._lock:
            c, i = slot
            if c in self._times:
                self._times[c][i] = t_s
            if self._last is None or (c, i) >= self._last[:2]:
                self._last = (c, i, t_s)

    def _complete(self, c: int) -> Optional[tuple[list, list, float]]:
        """(labels, offsets from the cycle's start, period to the next start) of a reached cycle."""
        labels, times, nxt = self._labels.get(c), self._times.get(c), self._times.get(c + 1, {})
        if not labels or times is None or len(times) < len(labels) or 0 not in nxt:
            return None
        t0 = times[0]
        return labels, [times[i] - t0 for i in range(len(labels))], nxt[0] - t0

    def predict(self, slot: tuple[int, int]) -> Optional[float]:
        with self._lock:
            c, i = slot
            if self._last is None:
                return None
            a, k, t_a = self._last
            if (a, k) >= (c, i):
                return None  # already reached
            # the template: the latest cycle fully reached, with its successor's start
            m = a if self._complete(a) is not None else a - 1
            tmpl, prev = self._complete(m), self._complete(m - 1)
            if tmpl is None or prev is None:
                return None
            labels, off, period = tmpl
            p_labels, p_off, p_period = prev
            if p_labels != labels or abs(p_period - period) > self.tolerance_s or \
                    max(abs(x - y) for x, y in zip(off, p_off)) > self.tolerance_s:
                return None  # timing not stable: at the boundary
            for cyc in range(m + 1, c + 1):  # the cycles between must follow the same sequence
                seen = self._labels.get(cyc, [])
                if seen != labels[:len(seen)]:
                    return None
            if i >= len(labels) or k >= len(labels):
                return None
            return t_a + (c - a) * period + off[i] - off[k]


class Actuator:
    def __init__(self, device, guard=None, *, min_interval_s: float = 0.001,
                 on_applied: Optional[Callable[[ClockChange], None]] = None,
                 on_device_changed: Optional[Callable[[object], None]] = None,
                 lead_s: float = 0.0):
        self.device = device
        #: issue changes this long before their predicted boundary (0: at the boundary)
        self.lead_s = max(0.0, float(lead_s))
        self.predictor = BoundaryPredictor(max(MIN_TOLERANCE_S, TOLERANCE_OF_LEAD * self.lead_s))
        self.changes_ahead = 0
        self._pending: deque = deque()  # the worker's jobs taken from the queue, in order
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
        #: CPU seconds the worker thread has used (its share of kdvfs's cost beside the hooks').
        self.worker_cpu_s = 0.0

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
        self._dispatch(_Job(marker, clocks, region, step, slot=self.predictor.slot(region, step, True)))
        return True

    def stamp(self, marker: Marker, on_reached: Callable[[float], None]) -> None:
        """Call ``on_reached(host_time_s)`` when the GPU reaches ``marker`` (for energy windows)."""
        self._dispatch(_Job(marker, _UNSET, "", -1, on_reached, slot=self.predictor.slot("", -1, False)))

    def _dispatch(self, job: _Job) -> None:
        if getattr(job.marker, "reached_on_record", False) or isinstance(job.marker, HostMarker):
            self._inline(job)
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
    def _inline(self, job: _Job) -> None:
        """A marker reached when recorded: on a GPU timeline the change can still be dated ahead."""
        if getattr(job.marker, "dated_later", False) and job.marker.gpu_time_s() is None:
            self._placed_by_device(job)
            return
        gpu_t = job.marker.gpu_time_s()
        if job.clocks is not _UNSET and gpu_t is not None and self.lead_s > 0 and job.slot is not None:
            pred = self.predictor.predict(job.slot)
            if pred is not None:
                from .devices.simulated import VirtualMarker

                # never later than at the boundary itself
                at = min(pred - self.lead_s, gpu_t)
                if at < gpu_t:
                    self.changes_ahead += 1
                job.marker = VirtualMarker(at)
        if job.slot is not None:
            self.predictor.reached(job.slot, time.perf_counter() if gpu_t is None else gpu_t)
        self._handle(job, inline=True)

    def _placed_by_device(self, job: _Job) -> None:
        """A device that dates its markers when the step has run (a trace replay) places the change
        at the marker's boundary itself, issue-ahead included; stamps wait until the date is known."""
        if job.clocks is _UNSET:
            if job.on_reached is not None:
                job.marker.when_dated(job.on_reached)
            return
        self._change(job, time.perf_counter())

    def _run(self) -> None:
        pending: deque = deque()
        self._pending = pending
        stopping = False
        while True:
            if not pending:
                if stopping:
                    return
                job = self._queue.get()
                if job is None:
                    return
                pending.append(job)
            while True:  # take what is queued, without blocking
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stopping = True
                    break
                pending.append(more)
            try:
                self._step_worker(pending)
            except Exception as exc:  # the worker must outlive any one bad job
                pending.popleft()
                self._note_error(f"{type(exc).__name__}: {exc}")
            self.worker_cpu_s = time.thread_time()

    def _due_ahead(self, pending: deque) -> tuple[Optional[float], Optional[_Job]]:
        """The first change not yet written and when to write it ahead (None: at its boundary)."""
        if self.lead_s <= 0:
            return None, None
        for job in pending:
            if job.clocks is _UNSET or job.applied_ahead:
                continue
            if job.slot is None:
                return None, None
            pred = self.predictor.predict(job.slot)
            if pred is None:
                return None, None  # changes stay in order: later ones wait for this one
            at = pred - self.lead_s
            if self._last_apply_s is not None:
                at = max(at, self._last_apply_s + self.min_interval_s)
            return at, job
        return None, None

    def _step_worker(self, pending: deque) -> None:
        head = pending[0]
        at, ahead = self._due_ahead(pending)
        if at is None:
            head.marker.wait()
        elif not head.marker.query():
            now = time.perf_counter()
            if now < at:
                # wake for the marker or the due time, whichever comes first
                time.sleep(min(at - now, POLL_S))
                if not head.marker.query():
                    return
            else:
                self._write_ahead(ahead)
                return
        pending.popleft()
        reached_s = time.perf_counter()
        if head.slot is not None:
            self.predictor.reached(head.slot, reached_s)
        if head.applied_ahead:
            return
        self._handle(head, inline=False)

    def _write_ahead(self, job: _Job) -> None:
        job.applied_ahead = True
        self.changes_ahead += 1
        self._respect_floor(job)
        clocks: Optional[ClockPair] = job.clocks  # type: ignore[assignment]
        previous = self._applied
        t = time.perf_counter()
        written = self._apply(clocks, job.marker)
        self._applied = clocks
        self.changes_applied += 1
        if self.on_applied is not None:
            self.on_applied(ClockChange(job.region, job.step, clocks, previous, t, time.perf_counter(), written))

    def _superseded(self) -> bool:
        """A later change is queued and the GPU has already passed its boundary."""
        for later in list(self._pending):
            if later.clocks is not _UNSET:
                return later.marker.query()
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
        self._change(job, reached_s)

    def _change(self, job: _Job, reached_s: float) -> None:
        """Apply the job's clocks and report the change."""
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
            if self.guard is not None and self.device.can_write_clocks:
                return self.guard.write(change)
            change()
            return self.device.can_write_clocks
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
