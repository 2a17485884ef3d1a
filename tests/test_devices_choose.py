"""How ``auto`` picks a device, and the observe device: records what it would set, never writes."""
import pytest

from kdvfs_plugins import ClockPair, KdvfsConfig
from kdvfs_plugins.devices import BuiltinDevices, NvmlDevice, ObserveDevice, SimulatedDevice, choose_kind, observe_instead
from kdvfs_plugins.devices import nvml as nvml_backend
from kdvfs_plugins.devices.base import HostMarker
from kdvfs_plugins.errors import InvalidClockError

from fakes.fake_nvml import FakeNvml


def test_auto_without_driver_is_simulated():
    kind, why = choose_kind("auto", nvml=FakeNvml(driver=False))
    assert kind == "simulated" and "no NVIDIA driver" in why and "LibraryNotFound" in why


def test_auto_without_driver_real_pynvml_is_simulated():
    # This machine has no NVIDIA driver: the real pynvml fails to load its library.
    pytest.importorskip("pynvml")
    kind, _ = choose_kind("auto")
    assert kind == "simulated"


def test_auto_with_no_gpu_is_simulated():
    kind, why = choose_kind("auto", nvml=FakeNvml(gpus=0))
    assert kind == "simulated" and "no GPU" in why


def test_auto_is_nvml_when_writes_permitted(monkeypatch):
    monkeypatch.setattr(nvml_backend, "writes_permitted", lambda: True)
    assert choose_kind("auto", nvml=FakeNvml())[0] == "nvml"


def test_auto_is_observe_when_writes_not_permitted(monkeypatch):
    monkeypatch.setattr(nvml_backend, "writes_permitted", lambda: False)
    kind, why = choose_kind("auto", nvml=FakeNvml())
    assert kind == "observe" and "SYS_ADMIN" in why


def test_explicit_kind_is_kept():
    assert choose_kind("observe", nvml=FakeNvml(driver=False)) == ("observe", "as configured")


def test_choose_kind_keeps_an_open_devices_session():
    fake = FakeNvml()
    dev = NvmlDevice(nvml=fake, marker_factory=HostMarker)
    choose_kind("auto", nvml=fake)
    assert fake._initialised == 1
    dev.set_clocks(ClockPair(1500, 2619))  # would raise Uninitialized had choose_kind shut NVML down


def test_writes_permitted_follows_the_capability_not_the_user(monkeypatch):
    monkeypatch.setattr(nvml_backend, "effective_capabilities", lambda: 0x1FFFEDFFFFF)  # bit 21 clear
    assert nvml_backend.writes_permitted() is False
    monkeypatch.setattr(nvml_backend, "effective_capabilities", lambda: 1 << 21)
    assert nvml_backend.writes_permitted() is True


def test_builtin_make_device_opens_what_auto_picks(monkeypatch):
    monkeypatch.setattr(nvml_backend, "writes_permitted", lambda: False)
    fake = FakeNvml()
    dev = BuiltinDevices(nvml=fake).kdvfs_make_device(config=KdvfsConfig.from_dict({}), index=0)
    assert isinstance(dev, ObserveDevice) and dev.info().can_write_clocks is False
    sim = BuiltinDevices(nvml=FakeNvml(driver=False)).kdvfs_make_device(config=KdvfsConfig.from_dict({}), index=0)
    assert isinstance(sim, SimulatedDevice)


def test_observe_records_and_never_writes():
    fake = FakeNvml()
    dev = ObserveDevice(nvml=fake, marker_factory=HostMarker)
    dev.set_clocks(ClockPair(1500, 1593))
    dev.reset_clocks()
    assert [c for _, c in dev.would_set] == [ClockPair(1500, 1593), None]
    assert fake.gpu_state(0)["writes"] == 0 and fake.calls == []
    with pytest.raises(InvalidClockError, match="1234"):
        dev.set_clocks(ClockPair(1234, 2619))
    assert dev.current_clocks() == ClockPair(1755, 2619)  # still reads the real GPU
    assert dev.energy_mj() >= 0


def test_observe_instead_shares_the_session_and_stops_writing():
    fake = FakeNvml()
    dev = NvmlDevice(nvml=fake, marker_factory=HostMarker)
    obs = observe_instead(dev)
    assert obs.kind == "observe" and obs.handle == dev.handle and obs.info().can_write_clocks is False
    obs.set_clocks(ClockPair(1500, 2619))
    assert fake.gpu_state(0)["writes"] == 0 and len(obs.would_set) == 1
    obs.close()
    assert fake._initialised == 0
