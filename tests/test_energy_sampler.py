import threading
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


class ThreadCard(Card):
    """Also notes which thread read power."""

    def __init__(self):
        super().__init__()
        self.power_threads = []

    def power_mw(self):
        self.power_threads.append(threading.get_ident())
        return super().power_mw()


def test_power_read_at_step_ends_on_the_training_thread_is_scaled_alike():
    card, series = ThreadCard(), EnergySeries()
    s = EnergySampler(card, series, power_period_s=0.01, counter_period_s=0.1, power_on_steps=True)
    s.start()
    end = time.perf_counter() + 0.45
    while time.perf_counter() < end:
        s.on_step_end()  # a step ending every 2 ms: a reading at most every 10 ms
        time.sleep(0.002)
    s.stop()
    me = threading.get_ident()
    assert 20 < s.reads <= 46 and set(card.power_threads) == {me}, "power on the steps' thread only"
    assert 3 <= s.counter_reads <= 6, "the thread still anchors to the counter"
    t0, t1 = series.t_s[0], series.t_s[-1]
    assert (series.at(t1) - series.at(t0)) / 1e3 / (t1 - t0) == pytest.approx(520, rel=0.03)


def test_when_steps_stop_the_thread_reads_power_itself():
    card, series = ThreadCard(), EnergySeries()
    s = EnergySampler(card, series, power_period_s=0.01, counter_period_s=0.05, power_on_steps=True)
    s.start()
    time.sleep(0.4)  # no step ends at all: evaluation, a checkpoint
    s.stop()
    assert s.reads >= 4 and threading.get_ident() not in card.power_threads
    t0, t1 = series.t_s[0], series.t_s[-1]
    assert t1 - t0 > 0.25 and (series.at(t1) - series.at(t0)) / 1e3 / (t1 - t0) == pytest.approx(520, rel=0.05)


def test_the_meter_reads_power_at_step_end_when_configured(tmp_path):
    from kdvfs_plugins import KdvfsConfig
    from kdvfs_plugins.devices import ObserveDevice
    from kdvfs_plugins.devices.base import HostMarker
    from kdvfs_plugins.engine import Engine

    from fakes.fake_nvml import FakeNvml

    dev = ObserveDevice(nvml=FakeNvml(), marker_factory=HostMarker)
    cfg = KdvfsConfig.from_dict({"mode": "observe", "run_dir": str(tmp_path), "energy_sample_period_ms": 5,
                                 "power_readings": "step_end", "window_steps": 2})
    eng = Engine(cfg, device=dev).start()
    try:
        sampler = eng.meter.sampler
        assert sampler.power_on_steps
        while sampler._last_t is None:  # the thread's first counter read
            time.sleep(0.001)
        for _ in range(12):
            eng.step_begin()
            time.sleep(0.006)
            eng.step_end()
        assert sampler.reads >= 8, "a reading at nearly every 6 ms step end"
        assert eng.meter.windows and all(w.energy_j > 0 for w in eng.meter.windows)
    finally:
        eng.close()
    # no step end follows the last one: closing reads power once more, and every window has energy
    assert [(w.first_step, w.last_step) for w in eng.meter.windows] == [(s, s + 1) for s in range(0, 12, 2)]
    assert all(w.energy_j > 0 for w in eng.meter.windows)


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


class SlowCounterCard(Card):
    """A counter read that costs CPU time, as an H100's (about 4 ms) does."""

    def energy_mj(self):
        end = time.thread_time() + 0.02
        while time.thread_time() < end:
            pass
        return super().energy_mj()


def test_a_session_shorter_than_one_wake_still_reports_its_threads_cpu_time():
    # power at step ends: the thread wakes only every counter period (10 s here), never in this session
    s = EnergySampler(SlowCounterCard(), EnergySeries(), power_period_s=0.01, counter_period_s=10.0,
                      power_on_steps=True)
    s.start()
    time.sleep(0.1)
    s.stop()
    assert s.counter_reads == 1 and s.cpu_time_s >= 0.02
