import threading
import time

import pytest

from kdvfs_plugins import ClockPair, ConfigError, KdvfsConfig, hookimpl
from kdvfs_plugins.actuator import Actuator
from kdvfs_plugins.devices import SimulatedDevice
from kdvfs_plugins.devices.base import Marker
from kdvfs_plugins.devices.simulated import VirtualMarker
from kdvfs_plugins.engine import Engine

from helpers import FixedWork, RegionRecorder


def sim_engine(tmp_path, plugins=(), durations=(0.001,), **cfg):
    cfg.setdefault("run_dir", str(tmp_path / "run"))
    cfg.setdefault("mode", "apply")
    dev = SimulatedDevice(0, work_source=FixedWork(durations), noise=False, switch_latency_ms=0)
    return Engine(KdvfsConfig.from_dict(cfg), device=dev, plugins=plugins).start(), dev


def run_steps(eng, n=3):
    records = []
    for s in range(n):
        eng.step_begin(s)
        eng.region_enter("forward")
        eng.region_enter("forward/layers.*.mlp")
        eng.region_exit("forward/layers.*.mlp")
        eng.region_exit("forward")
        eng.region_enter("backward")
        eng.region_exit("backward")
        eng.region_enter("optimizer")
        eng.region_exit("optimizer")
        records += eng.step_end()
    return records


class TimelineDevice(SimulatedDevice):
    """Markers at fixed timeline points: 0, 1, 3, 6, 10, ... ms (stretch k lasts k+1 ms)."""

    def __init__(self):
        super().__init__(0, noise=False)
        self.t_s = 0.0
        self.k = 0

    def marker(self):
        m = VirtualMarker(self.t_s)
        self.k += 1
        self.t_s += 0.001 * self.k
        return m


def test_region_times_are_exclusive_and_sum_to_the_step(tmp_path):
    dev = TimelineDevice()
    eng = Engine(KdvfsConfig.from_dict({"mode": "observe", "run_dir": str(tmp_path), "warmup_steps": 0}), device=dev).start()
    rec = run_steps(eng, 1)[0]
    eng.close()
    # markers: step, fwd, mlp, /mlp, /fwd, bwd, /bwd, opt, /opt, end -> stretches of 1..9 ms
    assert rec.region_time_ms == pytest.approx({
        "step": 1 + 5 + 7 + 9, "forward": 2 + 4, "forward/layers.*.mlp": 3, "backward": 6, "optimizer": 8,
    })
    assert rec.region_time_ms.get("step") and rec.gpu_time_ms == pytest.approx(sum(range(1, 10)))
    assert eng.region_table()[0][0] == "step"


class BackwardAtLowClock:
    """A third-party policy: answers for backward regions and passes on the rest."""

    @hookimpl
    def kdvfs_choose_clocks(self, region, step):
        return ClockPair(1200, 2619) if region.startswith("backward") else None


def test_a_plugin_that_answers_choose_clocks_replaces_the_policy(tmp_path):
    rec = RegionRecorder()
    eng, dev = sim_engine(tmp_path, plugins=[BackwardAtLowClock(), rec], mode="auto")
    run_steps(eng, 2)
    eng.close()
    asked = [c for _, c in dev.requests]
    # one change into backward and one back out, per step; then nothing left to restore
    assert asked == [ClockPair(1200, 2619), None] * 2
    # back to default clocks where backward ends and the step's own stretch resumes
    assert [c.region for c in rec.changes] == ["backward", "step"] * 2
    assert rec.phases(step=1) == ["forward", "backward", "optimizer"]


def test_no_op_changes_are_skipped_and_clocks_restored_at_close(tmp_path):
    eng, dev = sim_engine(tmp_path, sm_mhz=1500, mem_mhz=2619)
    run_steps(eng, 4)
    assert [c for _, c in dev.requests] == [ClockPair(1500, 2619)]
    eng.close()
    assert [c for _, c in dev.requests] == [ClockPair(1500, 2619), None]


def test_unsupported_config_clock_is_rejected_before_training(tmp_path):
    with pytest.raises(ConfigError, match=r"region_clocks\['forward'\].*SM clock 1234 MHz"):
        sim_engine(tmp_path, region_clocks={"forward": [1234, 2619]})


def test_min_interval_defers_changes_on_the_virtual_timeline(tmp_path):
    eng, dev = sim_engine(tmp_path, durations=[0.0001], min_switch_interval_ms=5.0,
                          region_clocks={"forward": [1500, 2619], "backward": [1200, 2619]})
    run_steps(eng, 1)
    eng.close()
    times = [t for t, _ in dev.requests]
    assert all(b - a >= 0.005 - 1e-12 for a, b in zip(times, times[1:]))


