"""Region GPU times from markers, and device energy attributed to steps and windows.

Times: each boundary's marker opens a stretch that belongs to the innermost open region, so the
regions' exclusive times add up to the step's GPU time. Steps are resolved once the GPU has
reached their end marker (no synchronisation of the training thread).

Energy: the counter refreshes every 100 ms and a read costs about 4 ms on an H100, so power
readings are integrated, anchored to occasional counter reads on a background thread (see
:class:`EnergySampler`), and step and window boundaries are placed on that series by the host
time at which the GPU reached them. A simulated device lives on a virtual timeline: the same
sampler reads it there (:class:`VirtualEnergySampler`), at the instants a polling thread would
have, so a simulated run's energy is read exactly the way a real one's is.
"""
from __future__ import annotations

import bisect
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Callable, Optional

from .devices.base import Marker
from .events import StepRecord, WindowRecord


class EnergySeries:
    """(time, counter) points at which the energy counter changed; linear in between."""

    def __init__(self) -> None:
        self.t_s: list[float] = []
        self.energy_mj: list[float] = []
        self._lock = threading.Lock()

    def add(self, t_s: float, energy_mj: float) -> None:
        with self._lock:
            if self.energy_mj and energy_mj == self.energy_mj[-1]:
                return
            if self.t_s and t_s <= self.t_s[-1]:
                return
            self.t_s.append(t_s)
            self.energy_mj.append(energy_mj)

    def at(self, t_s: float) -> Optional[float]:
        with self._lock:
            if not self.t_s or t_s < self.t_s[0] or t_s > self.t_s[-1]:
                return None
            i = bisect.bisect_left(self.t_s, t_s)
            if self.t_s[i] == t_s or i == 0:
                return self.energy_mj[i]
            t0, t1 = self.t_s[i - 1], self.t_s[i]
            e0, e1 = self.energy_mj[i - 1], self.energy_mj[i]
            return e0 + (e1 - e0) * (t_s - t0) / (t1 - t0)

    def trim_before(self, t_s: float) -> None:
        with self._lock:
            i = max(0, bisect.bisect_left(self.t_s, t_s) - 1)
            del self.t_s[:i]
            del self.energy_mj[:i]


class EnergySampler:
    """Builds the energy series from cheap power readings, anchored to the counter on its own thread.

    Measured on an H100: a read of the energy counter takes about 4 ms and holds up the training
    process's CUDA calls meanwhile (reading it every 100 ms cost DeepSpeed 2% of its step time).
    A power reading costs about 2 µs and refreshes as often (100 ms). So power is read every
    ``power_period_s`` and integrated, and the counter is read only every ``counter_period_s``:
    the integral is scaled by the counter's increase over the integral's since the first read,
    which keeps the counter's accuracy over long runs at a small fraction of its cost.

    Where power is read (``power_on_steps``): on this thread (the default), or on the training
    thread at step ends. A thread that wakes every 100 ms takes the GIL from a training loop
    that holds it (a loop the CPU paces) twice per reading, and the loop waits to get it back;
    at step ends the 2 µs reading needs no hand-over. This thread then wakes only for the
    counter, and reads power itself only when steps stop coming (evaluation, a checkpoint).
    """

    def __init__(self, device, series: EnergySeries, power_period_s: float = 0.1, counter_period_s: float = 5.0,
                 power_on_steps: bool = False):
        self.device = device
        self.series = series
        self.power_period_s = power_period_s
        self.counter_period_s = counter_period_s
        self.power_on_steps = power_on_steps
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kdvfs-energy", daemon=True)
        self._lock = threading.Lock()  # the integral, when both threads add to it
        self.reads = 0
        self.counter_reads = 0
        #: CPU seconds this thread has used (its share of kdvfs's cost beside the hooks' host time).
        self.cpu_time_s = 0.0
        self._last_t: Optional[float] = None  # None until the thread has read the counter once
        self._last_w: Optional[float] = None
        self._total_int_mj = 0.0
        self._base_mj = 0.0
        self._scale = 1.0
        self._no_power = False

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5.0)

    def _counter(self) -> Optional[float]:
        if self.counter_period_s <= 0:
            return None
        try:
            value = float(self.device.energy_mj())
        except Exception:
            return None
        self.counter_reads += 1
        return value

    def _read_power(self) -> bool:
        """Add one power reading to the integral; False: this device gives none."""
        t = time.perf_counter()
        try:
            w = self.device.power_mw() / 1e3
        except Exception:
            self._no_power = True  # windows simply carry no energy
            return False
        self._integrate(t, w)
        return True

    def _integrate(self, t: float, w: float) -> None:
        """Add a reading of ``w`` watts taken at ``t`` (trapezoids between readings, scaled by the anchor)."""
        with self._lock:
            if self._last_t is None or t <= self._last_t:
                return
            inc_mj = (w if self._last_w is None else 0.5 * (w + self._last_w)) * (t - self._last_t) * 1e3
            self._last_t, self._last_w = t, w
            self._total_int_mj += inc_mj
            self._base_mj += inc_mj * self._scale
            self.reads += 1
            self.series.add(t, self._base_mj)

    def read_power_now(self) -> None:
        """A reading now, on the calling thread (the end of training, when no step end follows)."""
        if self._last_t is not None and not self._no_power:
            self._read_power()

    def on_step_end(self) -> None:
        """On the training thread at each step end: a power reading, when one is due."""
        last = self._last_t
        if last is not None and time.perf_counter() - last >= self.power_period_s:
            self.read_power_now()

    def _run(self) -> None:
        start_t = time.perf_counter()
        start_mj = self._counter()
        # The counter is read at unknown offsets from its 100 ms refreshes, so one reading is stale
        # by up to 100 ms: a scale taken between two reads 5 s apart would be off by up to 2%. The
        # scale is taken over everything since the first read instead, where that error fades.
        with self._lock:
            self._base_mj = start_mj or 0.0
            self._last_t = start_t
            self.series.add(start_t, self._base_mj)
        # With power read at step ends this thread only anchors, and stands in when steps stop.
        wake_s = (self.counter_period_s or 1.0) if self.power_on_steps else self.power_period_s
        try:
            self._loop(start_mj, start_t, wake_s)
        finally:
            # also at the end: a session shorter than one wake (power read at step ends, the
            # thread asleep for the counter's period) would otherwise report none of its time
            self.cpu_time_s = time.thread_time()

    def _loop(self, start_mj: Optional[float], start_t: float, wake_s: float) -> None:
        next_anchor_t = start_t + self.counter_period_s
        while not self._stop.wait(wake_s):
            t = time.perf_counter()
            if not self.power_on_steps or t - (self._last_t or 0.0) >= wake_s:
                if not self._read_power():
                    return
            if start_mj is not None and self.counter_period_s > 0 and t >= next_anchor_t:
                next_anchor_t = t + self.counter_period_s
                counter = self._counter()
                with self._lock:
                    if counter is not None and self._total_int_mj > 0 and counter > start_mj:
                        self._scale = (counter - start_mj) / self._total_int_mj
            self.cpu_time_s = time.thread_time()


