"""kdvfs latency: measures the simulated GPU's configured latency back, stores it, the planner uses it."""
from __future__ import annotations

import json

import pytest

from kdvfs_plugins import latency
from kdvfs_plugins.errors import NoPermissionError
from kdvfs_plugins.sim.gpu import VirtualGPU


@pytest.mark.parametrize("configured_ms", [0.5, 6.0, 20.0])
def test_simulated_latency_is_measured_back(configured_ms):
    r = latency.measure_simulated(VirtualGPU(switch_latency_ms=configured_ms, noise=False), repeats=2)
    assert r.switch_latency_ms == pytest.approx(configured_ms, abs=0.05)  # one or two probes of resolution
    assert r.model_prediction


def test_noisy_simulated_latency():
    r = latency.measure_simulated(VirtualGPU(switch_latency_ms=6.0, noise=True, seed=3), repeats=2)
    assert r.switch_latency_ms == pytest.approx(6.0, abs=0.1)


def test_store_and_use(tmp_path, capsys):
    from kdvfs_plugins.cli import main

    assert main(["latency", "--json", "--sim-switch-latency-ms", "3", "--state-dir", str(tmp_path),
                 "--repeats", "1"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["switch_latency_ms"] == pytest.approx(3.0, abs=0.05)
    assert latency.switch_latency_for(VirtualGPU.name, "simulated", state_dir=tmp_path) == pytest.approx(3.0, abs=0.05)
    assert latency.switch_latency_for("other GPU", "1.0", state_dir=tmp_path) == latency.DEFAULT_SWITCH_LATENCY_MS

    class Cfg:
        switch_latency_ms = 1.5
        state_dir = str(tmp_path)

    assert latency.switch_latency_for(VirtualGPU.name, "simulated", config=Cfg()) == 1.5


def test_never_on_observe():
    class Observe:
        kind = "observe"

        def info(self):
            from types import SimpleNamespace
            return SimpleNamespace(name="GPU", can_write_clocks=False, index=0, driver="x", clocks=None)

    with pytest.raises(NoPermissionError):
        latency.measure_nvml(Observe())
    from kdvfs_plugins.cli import main
    assert main(["latency", "--device", "observe"]) == 2


def test_a_stored_latency_never_writes_through_a_link_planted_in_the_state_dir(tmp_path):
    from kdvfs_plugins import latency

    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    victim = tmp_path / "victim.txt"
    victim.write_text("root-only content")
    result = latency.LatencyResult("Sim GPU", "simulated", 6.0, 1.0)
    (state / latency._file("Sim GPU", "simulated", state).name).symlink_to(victim)
    path = latency.store(result, state)
    assert victim.read_text() == "root-only content"        # the link was replaced, not followed
    assert latency.load("Sim GPU", "simulated", state).switch_latency_ms == 6.0 and not path.is_symlink()


def test_measuring_the_latency_owns_the_gpu_and_restores_it(tmp_path, monkeypatch):
    """kdvfs latency writes clocks: through the guard, and the clocks are put back at the end.

    A stand-in for torch times the probe by the fake GPU's locked SM clock, as the real probe's
    duration follows the clock."""
    import sys
    import types

    from kdvfs_plugins import latency
    from kdvfs_plugins.devices import NvmlDevice
    from kdvfs_plugins.guard import ClockGuard
    from fakes.fake_nvml import FakeNvml

    fake = FakeNvml()

    class Tensor:
        def __mul__(self, other):
            return self

        __add__ = __mul__

    class Event:
        def __init__(self, **kw):
            self.t = None

        def record(self):
            locked = fake.gpu_state(0)["sm_locked"]
            self.sm = locked[0] if locked else 1980

        def synchronize(self):
            pass

        def elapsed_time(self, other):
            return 0.02 * 1980 / self.sm  # ms: a compute-bound probe

    torch = types.SimpleNamespace(ones=lambda *a, **k: Tensor(), cuda=types.SimpleNamespace(Event=Event))
    monkeypatch.setitem(sys.modules, "torch", torch)
    dev = NvmlDevice(0, nvml=fake)
    guard = ClockGuard(dev, tmp_path / "state")
    guard.acquire()
    writes = []

    def write(change):
        writes.append(change)
        return guard.write(change)

    result = latency.measure_nvml(dev, repeats=1, max_wait_s=0.02, write=write)
    assert result.switch_latency_ms >= 0 and len(writes) >= 5      # A, B per direction, and the reset
    assert fake.gpu_state(0)["sm_locked"] is None                  # the measurement put the clocks back
    guard.release()
