"""Step times from anchors: where markers can be dated from one another (CUDA events), the
actuator's worker waits on one step marker per anchor period, not on two every step."""
from __future__ import annotations

import time

import pytest

import kdvfs_plugins.engine as engine_module
from kdvfs_plugins import KdvfsConfig
from kdvfs_plugins.devices import SimulatedDevice
from kdvfs_plugins.engine import Engine

from helpers import TimedMarker

LAG_S = 0.003  # the GPU reaches a marker this long after the CPU records it


class LaggingMarker(TimedMarker):
    """Reached ``LAG_S`` after it is recorded; dated from another on that one clock, like CUDA events."""

    dated_by_anchor = True

    def __init__(self):
        super().__init__(time.perf_counter() + LAG_S)


class LaggingDevice(SimulatedDevice):
    def __init__(self):
        super().__init__(0, noise=False)
        self.made: list[LaggingMarker] = []

    def marker(self):
        m = LaggingMarker()
        self.made.append(m)
        return m


def run(tmp_path, steps, **cfg):
    dev = LaggingDevice()
    eng = Engine(KdvfsConfig.from_dict({"run_dir": str(tmp_path), "warmup_steps": 0, "window_steps": 1000, **cfg}),
                 device=dev).start()
    stamps, dated = [], []
    stamp = eng.actuator.stamp
    eng.actuator.stamp = lambda marker, cb: (stamps.append(marker), stamp(marker, cb))
    resolve = eng.meter._resolve
    eng.meter._resolve = lambda st: (dated.append(st), resolve(st))[1]
    t0 = time.perf_counter()
    for step in range(steps):
        eng.step_begin(step)
        eng.region_enter("forward")
        time.sleep(0.002)
        eng.region_exit("forward")
        eng.step_end()
    elapsed_s = time.perf_counter() - t0
    eng.close()
    return eng, stamps, dated, elapsed_s


def test_the_worker_waits_on_one_step_per_anchor_period_and_the_rest_are_dated(tmp_path, monkeypatch):
    period_s = 0.05
    monkeypatch.setattr(engine_module, "ANCHOR_PERIOD_S", period_s)
    eng, stamps, dated, elapsed_s = run(tmp_path, 40, mode="observe")
    assert eng.meter.steps_seen == 40 and len(dated) == 40
    # an anchor step (begin and end stamped) per period, the first step included; one stamp
    # every step's begin and end before
    anchors = len(stamps) // 2
    assert 1 <= anchors <= 1 + elapsed_s / period_s
    unstamped = [st for st in dated if not st.begin_stamped]
    assert len(unstamped) == 40 - anchors and anchors < 20
    for st in dated:
        begin, end = st.marks[0][0], st.end
        # dated on the markers' own clock: spans exact, absolute times off by the worker's wake-up
        assert st.t_end_s - st.t_begin_s == pytest.approx(end.t - begin.t, abs=1e-9 if not st.begin_stamped else 0.05)
        assert abs(st.t_begin_s - begin.t) < 0.05


def test_steps_that_change_clocks_keep_both_stamps(tmp_path, monkeypatch):
    monkeypatch.setattr(engine_module, "ANCHOR_PERIOD_S", 10.0)
    # forward at one clock, the rest at default: two changes every step
    eng, stamps, dated, _ = run(tmp_path, 12, mode="apply", region_clocks={"forward": [1200, 2619]})
    assert len(dated) == 12 and eng.device.requests
    # the first step is an anchor; every later step follows one that changed clocks
    assert all(st.begin_stamped and st.end_stamped for st in dated)
    assert len(stamps) == 2 * 12


def test_a_step_older_than_every_anchor_kept_is_dated_now_rather_than_left_waiting():
    from kdvfs_plugins.meter import Meter

    meter = Meter(LaggingDevice(), sample_energy_in_background=False)
    m = LaggingMarker()
    assert meter._anchored_s((5, 0), m) is None  # no anchor yet: wait for the first
    later = LaggingMarker()
    meter._anchors.append(((9, 0), later, 123.0))
    before = time.perf_counter()
    assert before <= meter._anchored_s((5, 0), m) <= time.perf_counter()
    # a marker after the anchor: the anchor's time plus the GPU time between them
    assert meter._anchored_s((9, 1), m) == pytest.approx(123.0 + (m.t - later.t))
