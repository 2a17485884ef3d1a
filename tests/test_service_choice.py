"""device='auto' goes through a kdvfsd clock service when one is named and answers."""
import pytest

from kdvfs_plugins import KdvfsConfig
from kdvfs_plugins.devices import ServiceNvmlDevice, choose_kind, open_device

from test_kdvfsd import service, wait_for  # noqa: F401  (the fixture that runs a real service)


def test_auto_picks_the_service_and_writes_through_it(service, monkeypatch):
    svc = service(gpus=1)
    monkeypatch.setattr("kdvfs_plugins.devices.nvml.writes_permitted", lambda: False)
    cfg = KdvfsConfig.from_dict({"kdvfsd_socket": svc.socket_path, "device": "auto"})
    kind, why = choose_kind("auto", nvml=svc.fake, config=cfg)
    assert kind == "nvml" and "kdvfsd" in why
    dev = open_device(kind, 0, nvml=svc.fake, config=cfg)
    assert isinstance(dev, ServiceNvmlDevice)
    from kdvfs_plugins import ClockPair

    dev.set_clocks(ClockPair(1410, 1593))
    assert svc.gpu(0)["sm_locked"] == [1410, 1410]
    dev.close()  # ends the session: the service restores what it found
    assert wait_for(lambda: svc.gpu(0)["sm_locked"] is None, 2.0) is not None


def test_a_named_socket_without_a_service_means_observe_for_users_without_root(tmp_path, monkeypatch):
    from fakes.fake_nvml import FakeNvml

    monkeypatch.setattr("kdvfs_plugins.devices.nvml.writes_permitted", lambda: False)
    cfg = KdvfsConfig.from_dict({"kdvfsd_socket": str(tmp_path / "none.sock")})
    kind, why = choose_kind("auto", nvml=FakeNvml(), config=cfg)
    assert kind == "observe" and "systemctl start kdvfsd" in why