class VirtualEnergySampler(EnergySampler):
    """The :class:`EnergySampler` on a device's virtual timeline: no thread; the meter asks it to
    catch up with the timeline after each step, and it reads power every ``power_period_s`` and
    the counter every ``counter_period_s`` of virtual time, as the thread would have at those
    instants (the device answers readings at past instants of its timeline)."""

    def __init__(self, device, series: EnergySeries, power_period_s: float = 0.1, counter_period_s: float = 5.0):
        # readings are taken at step ends (catching up with the timeline), never by a thread
        super().__init__(device, series, power_period_s, counter_period_s, power_on_steps=True)
        self._start_mj: Optional[float] = None
        self._next_power_s: Optional[float] = None
        self._next_anchor_s = 0.0

    def start(self) -> None:
        t = self.device.timeline_s()
        self._start_mj = float(self.device.energy_mj_at(t)) if self.counter_period_s > 0 else 0.0
        self.counter_reads += 1
        self._base_mj = self._start_mj
        self._last_t = t
        self._next_power_s = t + self.power_period_s
        self._next_anchor_s = t + self.counter_period_s
        self.series.add(t, self._base_mj)

    def stop(self) -> None:
        return None

    def catch_up(self) -> None:
        if self._next_power_s is None:
            return
        now = self.device.timeline_s()
        while self._next_power_s <= now:
            t = self._next_power_s
            self._integrate(t, self.device.power_mw_at(t) / 1e3)
            if self.counter_period_s > 0 and t >= self._next_anchor_s:
                self._next_anchor_s = t + self.counter_period_s
                counter = float(self.device.energy_mj_at(t))
                self.counter_reads += 1
                if self._total_int_mj > 0 and counter > self._start_mj:
                    self._scale = (counter - self._start_mj) / self._total_int_mj
            self._next_power_s = t + self.power_period_s

    def read_power_now(self) -> None:
        """Catch up, then one reading at the timeline's present (the end of training)."""
        self.catch_up()
        if self._last_t is not None:
            now = self.device.timeline_s()
            self._integrate(now, self.device.power_mw_at(now) / 1e3)

    def on_step_end(self) -> None:
        self.catch_up()


MAX_KEPT_STEPS = 20_000
#: Energy windows kept (the latest); the totals over every window are kept as running sums.
MAX_KEPT_WINDOWS = 20_000


