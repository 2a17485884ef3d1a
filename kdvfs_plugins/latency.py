"""Clock switch latency: measured LATEST-style, stored with the device, used by the planner.

Method (after LATEST): run a tiny compute-bound kernel back to back; its duration reveals the SM
clock it ran at. Lock clock A, let it settle, request clock B and keep timing probes. The *switch
latency* is the time from the request to the first probe that runs entirely at B's duration; the
*transition latency* is the time from the first probe that differs from A's duration to that
probe (how long the clock is in between). Each pair is measured ``repeats`` times, both
directions; the median is stored. Resolution: one probe (tens of microseconds).

API
---
``LatencyResult(device_name, driver, switch_latency_ms, transition_latency_ms, samples_ms,
probe_us, method)``, ``measure_simulated(gpu=None, *, pairs=None, repeats=5) -> LatencyResult``,
``measure_nvml(device, *, pairs=None, repeats=5) -> LatencyResult`` (needs clock writes and a CUDA
probe; refuses with :class:`~kdvfs_plugins.errors.NoPermissionError` otherwise),
``store(result, state_dir=None) -> Path``, ``load(device_name, driver, state_dir=None)``,
``switch_latency_for(device_name, driver, config=None, state_dir=None) -> float`` (ms: the config's
``switch_latency_ms`` if set, else the stored measurement, else the published default).
"""
from __future__ import annotations

import json
import re
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from .clocks import ClockPair
from .errors import NoPermissionError, NotSupportedError

from .switching import DEFAULT_SWITCH_LATENCY_MS, resolve_switch_latency_ms  # noqa: F401  (one home)
#: Probe length at the top clock. Short enough for fine resolution, long enough to time reliably.
PROBE_S = 20e-6
#: A probe "runs at clock X" when its duration is within this fraction of X's duration: wide
#: enough for kernel-to-kernel jitter, far below the gap between the two clocks (1200 vs 800 MHz).
MATCH_RTOL = 0.05


@dataclass(frozen=True)
class LatencyResult:
    device_name: str
    driver: str
    switch_latency_ms: float
    transition_latency_ms: float
    samples_ms: tuple[float, ...] = ()
    probe_us: float = PROBE_S * 1e6
    method: str = "LATEST-style probe kernel timing"
    model_prediction: bool = False

    def to_dict(self) -> dict:
        d = asdict(self)
        d["samples_ms"] = list(self.samples_ms)
        return d


def _default_pairs(table) -> list[tuple[ClockPair, ClockPair]]:
    # Both clocks well below where any kernel meets the power cap, so that the power controller
    # never moves the probe's clock and its duration shows the lock alone.
    mem = max(table.mem_mhz)
    hi = min(table.sm_mhz, key=lambda f: abs(f - 1200))
    lo = min(table.sm_mhz, key=lambda f: abs(f - 800))
    return [(ClockPair(hi, mem), ClockPair(lo, mem)), (ClockPair(lo, mem), ClockPair(hi, mem))]


def _detect(durations: Sequence[float], starts: Sequence[float], t_req: float, d_a: float, d_b: float
            ) -> Optional[tuple[float, float]]:
    """(switch, transition) in seconds from probe timings after a request at ``t_req``."""
    first_off = None
    for d, s in zip(durations, starts):
        if first_off is None and abs(d - d_a) > MATCH_RTOL * d_a:
            first_off = s
        if abs(d - d_b) <= MATCH_RTOL * d_b:
            return s - t_req, (s - first_off) if first_off is not None else 0.0
    return None


def measure_simulated(gpu=None, *, pairs: Optional[Sequence[tuple[ClockPair, ClockPair]]] = None,
                      repeats: int = 5, max_wait_s: float = 1.0) -> LatencyResult:
    """Measure a :class:`~kdvfs_plugins.sim.gpu.VirtualGPU`'s latency with a modelled probe kernel.

    The probe is a small compute-bound kernel (the ``gemm`` class, well under the power cap), so
    its duration follows the SM clock. Noise-free by default; a noisy GPU works too (the match
    tolerance absorbs its jitter).
    """
    from .sim.gpu import VirtualGPU
    from .sim.model import Work

    gpu = gpu if gpu is not None else VirtualGPU(noise=False)
    model = gpu.model
    p = model.params
    # A probe of PROBE_S at the top clocks, expressed as a Work (durations are at the reference clocks).
    unit = Work("gemm", 1.0)
    probe = Work("gemm", PROBE_S / float(model.time_s(unit, p.sm_max_mhz, p.mem_max_mhz)))
    samples, trans = [], []
    for a, b in (pairs or _default_pairs(gpu.clock_table)):
        for _ in range(repeats):
            gpu.request_clocks(a, gpu.now_s)
            gpu.idle(max_wait_s)  # A lands, whatever the latency (up to the wait)
            for _ in range(200):  # the power controller settles on the probe
                gpu.run(probe)
            d_a = gpu.run(probe)[0]
            t_req = gpu.now_s
            gpu.request_clocks(b, t_req)
            durations, starts = [], []
            while gpu.now_s - t_req < max_wait_s:
                s = gpu.now_s
                durations.append(gpu.run(probe)[0])
                starts.append(s)
                if len(durations) > 3 and all(abs(x - durations[-1]) <= MATCH_RTOL * durations[-1] for x in durations[-3:]) \
                        and abs(durations[-1] - d_a) > MATCH_RTOL * d_a:
                    break
            d_b = durations[-1]
            hit = _detect(durations, starts, t_req, d_a, d_b)
            if hit is not None:
                samples.append(hit[0])
                trans.append(hit[1])
    gpu.request_clocks(None, gpu.now_s)
    if not samples:
        raise NotSupportedError("no clock change was seen within the wait; pick clock pairs whose probe "
                                "durations differ by more than 1%")
    return LatencyResult(gpu.name, "simulated", statistics.median(samples) * 1e3, statistics.median(trans) * 1e3,
                         tuple(s * 1e3 for s in samples), PROBE_S * 1e6, model_prediction=True)


