"""The simulated devices: virtual H100s on a virtual timeline. Everything they report is a model prediction.

- :class:`SimulatedDevice`: a :class:`~kdvfs_plugins.sim.gpu.VirtualGPU` driven by a work source,
  the ops a (CPU) torch run really executes, costed as H100 work (counted, so the same run gives
  the same figures: never host time). Each marker advances the GPU through the work since the last.
- :class:`TraceDevice`: a :class:`~kdvfs_plugins.sim.stretch.StretchGPU` replaying a kernel trace
  step by step, fast enough for thousands of exploration steps. Its driver tells it which stretch
  of the step the program has reached (:meth:`TraceDevice.at_stretch`); a step runs when its end
  marker is recorded, and the step's markers are dated then.

Both keep the counter and power readings as NVML gives them on an H100 (100 ms instant field,
~1 s power usage), answerable at any instant of their timeline (``power_mw_at``, ``energy_mj_at``)
so that the meter reads them as a polling thread would have (``virtual_timeline``).
"""
from __future__ import annotations

import threading
from typing import Callable, Iterable, Optional

from ..clocks import ClockPair
from ..sim.gpu import VirtualGPU, Work
from .base import Device, DeviceInfo, Marker

WorkSource = Callable[[], Iterable[Work]]


class VirtualMarker(Marker):
    """A point on the virtual timeline; reached as soon as it is recorded."""

    __slots__ = ("t_s",)
    reached_on_record = True
    dated_later = False

    def __init__(self, t_s: Optional[float]):
        self.t_s = t_s

    def query(self) -> bool:
        return True

    def wait(self) -> None:
        return None

    def elapsed_ms(self, later: Marker) -> float:
        return (later.t_s - self.t_s) * 1e3  # type: ignore[attr-defined]

    def gpu_time_s(self) -> Optional[float]:
        return self.t_s


class StretchMarker(VirtualMarker):
    """A boundary of a trace step, dated when the step has run (:class:`TraceDevice`)."""

    __slots__ = ("stretch", "_on_dated")
    dated_later = True

    def __init__(self, stretch: int):
        super().__init__(None)
        self.stretch = stretch
        self._on_dated: Optional[list] = None

    def when_dated(self, callback: Callable[[float], None]) -> None:
        """Call ``callback(t_s)`` once the step has run (at once if it has)."""
        if self.t_s is not None:
            callback(self.t_s)
        else:
            self._on_dated = (self._on_dated or []) + [callback]

    def date(self, t_s: float) -> None:
        self.t_s = t_s
        for cb in self._on_dated or ():
            cb(t_s)
        self._on_dated = None


class CountedOpsWork:
    """Work source: the torch ops the process runs, counted and costed as H100 work (a model).

    The counter (a ``TorchDispatchMode``) is entered on the first call, on the training thread, and
    left by :meth:`close`. Without torch there is no work to count: the GPU idles.
    """

    def __init__(self) -> None:
        self._counter = None
        self._entered = False

    def __call__(self) -> list[Work]:
        if not self._entered:
            self._entered = True
            try:
                from ..sim.torch_ops import OpCounter

                # consecutive ops of one class as one item: the virtual GPU costs them alike, and
                # advancing it per op would cost the hooks' host time milliseconds a step
                self._counter = OpCounter(coalesce=True)
                self._counter.__enter__()
            except ImportError:
                self._counter = None
            return []
        return self._counter.drain() if self._counter is not None else []

    def close(self) -> None:
        if self._counter is not None:
            try:
                self._counter.__exit__(None, None, None)
            except Exception:  # left on another thread or out of order: nothing more to count
                pass
            self._counter = None


class _VirtualReadings:
    """The readings of a virtual card's timeline, shared by both simulated devices."""

    #: the meter reads this device on its virtual timeline (see :class:`~kdvfs_plugins.meter.Meter`)
    virtual_timeline = True
    simulated = True
    #: which power reading ``power_mw`` gives (``kdvfs info`` says): the 100 ms instant field
    power_source = "instant"

    def _readings(self):
        raise NotImplementedError

    def timeline_s(self) -> float:
        raise NotImplementedError

    def energy_mj(self) -> int:
        return self._readings().counter_mj()

    def energy_mj_at(self, t_s: float) -> int:
        return self._readings().counter_mj(t_s)

    def power_mw(self) -> int:
        return int(self._readings().instant_w() * 1000)

    def power_mw_at(self, t_s: float) -> int:
        return int(self._readings().instant_w(t_s) * 1000)