@dataclass
class _Step:
    step: int
    marks: list = field(default_factory=list)  # (Marker, region active from here on)
    end: Optional[Marker] = None
    t_begin_s: Optional[float] = None
    t_end_s: Optional[float] = None
    clock_changes: int = 0
    record: Optional[StepRecord] = None
    profiled: bool = True
    #: module boundaries were marked too (the region table counts only such steps)
    detailed: bool = True
    #: the actuator's worker dates the begin / end marker; otherwise an anchor does (see Meter)
    begin_stamped: bool = True
    end_stamped: bool = True


class Meter:
    """Collects markers per step; resolves times and energy when the GPU has caught up."""

    def __init__(self, device, *, window_steps: int = 10,
                 on_step: Optional[Callable[[StepRecord], None]] = None,
                 on_window: Optional[Callable[[WindowRecord], None]] = None,
                 sample_energy_in_background: Optional[bool] = None, energy_period_s: float = 0.1,
                 counter_period_s: float = 5.0, power_on_steps: bool = False):
        self.device = device
        self.window_steps = window_steps
        self.on_step = on_step
        self.on_window = on_window
        self.series = EnergySeries()
        background = True if sample_energy_in_background is None else sample_energy_in_background
        if not (background and energy_period_s > 0):
            self.sampler = None
        elif getattr(device, "virtual_timeline", False):
            self.sampler = VirtualEnergySampler(device, self.series, energy_period_s, counter_period_s)
        else:
            self.sampler = EnergySampler(device, self.series, energy_period_s, counter_period_s, power_on_steps)
        self._open: Optional[_Step] = None
        self._pending: deque[_Step] = deque()
        self._window: list[_Step] = []
        self._lock = threading.Lock()
        #: The latest steps (bounded: a long run must not grow without limit); the region table
        #: keeps running totals over every profiled step.
        self.steps: deque[StepRecord] = deque(maxlen=MAX_KEPT_STEPS)
        self.steps_seen = 0
        self.windows: deque[WindowRecord] = deque(maxlen=MAX_KEPT_WINDOWS)
        #: Over every window since the start (the deque keeps only the latest).
        self.energy_j_total = 0.0
        self.energy_steps_total = 0
        self.energy_duration_s_total = 0.0
        self.region_totals_ms: dict[str, float] = defaultdict(float)
        self.region_steps = 0
        #: Steps before this one are left out of the region table (allocator and autotuning warm-up).
        self.warmup_steps = 0
        self.profiled_steps_seen = 0
        #: ((step, 0 begin / 1 end), marker, host time reached): step markers the worker dated
        self._anchors: deque = deque(maxlen=8)

    def start(self) -> None:
        if self.sampler is not None:
            self.sampler.start()

    def stop(self) -> None:
        if self.sampler is not None:
            self.sampler.stop()

    # ------------------------------------------------------------------ training thread
    def step_begin(self, step: int, marker: Marker, region: str, profiled: bool = True,
                   detailed: bool = True) -> _Step:
        self._open = _Step(step, [(marker, region)], profiled=profiled, detailed=profiled and detailed)
        return self._open

    def boundary(self, marker: Marker, region: str) -> None:
        if self._open is not None:
            self._open.marks.append((marker, region))

    def count_change(self) -> None:
        if self._open is not None:
            self._open.clock_changes += 1

    def step_end(self, marker: Marker) -> Optional[_Step]:
        st, self._open = self._open, None
        if st is None:
            return None
        st.end = marker
        with self._lock:
            self._pending.append(st)
        if self.sampler is not None and self.sampler.power_on_steps:
            self.sampler.on_step_end()  # before the poll: a window that ends now finds a reading after it
        return st

    # ------------------------------------------------------------------ any thread
    def reached(self, st: _Step, which: str, host_time_s: float, marker: Marker) -> None:
        """A step's begin or end marker was reached (called by the actuator's worker)."""
        t = marker.gpu_time_s()
        if t is None:
            t = host_time_s
        if which == "begin":
            st.t_begin_s = t
        else:
            st.t_end_s = t
        if marker.dated_by_anchor:
            with self._lock:
                self._anchors.append(((st.step, 0 if which == "begin" else 1), marker, t))

    def _anchored_s(self, key: tuple[int, int], marker: Marker) -> Optional[float]:
        """Host time at which the GPU reached ``marker``, from the latest anchor not after it."""
        with self._lock:
            if not self._anchors:
                return None  # the first step's stamp is on its way
            anchor = next((a for a in reversed(self._anchors) if a[0] <= key), None)
        if anchor is None:
            # Older than every anchor kept (a step left pending far behind): the GPU reached it by
            # now, which is late by at most the time since the last poll. Waiting would stall.
            return time.perf_counter()
        _, a_marker, a_s = anchor
        return a_s if a_marker is marker else a_s + a_marker.elapsed_ms(marker) / 1e3

    def _date(self, st: _Step) -> bool:
        """Fill in the host times of the step's markers that no thread waited on; False: no anchor yet."""
        if st.t_begin_s is None and not st.begin_stamped:
            st.t_begin_s = self._anchored_s((st.step, 0), st.marks[0][0])
        if st.t_end_s is None and not st.end_stamped:
            st.t_end_s = self._anchored_s((st.step, 1), st.end)
        return st.t_begin_s is not None and st.t_end_s is not None

    def poll(self, wait: bool = False) -> list[StepRecord]:
        """Resolve finished steps (and windows) whose markers the GPU has reached."""
        done = []
        while True:
            with self._lock:
                if not self._pending:
                    break
                st = self._pending[0]
                # A stamped time is set by the actuator's worker once it has handled every earlier
                # job, so no queued clock change still waits on a marker about to be reused (a step
                # with clock changes always has its end stamped).
                if not wait and ((st.end_stamped and st.t_end_s is None)
                                 or (st.begin_stamped and st.t_begin_s is None) or not st.end.query()):
                    break
            if wait:
                st.end.wait()
                self._date(st)
            elif not self._date(st):
                break  # the anchor before it is not reached yet
            with self._lock:  # only this thread takes steps off the queue
                self._pending.popleft()
            done.append(self._resolve(st))
        self._close_windows(final=False)
        return done

    def _resolve(self, st: _Step) -> StepRecord:
        region_ms: dict[str, float] = defaultdict(float)
        marks = st.marks + [(st.end, None)]
        for (m0, region), (m1, _) in zip(marks, marks[1:]):
            region_ms[region] += m0.elapsed_ms(m1)
        rec = StepRecord(st.step, sum(region_ms.values()), dict(region_ms) if st.profiled else {}, st.clock_changes)
        # the begin and end markers stay with the step (energy stamps); the rest can be reused
        self.device.release_markers([m for m, _ in st.marks[1:]])
        st.marks = st.marks[:1]
        st.record = rec
        if st.detailed and st.step >= self.warmup_steps:
            self.profiled_steps_seen += 1
            # The first profiled step installs the module hooks; measured on an H100 it ran 88 ms
            # where the steps around it ran 68, so it stays out of the table when others follow.
            if self.profiled_steps_seen == 2:
                self.region_totals_ms.clear()
                self.region_steps = 0
            for k, v in region_ms.items():
                self.region_totals_ms[k] += v
            self.region_steps += 1
        self.steps.append(rec)
        self.steps_seen += 1
        self._window.append(st)
        if self.on_step is not None:
            self.on_step(rec)
        return rec

    def _energy_between(self, t0: Optional[float], t1: Optional[float]) -> Optional[float]:
        if t0 is None or t1 is None:
            return None
        e0, e1 = self.series.at(t0), self.series.at(t1)
        if e0 is None or e1 is None:
            return None
        return (e1 - e0) / 1e3

    def _close_windows(self, final: bool) -> None:
        while len(self._window) >= self.window_steps or (final and self._window):
            chunk = self._window[: self.window_steps]
            first, last = chunk[0], chunk[-1]
            energy = self._energy_between(first.t_begin_s, last.t_end_s)
            if energy is None and not final:
                return  # the counter has not passed the window's end yet
            self._window = self._window[len(chunk):]
            if energy is None or first.t_begin_s is None or last.t_end_s is None:
                continue
            win = WindowRecord(first.step, last.step, energy, last.t_end_s - first.t_begin_s,
                               sum(s.record.gpu_time_ms for s in chunk) / len(chunk))
            self.windows.append(win)
            self.energy_j_total += win.energy_j
            self.energy_steps_total += win.steps
            self.energy_duration_s_total += win.duration_s
            if self.on_window is not None:
                self.on_window(win)
            self.series.trim_before(first.t_begin_s)

    def finish(self) -> None:
        """Resolve everything left (end of training: waiting is allowed now)."""
        self.poll(wait=True)
        if self.sampler is not None:
            if self.sampler.power_on_steps:
                self.sampler.read_power_now()  # no step end follows the last: its window needs a reading after it
            # a thread's readings may still come in; a virtual timeline has none to wait for
            deadline = time.perf_counter() + (0.0 if isinstance(self.sampler, VirtualEnergySampler) else 0.3)
            while self._window and time.perf_counter() < deadline:
                self._close_windows(final=False)
                if self._window:
                    time.sleep(0.05)
        self._close_windows(final=True)

    def region_table(self) -> list[tuple[str, float, float]]:
        """(region, mean GPU ms per step, share of step) over the profiled steps after warm-up."""
        n = max(1, self.region_steps)
        total = sum(self.region_totals_ms.values()) or 1.0
        rows = [(r, v / n, v / total) for r, v in self.region_totals_ms.items()]
        return sorted(rows, key=lambda r: -r[1])
