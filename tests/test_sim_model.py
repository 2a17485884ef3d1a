"""The virtual H100's physical model: calibration against the measured data and its responses."""
import numpy as np
import pytest

from kdvfs_plugins.clocks import ClockPair
from kdvfs_plugins.data import h100_default_clocks
from kdvfs_plugins.errors import ConfigError
from kdvfs_plugins.sim import calibrate
from kdvfs_plugins.sim.model import H100Model, Work, default_model, load_params
from kdvfs_plugins.sim.trace import Trace


@pytest.fixture(scope="module")
def report():
    return calibrate.calibration_report(load_params(), standalone_s=0.3, steps=2)


@pytest.fixture(scope="module")
def gpt_step():
    return Trace.gpt1b().steps[0]


def test_calibration_every_op_class_within_10_percent(report):
    ops = h100_default_clocks()["ops_at_default_clocks"]
    assert set(ops) <= set(report)
    for name, op in ops.items():
        r = report[name]
        assert r["measured_us"] == op["us_per_call"] and r["measured_w"] == op["avg_power_W"]
        assert abs(r["model_us"] / op["us_per_call"] - 1) < 0.10, (name, r)
        assert abs(r["model_w"] / op["avg_power_W"] - 1) < 0.10, (name, r)


def test_calibration_gpt_step_within_5_percent(report):
    g = h100_default_clocks()["gpt_training_step"]
    r = report["gpt_training_step"]
    assert abs(r["model_s"] / g["s_per_step"] - 1) < 0.05, r
    assert abs(r["model_w"] / g["avg_power_W"] - 1) < 0.05, r
    # One clock for the mix, between the GEMMs' own cap clock and the copies' top clock.
    assert 1500 < r["model_sm_mhz"] < 1800


def test_default_clocks_cap_gemms_not_copies():
    m = default_model()
    gemm_sm = float(m.cap_sm_mhz("gemm", 2619))
    assert 1380 <= gemm_sm <= 1460  # measured 1410-1440 MHz at the 700 W cap
    for cls in ("copy", "layernorm", "softmax", "optimizer"):
        assert float(m.cap_sm_mhz(cls, 2619)) == 1980
    idle = m.idle_power_w()
    assert idle == pytest.approx(71.9, abs=0.05)


def test_shipped_fit_matches_a_fresh_fit():
    fresh = calibrate.fit(window_s=load_params().power_window_s, with_report=False)
    shipped = load_params()
    assert fresh.board_w == pytest.approx(shipped.board_w, rel=1e-6)
    for name, c in shipped.classes.items():
        assert fresh.classes[name].dyn_w == pytest.approx(c.dyn_w, rel=1e-6)


def test_time_grows_as_sm_clock_falls_vectorised():
    m = default_model()
    sm = np.array(sorted(m.grid_sm_mhz))[::-1]
    for cls in ("gemm", "attention", "copy", "layernorm", "softmax", "gelu", "optimizer"):
        t, e = m.time_energy(Work(cls, 1e-3), sm, 2619, power_cap=False)
        assert np.all(np.diff(t) >= -1e-15), cls
        assert t[-1] > t[0]


def test_memory_bound_keeps_time_compute_bound_does_not():
    m = default_model()
    t_copy, e_copy = m.time_energy(Work("copy", 1e-3), [1980, 1200], 2619)
    t_gemm, _ = m.time_energy(Work("gemm", 1e-3), [1980, 1200], 2619)
    assert t_copy[1] / t_copy[0] < 1.02  # memory-bound: little slowdown at a much lower SM clock
    assert e_copy[1] / e_copy[0] < 0.8   # and a large energy saving (paper: ~30% on such kernels)
    assert t_gemm[1] / t_gemm[0] > 1.15  # compute-bound: follows the clock below its cap clock
    # Lower memory clock: compute-bound barely slower, memory-bound much slower.
    tg, _ = m.time_energy(Work("gemm", 1e-3), 1200, [2619, 1593])
    tc, _ = m.time_energy(Work("copy", 1e-3), 1980, [2619, 1593])
    assert tg[1] / tg[0] < 1.01 and tc[1] / tc[0] > 1.4


