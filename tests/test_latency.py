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
