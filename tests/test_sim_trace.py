"""Kernel traces: loading, derived regions, replay, and the simulate command."""
import json

import pytest

from kdvfs_plugins.cli import main
from kdvfs_plugins.clocks import ClockPair
from kdvfs_plugins.errors import ConfigError
from kdvfs_plugins.sim.gpu import VirtualGPU
from kdvfs_plugins.sim.trace import Trace, derive_region, replay


def test_load_shipped_trace():
    tr = Trace.gpt1b()
    assert len(tr.steps) == 2
    s = tr.steps[0]
    assert len(s.kernels) == 1281
    assert s.busy_s == pytest.approx(0.219, abs=0.002)
    assert s.span_s == pytest.approx(0.2216, abs=0.001)
    assert s.period_s == pytest.approx(0.2261, abs=1e-6)  # measured step period
    assert all(k.gap_before_s >= 0 for k in s.kernels)
    assert sum(k.gap_before_s for k in s.kernels) == pytest.approx(s.span_s - s.busy_s, abs=1e-6)
    regions = tr.regions
    assert "forward/matmul" in regions and "backward/matmul" in regions and "optimizer" in regions
    assert not any("memset" in r for r in regions)
    # Regions are runs of consecutive kernels, hundreds per step.
    assert 100 < len(s.stretches()) < 1281


def test_region_column_used_and_memset_attaches_to_next(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text(
        "step,phase,category,kernel,start_us,dur_us,region\n"
        "0,forward,memset,Memset,0,1,forward/attn\n"
        "0,forward,gemm,k,2,100,forward/attn\n"
        "1,forward,gemm,k,0,100,forward/mlp\n"
    )
    tr = Trace.from_csv(p)
    assert [k.region for k in tr.steps[0].kernels] == ["forward/attn", "forward/attn"]
    assert tr.steps[0].kernels[1].gap_before_s == pytest.approx(1e-6)
    q = tmp_path / "u.csv"
    q.write_text("step,phase,category,kernel,start_us,dur_us\n"
                 "0,backward,memset,M,0,1\n0,backward,gemm,k,2,100\n0,optimizer,optimizer,o,200,50\n")
    tr = Trace.from_csv(q)
    assert [k.region for k in tr.steps[0].kernels] == ["backward/matmul", "backward/matmul", "optimizer"]
    assert derive_region("forward", "layernorm") == "forward/norm"


def test_bad_trace_is_a_typed_error(tmp_path):
    p = tmp_path / "bad.csv"
    p.write_text("step,phase\n0,forward\n")
    with pytest.raises(ConfigError):
        Trace.from_csv(p)
    with pytest.raises(ConfigError):
        Trace.load(str(tmp_path / "missing.csv"))


def test_replay_per_region_clocks_and_region_totals():
    tr = Trace.gpt1b()
    base = replay(VirtualGPU(noise=False), tr, steps=1, warmup_steps=1)

    def low_memory_bound(region):
        return None if region.endswith(("matmul", "attention")) else ClockPair(1200, 2619)

    res = replay(VirtualGPU(noise=False, switch_latency_ms=1.0), tr, steps=1, warmup_steps=1,
                 clocks_for=low_memory_bound)
    assert res.clock_changes > 50
    assert res.energy_j < base.energy_j
    totals = res.region_totals()
    assert sum(t for t, _ in totals.values()) == pytest.approx(res.step_time_s - tr.steps[res.steps[0].step].tail_gap_s, rel=1e-6)


def test_simulate_cli_json(capsys):
    assert main(["simulate", "--json", "--steps", "3", "--sm-mhz", "1500", "--seed", "3"]) == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("step_time_s", "energy_j", "avg_power_w"):
        assert out[key] > 0
    assert out["model_prediction"] is True
    assert out["median_sm_mhz"] == pytest.approx(1500, abs=1)
    assert out["energy_j"] == pytest.approx(out["avg_power_w"] * out["step_time_s"])


def test_simulate_cli_table_and_errors(capsys):
    assert main(["simulate", "--trace", "gpt1b", "--steps", "2", "--no-noise", "--switch-latency-ms", "0"]) == 0
    out = capsys.readouterr().out
    assert "model prediction (simulated H100)" in out and "step time" in out
    assert main(["simulate", "--sm-mhz", "1201", "--steps", "1"]) == 2
    assert main(["simulate", "--sm-mhz", "fast", "--steps", "1"]) == 2
    assert "nearest 1200" in capsys.readouterr().err


def test_simulate_defaults_close_to_measured(capsys):
    assert main(["simulate", "--json", "--steps", "5"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["step_time_s"] == pytest.approx(0.2261, rel=0.05)
    assert out["avg_power_w"] == pytest.approx(690.9, rel=0.05)
    assert out["noise"] is True and out["switch_latency_ms"] == 6.0