def measure_nvml(device, *, pairs=None, repeats: int = 5, max_wait_s: float = 0.5, write=None) -> LatencyResult:
    """Measure a real GPU's latency. Needs clock writes (never on ``observe``) and a CUDA probe.

    The probe is an iterative kernel (a loop of dependent multiply-adds on one block, via torch)
    timed with CUDA events, back to back on one stream; clocks are restored at the end. ``write``
    takes each clock change as a callable (a :class:`~kdvfs_plugins.guard.ClockGuard`'s ``write``,
    which owns the GPU, records the change and restores it however the process ends).
    """
    write = write if write is not None else (lambda change: change())
    info = device.info()
    if not info.can_write_clocks:
        raise NoPermissionError(f"measuring the switch latency of {info.name} needs clock writes")
    try:
        import torch  # a CUDA probe kernel needs a CUDA runtime; imported only here
    except ImportError:
        raise NotSupportedError("the probe kernel needs torch with CUDA; install it or use --device simulated") from None
    x = torch.ones(64, device=f"cuda:{info.index}")

    def timed() -> tuple[float, float]:
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        y = x
        for _ in range(8):
            y = y * 1.0000001 + 1e-7
        e.record()
        e.synchronize()
        return s, s.elapsed_time(e) / 1e3

    import time
    samples, trans = [], []
    try:
        for a, b in (pairs or _default_pairs(info.clocks)):
            for _ in range(repeats):
                write(lambda: device.set_clocks(a))
                time.sleep(0.05)
                d_a = statistics.median(timed()[1] for _ in range(20))
                t0 = time.perf_counter()
                write(lambda: device.set_clocks(b))
                durations, starts = [], []
                while time.perf_counter() - t0 < max_wait_s:
                    starts.append(time.perf_counter() - t0)
                    durations.append(timed()[1])
                d_b = statistics.median(durations[-20:])
                hit = _detect(durations, starts, 0.0, d_a, d_b)
                if hit is not None:
                    samples.append(hit[0])
                    trans.append(hit[1])
    finally:
        write(device.reset_clocks)
    if not samples:
        raise NotSupportedError(f"no clock change was seen on {info.name}; is the GPU busy with other work?")
    return LatencyResult(info.name, info.driver, statistics.median(samples) * 1e3, statistics.median(trans) * 1e3,
                         tuple(s * 1e3 for s in samples), 0.0)


# --- storage ------------------------------------------------------------------------------------


def _state_dir(state_dir=None) -> Path:
    if state_dir is not None:
        return Path(state_dir)
    from .config import default_state_dir
    return Path(default_state_dir())


def _file(device_name: str, driver: str, state_dir=None) -> Path:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{device_name}-{driver}")
    return _state_dir(state_dir) / f"latency-{safe}.json"


def store(result: LatencyResult, state_dir=None) -> Path:
    """Write the result where :func:`switch_latency_for` finds it (keyed by GPU name and driver)."""
    from .ownership import check_private_dir, write_json

    path = _file(result.device_name, result.driver, state_dir)
    check_private_dir(path.parent)  # the state directory's rules: nothing planted is written through
    write_json(path, result.to_dict(), indent=1)
    return path


def load(device_name: str, driver: str, state_dir=None) -> Optional[LatencyResult]:
    path = _file(device_name, driver, state_dir)
    if not path.exists():
        return None
    d = json.loads(path.read_text())
    d["samples_ms"] = tuple(d.get("samples_ms", ()))
    return LatencyResult(**d)


def switch_latency_for(device_name: str, driver: str, config=None, state_dir=None) -> float:
    """The switch latency (ms) to plan with for a GPU: :func:`kdvfs_plugins.switching.resolve_switch_latency_ms`."""
    return resolve_switch_latency_ms(config, state_dir=state_dir, device_name=device_name, driver=driver).ms
