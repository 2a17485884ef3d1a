"""The stateful virtual GPU: counter refresh, switch latency, cap under locks, noise."""
import pytest

from kdvfs_plugins.clocks import ClockPair
from kdvfs_plugins.errors import InvalidClockError
from kdvfs_plugins.sim.gpu import ENERGY_REFRESH_S, VirtualGPU, Work


def test_public_api_and_clock_table():
    gpu = VirtualGPU()
    assert len(gpu.clock_table.sm_mhz) == 110
    assert gpu.clock_table.sm_mhz[0] == 1980 and gpu.clock_table.sm_mhz[-1] == 345
    assert gpu.clock_table.mem_mhz == (2619, 1593)
    assert gpu.now_s == 0.0
    d, e = gpu.run(Work("copy_cast", 1e-3))
    assert d > 0 and e > 0 and gpu.now_s == pytest.approx(d)
    with pytest.raises(InvalidClockError):
        gpu.request_clocks(ClockPair(1981, 2619), 0.0)


def test_counter_refreshes_every_100_ms():
    gpu = VirtualGPU(noise=False)
    w = Work("gemm", 1e-3)
    seen = []
    while gpu.now_s < 0.35:
        gpu.run(w)
        seen.append((gpu.now_s, gpu.energy_counter_mj()))
    assert all(v == 0 for t, v in seen if t < ENERGY_REFRESH_S)
    values = sorted({v for _, v in seen})
    assert len(values) == 4  # 0, then one value per refresh at 0.1, 0.2, 0.3 s
    assert all(isinstance(v, int) for _, v in seen)
    # The value at the 0.2 s refresh is the energy at 0.2 s: ~700 W * 0.1 s more than at 0.1 s.
    (t1, v1), (t2, v2) = gpu.counter_history[0], gpu.counter_history[1]
    assert t1 == pytest.approx(0.1) and t2 == pytest.approx(0.2)
    assert (v2 - v1) / 1e3 / 0.1 == pytest.approx(703, rel=0.03)
    assert gpu.power_w() == pytest.approx((gpu.counter_history[2][1] - v2) / 1e3 / 0.1, rel=1e-3)


def test_switch_latency_applied():
    gpu = VirtualGPU(noise=False, switch_latency_ms=5.0)
    w = Work("copy", 1e-4)
    gpu.request_clocks(ClockPair(900, 2619), at_s=0.0)
    while gpu.now_s < 0.0049:
        gpu.run(w)
        assert gpu.last_sm_mhz > 900 + 1  # not yet
    while gpu.now_s < 0.0052:
        gpu.run(w)
    assert gpu.effective_clocks() == ClockPair(900, 2619)
    gpu.request_clocks(None, at_s=gpu.now_s)
    gpu.run(Work("copy", 0.008))  # the change (5 ms later) lands inside this kernel
    gpu.run(w)
    assert gpu.effective_clocks().sm_mhz > 1900


def test_change_inside_a_kernel_splits_it():
    a = VirtualGPU(noise=False, switch_latency_ms=1.0)
    b = VirtualGPU(noise=False, switch_latency_ms=0.0)
    a.request_clocks(ClockPair(600, 2619), 0.0)
    b.request_clocks(ClockPair(600, 2619), 0.0)
    w = Work("gemm", 0.010)
    da, _ = a.run(w)
    db, _ = b.run(w)
    assert da < db  # the first millisecond ran at the higher default clock


def test_locked_clock_above_cap_is_lowered_live():
    gpu = VirtualGPU(noise=False, switch_latency_ms=0.0)
    gpu.request_clocks(ClockPair(1980, 2619), 0.0)
    for _ in range(200):
        gpu.run(Work("gemm", 1e-3))
    assert 1380 <= gpu.effective_clocks().sm_mhz <= 1460
    assert gpu.instant_power_w() == pytest.approx(703.45, rel=0.01)
    gpu.request_clocks(ClockPair(1200, 2619), gpu.now_s)
    for _ in range(50):
        gpu.run(Work("gemm", 1e-3))
    assert gpu.effective_clocks() == ClockPair(1200, 2619)
    assert gpu.instant_power_w() < 600


def test_idle_power_and_idle_clock():
    gpu = VirtualGPU(noise=False)
    gpu.idle(2.0)
    assert gpu.power_w() == pytest.approx(71.9, abs=0.1)
    assert gpu.effective_clocks().sm_mhz == 345
    assert gpu.energy_counter_mj() == pytest.approx(71.9 * 2.0 * 1e3, rel=0.02)


def test_seeded_noise_reproducible_and_bounded():
    def trial(seed, noise=True):
        gpu = VirtualGPU(seed=seed, noise=noise)
        out = [gpu.run(Work(c, 2e-4)) for c in ("gemm", "copy", "layernorm") * 200]
        return out, gpu.energy_j / gpu.now_s

    a, pa = trial(1)
    b, pb = trial(1)
    c, pc = trial(2)
    exact, pe = trial(1, noise=False)
    assert a == b and a != c
    assert abs(pa / pe - 1) < 0.07 and abs(pc / pe - 1) < 0.07
    assert exact == trial(5, noise=False)[0]