class SlowMarker(Marker):
    """A marker the 'GPU' reaches only when the test says so."""

    def __init__(self):
        self.reached = threading.Event()

    def query(self):
        return self.reached.is_set()

    def wait(self):
        self.reached.wait()

    def elapsed_ms(self, later):
        return 0.0


class RecordingDevice(SimulatedDevice):
    def __init__(self):
        super().__init__(0, noise=False)
        self.thread_of_set = []

    def set_clocks(self, clocks, marker=None):
        self.thread_of_set.append(threading.current_thread().name)
        super().set_clocks(clocks, None)


def test_actuator_applies_on_its_worker_when_the_gpu_reaches_the_marker():
    dev = RecordingDevice()
    act = Actuator(dev, min_interval_s=0)
    marker = SlowMarker()
    t0 = time.perf_counter()
    assert act.submit(marker, ClockPair(1500, 2619), "forward", 0)
    assert time.perf_counter() - t0 < 0.05, "the training thread must not wait for the GPU"
    time.sleep(0.05)
    assert dev.requests == []
    marker.reached.set()
    act.flush()
    act.stop()
    assert [c for _, c in dev.requests] == [ClockPair(1500, 2619)]
    assert dev.thread_of_set == ["kdvfs-actuator"]


def test_a_change_overtaken_by_a_later_reached_one_is_skipped():
    dev = RecordingDevice()
    act = Actuator(dev, min_interval_s=0)
    first, second = SlowMarker(), SlowMarker()
    act.submit(first, ClockPair(1500, 2619), "a", 0)
    act.submit(second, ClockPair(1200, 2619), "b", 0)
    second.reached.set()
    first.reached.set()
    act.flush()
    act.stop()
    assert [c for _, c in dev.requests] == [ClockPair(1200, 2619)]
    assert act.changes_skipped == 1


def test_energy_windows_come_from_the_100_ms_counter(tmp_path):
    eng, dev = sim_engine(tmp_path, durations=[0.02], window_steps=2, mode="observe", profile_every_n_steps=1, warmup_steps=0)
    run_steps(eng, 10)  # 9 stretches of about 20 ms: about 0.18 s a step
    eng.close()
    wins = eng.meter.windows
    assert len(wins) >= 4 and all(w.steps == 2 for w in wins)
    # the counter moves in 100 ms steps, so a 0.36 s window is known to about +-0.1 s of power
    truth = dev.gpu.true_energy_j if hasattr(dev.gpu, "true_energy_j") else None
    for w in wins:
        assert 70 < w.avg_power_w < 760
    total = sum(w.energy_j for w in wins)
    if truth is not None:
        assert total == pytest.approx(truth, rel=0.15)


def test_a_long_run_keeps_the_latest_windows_and_the_energy_of_all(tmp_path, monkeypatch):
    import kdvfs_plugins.meter as meter_module

    monkeypatch.setattr(meter_module, "MAX_KEPT_WINDOWS", 3)
    seen = []

    class Windows:
        @hookimpl
        def kdvfs_window_measured(self, window):
            seen.append(window)

    eng, _ = sim_engine(tmp_path, plugins=[Windows()], durations=[0.02], window_steps=1, mode="observe",
                        warmup_steps=0)
    run_steps(eng, 12)
    eng.close()
    assert len(seen) > 6 and list(eng.meter.windows) == seen[-3:]
    s = eng.summary()
    assert s["energy_j_per_step"] == pytest.approx(sum(w.energy_j for w in seen) / sum(w.steps for w in seen))
    assert s["avg_power_w"] == pytest.approx(sum(w.energy_j for w in seen) / sum(w.duration_s for w in seen))


def test_module_boundaries_are_marked_only_where_a_plan_sets_clocks_by_module(tmp_path):
    # profile_every_n_steps is large: step 5 is neither warm-up nor a profiled step
    by_phase, _ = sim_engine(tmp_path / "a", warmup_steps=0, profile_every_n_steps=1000,
                             region_clocks={"optimizer": [1200, 2619]})
    by_module, _ = sim_engine(tmp_path / "b", warmup_steps=0, profile_every_n_steps=1000,
                              region_clocks={"forward/layers.*.mlp": [1200, 2619]})
    for eng, wanted in ((by_phase, False), (by_module, True)):
        eng.step_begin(0)
        assert eng.profiling_or_switching  # a profiled step: every module boundary
        eng.step_end()
        eng.step_begin(5)
        assert eng.profiling_or_switching is wanted
        eng.step_end()
        eng.close()
