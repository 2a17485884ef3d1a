"""NvmlDevice against the fake NVML's state: every write, every reset, every error mapping."""
import time

import pytest

from kdvfs_plugins import ClockPair
from kdvfs_plugins.devices import NvmlDevice
from kdvfs_plugins.devices.base import HostMarker
from kdvfs_plugins.errors import DeviceUnavailableError, InvalidClockError, NoPermissionError

from fakes.fake_nvml import FakeNvml

WRITES = ("sm_locked", "mem_locked")


@pytest.fixture
def fake():
    return FakeNvml(gpus=2)


def open_dev(fake, index=0):
    return NvmlDevice(index, nvml=fake, marker_factory=HostMarker)


def test_set_clocks_locks_memory_and_sm_clocks(fake):
    dev = open_dev(fake)
    dev.set_clocks(ClockPair(1500, 1593))
    g = fake.gpu_state(0)
    assert g["sm_locked"] == [1500, 1500] and g["mem_locked"] == [1593, 1593] and g["writes"] == 2
    assert [c[0] for c in fake.calls] == ["mem_locked", "sm_locked"]  # memory first, as the driver wants
    assert dev.current_clocks() == ClockPair(1500, 1593)
    assert fake.gpu_state(1)["writes"] == 0  # the other GPU is untouched


def test_reset_undoes_both_locks(fake):
    dev = open_dev(fake)
    dev.set_clocks(ClockPair(1005, 2619))
    dev.reset_clocks()
    g = fake.gpu_state(0)
    assert g["sm_locked"] is None and g["mem_locked"] is None and g["writes"] == 4


@pytest.mark.parametrize("clocks, named", [
    (ClockPair(1234, 2619), "SM clock 1234 MHz"),
    (ClockPair(1500, 2000), "memory clock 2000 MHz"),
])
def test_unsupported_clock_is_refused_before_any_nvml_write(fake, clocks, named):
    dev = open_dev(fake)
    with pytest.raises(InvalidClockError, match=named):
        dev.set_clocks(clocks)
    assert fake.calls == [] and fake.gpu_state(0)["writes"] == 0


def test_no_permission_becomes_typed_error_with_how_to(fake):
    fake.privileged = False
    dev = open_dev(fake)
    with pytest.raises(NoPermissionError) as err:
        dev.set_clocks(ClockPair(1500, 2619))
    msg = str(err.value)
    assert "no permission" in msg and "root" in msg and "--cap-add SYS_ADMIN" in msg and "observe" in msg
    with pytest.raises(NoPermissionError):
        dev.reset_clocks()
    g = fake.gpu_state(0)
    assert g["sm_locked"] is None and g["mem_locked"] is None and g["writes"] == 0


def test_info_reads_the_clock_table_and_limits(fake):
    info = open_dev(fake, 1).info()
    assert info.uuid == "GPU-fake-0001" and info.name.startswith("NVIDIA H100")
    assert info.clocks.mem_mhz == (2619, 1593)
    assert len(info.clocks.sm_mhz_by_mem[2619]) == 110 and info.clocks.sm_mhz_by_mem[1593][0] == 1980
    assert info.clocks.default == ClockPair(1980, 2619)
    assert info.power_limit_w == 700.0


def test_energy_counter_grows(fake):
    dev = open_dev(fake)
    e0 = dev.energy_mj()
    time.sleep(0.02)
    assert dev.energy_mj() > e0
    assert dev.power_mw() > 0


def test_open_by_uuid_and_unknown_uuid(fake):
    dev = NvmlDevice.open_by_uuid("GPU-fake-0001", nvml=fake, marker_factory=HostMarker)
    assert dev.nvml_index == 1
    dev.set_clocks(ClockPair(1500, 2619))
    assert fake.gpu_state(1)["sm_locked"] == [1500, 1500] and fake.gpu_state(0)["writes"] == 0
    with pytest.raises(DeviceUnavailableError, match="GPU-nope"):
        NvmlDevice.open_by_uuid("GPU-nope", nvml=fake)


def test_cuda_visible_devices_maps_to_nvml_index(fake, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-fake-0001")
    assert open_dev(fake, 0).nvml_index == 1
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,0")
    assert open_dev(fake, 1).nvml_index == 0
    with pytest.raises(DeviceUnavailableError, match="not visible"):
        open_dev(fake, 2)


def test_nvml_sessions_are_counted_per_module():
    # Two NVML modules in one process (two fakes here): closing a device of one must not end the
    # other's session, and opening one must initialise it even while the other is open.
    a, b = FakeNvml(), FakeNvml()
    da = open_dev(a)
    db = open_dev(b)
    assert a._initialised == 1 and b._initialised == 1
    da2 = open_dev(a)
    da.close()
    assert a._initialised == 1  # da2 still needs it
    da2.set_clocks(ClockPair(1500, 2619))
    da2.close()
    db.close()
    assert a._initialised == 0 and b._initialised == 0


def test_failed_open_leaves_no_nvml_session(fake):
    with pytest.raises(Exception):
        NvmlDevice(nvml=fake, nvml_index=7)
    assert fake._initialised == 0


def test_cuda_markers_sleep_while_they_wait_and_events_are_reused():
    """The pool's events are blocking-sync (a waiting thread sleeps instead of spinning a core)."""
    from types import SimpleNamespace

    from kdvfs_plugins.devices.base import CudaMarkerPool

    made = []

    class Event:
        def __init__(self, **kwargs):
            self.kwargs = kwargs
            self.records = 0
            made.append(self)

        def record(self):
            self.records += 1

    pool = CudaMarkerPool(SimpleNamespace(cuda=SimpleNamespace(Event=Event)), prewarm=2)
    markers = [pool() for _ in range(3)]  # two from the pool, one made on demand
    assert len(made) == 3 and all(e.kwargs == {"enable_timing": True, "blocking": True} for e in made)
    pool.release(markers[:1])
    assert pool().event is markers[0].event and len(made) == 3
    spinning = CudaMarkerPool(SimpleNamespace(cuda=SimpleNamespace(Event=Event)), prewarm=1, blocking=False)
    assert made[-1].kwargs["blocking"] is False and spinning().event is made[-1]


def test_power_is_read_from_the_instant_field_where_the_gpu_has_it(fake):
    dev = open_dev(fake)
    assert dev.power_source == "instant"
    assert dev.power_mw() == 612_000                 # the field, not power usage (500 W in the fake)


def test_power_falls_back_to_power_usage_without_the_instant_field(fake):
    fake.has_power_instant = False
    dev = open_dev(fake)
    assert dev.power_source == "usage"
    assert dev.power_mw() == 500_000


def test_kdvfs_info_says_which_power_reading_it_uses(fake):
    from kdvfs_plugins.commands.info import collect, format_text

    info = collect(nvml=fake)
    assert info["gpus"][0]["power_reading"] == "instant"
    assert "power read from: the instant field" in format_text(info)
