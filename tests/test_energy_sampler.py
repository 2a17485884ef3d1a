import time

import pytest

from kdvfs_plugins.meter import EnergySampler, EnergySeries


class Card:
    """Power reads 500 W; the counter (the truth) grows at 520 W, as a biased sensor would."""

    kind = "observe"

    def __init__(self):
        self.t0 = time.perf_counter()
        self.counter_reads = 0

    def power_mw(self):
        return 500_000

    def energy_mj(self):
        self.counter_reads += 1
        return int((time.perf_counter() - self.t0) * 520_000)


def run(counter_period_s):
    card, series = Card(), EnergySeries()
    s = EnergySampler(card, series, power_period_s=0.01, counter_period_s=counter_period_s)
    s.start()
    time.sleep(0.45)
    s.stop()
    return card, series, s


def test_integrated_power_is_scaled_to_the_counter_between_its_reads():
    card, series, s = run(0.1)
    assert s.reads > 20 and 3 <= s.counter_reads <= 6, "power often, the counter rarely"
    # its own CPU time, not the wall time it slept through
    assert 0 < s.cpu_time_s < 0.45
    t0, t1 = series.t_s[0], series.t_s[-1]
    rate_w = (series.at(t1) - series.at(t0)) / 1e3 / (t1 - t0)
    assert rate_w == pytest.approx(520, rel=0.03)


def test_power_only_when_the_counter_is_never_read():
    card, series, s = run(0.0)
    assert s.counter_reads == 0 and card.counter_reads == 0
    t0, t1 = series.t_s[0], series.t_s[-1]
    assert (series.at(t1) - series.at(t0)) / 1e3 / (t1 - t0) == pytest.approx(500, rel=0.03)


def test_the_engine_reports_its_threads_cpu_time(tmp_path):
    from kdvfs_plugins import KdvfsConfig
    from kdvfs_plugins.devices import ObserveDevice
    from kdvfs_plugins.devices.base import HostMarker
    from kdvfs_plugins.engine import Engine

    from fakes.fake_nvml import FakeNvml

    dev = ObserveDevice(nvml=FakeNvml(), marker_factory=HostMarker)
    eng = Engine(KdvfsConfig.from_dict({"mode": "observe", "run_dir": str(tmp_path), "energy_sample_period_ms": 5}),
                 device=dev).start()
    try:
        assert eng.meter.sampler is not None, "a real GPU's energy comes from the sampler thread"
        deadline = time.perf_counter() + 5.0
        while eng.meter.sampler.reads < 10 and time.perf_counter() < deadline:
            eng.step_begin()
            eng.step_end()
            time.sleep(0.005)
        used_s = eng.thread_cpu_s
        assert 0 < used_s < 5.0
        assert eng.summary()["thread_cpu_ms"] >= used_s * 1e3
    finally:
        eng.close()