def test_locked_clock_above_cap_is_lowered():
    m = default_model()
    w = Work("gemm", 1e-3)
    f_cap = float(m.cap_sm_mhz("gemm", 2619))
    t, e = m.time_energy(w, [1980, 1800, f_cap], 2619)
    assert t[0] == pytest.approx(t[2]) and t[1] == pytest.approx(t[2])
    assert e[0] / t[0] == pytest.approx(m.params.controller_target_w, rel=1e-3)
    t_free, e_free = m.time_energy(w, 1980, 2619, power_cap=False)
    assert e_free / t_free > 1000  # what the GEMM would draw uncapped


def test_gemm_faster_with_lower_memory_clock_under_cap():
    # Freed memory power lets the capped GEMM clock up: the reference paper saw 1-3% faster GEMMs.
    m = default_model()
    w = m.work_from_counts("gemm", flops=2 * 8192 ** 3)
    t, e, sm = m.auto_time_energy(w, [2619, 1593])
    assert sm[1] > sm[0]
    assert 0.97 <= t[1] / t[0] < 1.0
    assert e[1] < e[0]


def test_gpt_sweep_time_monotone_energy_minimum_intermediate(gpt_step):
    m = default_model()
    gap = gpt_step.period_s - gpt_step.busy_s
    clocks = list(range(1980, 599, -90))
    res = [m.mix_time_energy([(k.work(), ClockPair(f, 2619)) for k in gpt_step.kernels], gap) for f in clocks]
    t = np.array([r[0] for r in res])
    e = np.array([r[1] for r in res])
    assert np.all(np.diff(t) >= -1e-5 * t[0]) and t[-1] > 1.5 * t[0]  # flat where the cap binds
    i = int(np.argmin(e))
    assert 0 < i < len(clocks) - 1, (clocks[i], e)
    assert 800 <= clocks[i] <= 1400


def test_mix_holds_one_clock_between_gemm_and_copy_caps(gpt_step):
    m = default_model()
    f = m.mix_ceiling_sm_mhz([(k.work(), None) for k in gpt_step.kernels])
    assert float(m.cap_sm_mhz("gemm", 2619)) < f < 1980
    # Memory-bound work locked low frees budget: the mix's clock (for GEMMs) rises.
    lock = ClockPair(1200, 2619)
    items = [(k.work(), None if k.category in ("gemm", "attention") else lock) for k in gpt_step.kernels]
    assert m.mix_ceiling_sm_mhz(items) > f + 30


def test_work_from_counts_matches_measured_rate():
    m = default_model()
    w = m.work_from_counts("gemm", flops=2 * 8192 ** 3)
    t, _, _ = m.auto_time_energy(w)
    assert float(t) == pytest.approx(1616.3e-6, rel=0.05)
    assert m.work_from_counts("copy", bytes=1).duration_s >= m.params.min_kernel_s


def test_categories_map_and_unknown_is_rejected_only_without_fallback():
    m = default_model()
    for cat in ("gemm", "attention", "layernorm", "softmax_loss", "gelu", "copy_cast", "reduce",
                "elementwise", "embedding", "optimizer", "memset", "memcpy"):
        assert m.class_of(cat).name in m.params.classes
    assert m.class_of("something_new").name == "copy"
    d = load_params().to_dict()
    d["category_to_class"].pop("*")
    with pytest.raises(ConfigError):
        H100Model(d).class_of("something_new")


def test_one_clock_pair_paths_match_the_vectorised_model():
    """The virtual GPU's float paths are the same formulas as the vectorised ones, at every
    supported SM clock, between grid points (where the power cap lands) and both memory clocks."""
    m = default_model()
    p = m.params
    sm = np.concatenate([np.arange(p.sm_min_mhz, p.sm_max_mhz + 1, p.sm_step_mhz), [351.7, 1003.3, 1977.5]])
    for mem in (float(p.mem_max_mhz), 1593.0):
        static = m.static_power_w(sm, mem)
        for i, f in enumerate(sm):
            assert m.static_power_at(float(f), mem) == pytest.approx(float(static[i]), rel=1e-12)
        for name in p.classes:
            shape, power = m.shape(name, sm, mem), m.power_w(name, sm, mem)
            for i, f in enumerate(sm):
                assert m.shape_at(name, float(f), mem) == pytest.approx(float(shape[i]), rel=1e-12)
                assert m.power_at(name, float(f), mem) == pytest.approx(float(power[i]), rel=1e-12)