#: GPU idle per marker recorded: a CUDA event's record costs about 12 µs of CPU on an H100, which
#: a loop the CPU paces pays in GPU time (a model assumption: a GPU-bound loop would hide it). So a
#: profiled step, which marks every boundary, costs GPU time as it does on a host-paced GPU.
MARKER_HOST_COST_S = 12e-6


class SimulatedDevice(_VirtualReadings, Device):
    kind = "simulated"

    def __init__(self, index: int = 0, gpu: Optional[VirtualGPU] = None, work_source: Optional[WorkSource] = None,
                 *, noise: bool = True, seed: int = 0, switch_latency_ms: Optional[float] = None):
        self.index = index
        self.gpu = gpu or VirtualGPU(switch_latency_ms=switch_latency_ms, noise=noise, seed=seed + index)
        self.work_source: WorkSource = work_source or CountedOpsWork()
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
        self.gpu.idle(MARKER_HOST_COST_S)
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

    def _readings(self):
        return self.gpu.readings

    def timeline_s(self) -> float:
        return self.gpu.now_s

    def close(self) -> None:
        close = getattr(self.work_source, "close", None)
        if close is not None:
            close()


class TraceDevice(_VirtualReadings, Device):
    """A virtual H100 replaying a kernel trace step by step (see the module docstring).

    The driver calls :meth:`at_stretch` before reporting each boundary to the engine; the step runs
    when a marker is recorded at its end (``at_stretch(len(layout.regions))``). Clock requests are
    placed at the stretch their marker belongs to; issued ahead where the GPU was built so.
    """

    kind = "simulated"

    def __init__(self, gpu, index: int = 0):
        self.index = index
        self.gpu = gpu
        self._cursor = 0
        self._markers: list[StretchMarker] = []
        self._requests: dict[int, Optional[ClockPair]] = {}
        self._carry: dict[int, Optional[ClockPair]] = {}
        #: the last step run (:class:`~kdvfs_plugins.sim.stretch.StepRun`)
        self.last_run = None

    @property
    def switch_latency_ms(self) -> float:
        return self.gpu.switch_latency_s * 1e3

    @property
    def layout(self):
        """The stretches of the step that runs next."""
        return self.gpu.next_layout

    def info(self) -> DeviceInfo:
        return DeviceInfo(kind=self.kind, index=self.index, name=self.gpu.name, uuid=f"SIM-TRACE-{self.index}",
                          driver="simulated", clocks=self.gpu.clock_table, power_limit_w=700.0, can_write_clocks=True)

    def _readings(self):
        return self.gpu.readings

    def timeline_s(self) -> float:
        return self.gpu.now_s

    def at_stretch(self, index: int) -> None:
        """The program has reached the start of stretch ``index`` of the current step."""
        self._cursor = index

    def marker(self) -> Marker:
        n = len(self.gpu.next_layout.regions)
        if self._cursor >= n and not self._markers:
            return VirtualMarker(self.gpu.now_s)  # outside any step: now
        m = StretchMarker(min(self._cursor, n))
        self._markers.append(m)
        if self._cursor >= n:
            self._run_step()
        return m

    def _run_step(self) -> None:
        requests, self._requests = {**self._carry, **self._requests}, {}
        self._carry = {}
        n = len(self.gpu.next_layout.regions)
        for j in [j for j in requests if j >= n]:
            self._carry[0] = requests.pop(j)  # asked for at the step's end: from the next step's start
        run = self.gpu.run_step(requests)
        self.last_run = run
        markers, self._markers = self._markers, []
        self._cursor = 0
        for m in markers:
            m.date(float(run.start_s[m.stretch]) if m.stretch < len(run.start_s) else run.end_s)

    def _request(self, clocks: Optional[ClockPair], marker: Optional[Marker]) -> None:
        stretch = marker.stretch if isinstance(marker, StretchMarker) and marker.t_s is None else self._cursor
        self._requests[stretch] = clocks

    def current_clocks(self) -> ClockPair:
        return self.gpu.clocks or ClockPair(int(round(self.gpu.last_sm_mhz)), max(self.gpu.clock_table.mem_mhz))

    def set_clocks(self, clocks: ClockPair, marker: Optional[Marker] = None) -> None:
        self.gpu.clock_table.check(clocks)
        self._request(clocks, marker)

    def reset_clocks(self, marker: Optional[Marker] = None) -> None:
        self._request(None, marker)
