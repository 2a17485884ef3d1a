"""``kdvfs info`` and ``kdvfs reset`` on the fake NVML (in process), and through the real command."""
import argparse
import json

import pytest

from kdvfs_plugins import ClockPair
from kdvfs_plugins.cli import build_parser, main
from kdvfs_plugins.commands import info as info_cmd
from kdvfs_plugins.commands import reset as reset_cmd
from kdvfs_plugins.config import default_state_dir
from kdvfs_plugins.devices import NvmlDevice
from kdvfs_plugins.devices import nvml as nvml_backend
from kdvfs_plugins.devices.base import HostMarker
from kdvfs_plugins.errors import NoPermissionError
from kdvfs_plugins.guard import ClockGuard, state_paths

from fakes.fake_nvml import FakeNvml
from fakes.procs import kdvfs


def crashed_run(fake, gpu=0, pid=424242):
    """What a run killed by SIGKILL leaves: locked clocks and a state file whose lock is free."""
    fake.lock(gpu, 1500, 1593)
    uuid = fake.gpu_state(gpu)["uuid"]
    path = state_paths(default_state_dir(), uuid)[1]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"pid": pid, "uuid": uuid, "device_kind": "nvml", "since": 0.0}))
    return path


def unlocked(fake, i=0):
    g = fake.gpu_state(i)
    return g["sm_locked"] is None and g["mem_locked"] is None


# ---------------------------------------------------------------------- info
def test_info_lists_gpus_clocks_and_permission(monkeypatch):
    monkeypatch.setattr(nvml_backend, "writes_permitted", lambda: False)
    fake = FakeNvml(gpus=2)
    fake.lock(1, 1005, 1593)
    out = info_cmd.collect(fake)
    assert out["nvml_available"] and out["driver"] == "580.159.04"
    assert [(g["index"], g["uuid"]) for g in out["gpus"]] == [(0, "GPU-fake-0000"), (1, "GPU-fake-0001")]
    g0 = out["gpus"][0]
    assert g0["memory_clocks_mhz"] == [2619, 1593]
    assert g0["sm_clocks_by_memory_clock"]["2619"] == {"min_mhz": 345, "max_mhz": 1980, "count": 110, "step_mhz": 15}
    assert g0["power_limit_w"] == 700.0
    assert out["gpus"][1]["current_clocks"] == {"sm_mhz": 1005, "mem_mhz": 1593}
    cw = out["clock_writes"]
    assert cw["permitted"] is False
    assert all(s in cw["how_to"] for s in ("root", "docker run --cap-add SYS_ADMIN", "kdvfsd"))
    assert out["auto_device"]["kind"] == "observe"
    assert fake._initialised == 0 and fake.calls == []  # info never writes, and closes NVML


def test_info_text_when_writes_permitted(monkeypatch, capsys):
    monkeypatch.setattr(nvml_backend, "writes_permitted", lambda: True)
    assert info_cmd.run(argparse.Namespace(json=False), nvml=FakeNvml()) == 0
    text = capsys.readouterr().out
    assert "NVIDIA driver: 580.159.04" in text and "GPU 0: NVIDIA H100" in text
    assert "110 from 345 to 1980 MHz in 15 MHz steps" in text and "power limit: 700 W" in text
    assert "clock writes: permitted" in text and "device 'auto' picks: nvml" in text


def test_info_without_driver_says_simulated(capsys):
    out = info_cmd.collect(FakeNvml(driver=False))
    assert out["nvml_available"] is False and out["gpus"] == []
    assert "no NVIDIA driver" in out["error"] and "simulated" in out["error"]
    assert out["auto_device"]["kind"] == "simulated"
    info_cmd.run(argparse.Namespace(json=True), nvml=FakeNvml(driver=False))
    assert json.loads(capsys.readouterr().out)["auto_device"]["kind"] == "simulated"


def test_info_command_runs_on_this_machine(capsys):
    # No NVIDIA driver here: the real pynvml fails to load, and the command says so.
    assert main(["info"]) == 0
    text = capsys.readouterr().out
    assert "NVIDIA driver: not found" in text and "simulated" in text


def test_commands_are_registered():
    parser = build_parser()
    args = parser.parse_args(["reset", "--all", "--json", "--state-dir", "x"])
    assert args.all and args.json and args.state_dir == "x"
    assert parser.parse_args(["info", "--json"]).json


# ---------------------------------------------------------------------- reset
def test_reset_restores_a_crashed_run():
    fake = FakeNvml(gpus=2)
    path = crashed_run(fake, gpu=1)
    res = reset_cmd.reset(nvml=fake)
    assert [(r["uuid"], r["pid"], r["index"]) for r in res["restored"]] == [("GPU-fake-0001", 424242, 1)]
    assert unlocked(fake, 1) and not path.exists()
    assert fake.gpu_state(0)["writes"] == 0
    assert "restored GPU GPU-fake-0001" in reset_cmd.format_text(res)
    assert fake._initialised == 0


def test_reset_with_nothing_to_do_touches_no_gpu(capsys):
    rc = reset_cmd.run(argparse.Namespace(state_dir=None, all=False, json=False), nvml=FakeNvml(driver=False))
    assert rc == 0 and "nothing to reset" in capsys.readouterr().out


def test_reset_leaves_a_live_run_alone():
    fake = FakeNvml()
    owner = ClockGuard(NvmlDevice(nvml=fake, marker_factory=HostMarker), default_state_dir(), handle_signals=False)
    owner.acquire()
    owner.write(lambda: owner.device.set_clocks(ClockPair(1500, 1593)))
    try:
        res = reset_cmd.reset(nvml=fake, all_gpus=True)
        assert res["restored"] == [] and res["reset"] == []
        assert [b["uuid"] for b in res["busy"]] == ["GPU-fake-0000"]
        assert fake.gpu_state(0)["sm_locked"] == [1500, 1500]
        assert "will restore it" in reset_cmd.format_text(res)
    finally:
        owner.release()
    assert unlocked(fake)


def test_reset_all_unlocks_gpus_without_state_files():
    fake = FakeNvml(gpus=2)
    fake.lock(0, 1005, 2619)  # locked by hand, no kdvfs record
    path = crashed_run(fake, gpu=1)
    res = reset_cmd.reset(nvml=fake, all_gpus=True)
    assert [r["uuid"] for r in res["restored"]] == ["GPU-fake-0001"]
    assert [r["uuid"] for r in res["reset"]] == ["GPU-fake-0000"]
    assert unlocked(fake, 0) and unlocked(fake, 1) and not path.exists()


def test_reset_without_permission_is_a_typed_error():
    fake = FakeNvml(privileged=False)
    with pytest.raises(NoPermissionError, match="SYS_ADMIN"):
        reset_cmd.reset(nvml=fake, all_gpus=True)
    path = crashed_run(fake)
    with pytest.raises(NoPermissionError):
        reset_cmd.reset(nvml=fake)
    assert path.exists()  # still there for a permitted reset


def test_reset_reports_unknown_gpu_and_unreadable_state():
    fake = FakeNvml()
    sd = default_state_dir()
    gone = state_paths(sd, "GPU-removed")[1]
    gone.parent.mkdir(parents=True, exist_ok=True)
    gone.write_text(json.dumps({"pid": 1, "uuid": "GPU-removed"}))
    state_paths(sd, "GPU-garbled")[1].write_text("{not json")
    res = reset_cmd.reset(nvml=fake)
    errors = reset_cmd.format_text(res)
    assert len(res["errors"]) == 2 and "GPU-removed" in errors and "unreadable state file" in errors
    assert reset_cmd.run(argparse.Namespace(state_dir=None, all=False, json=True), nvml=fake) == 1


def test_reset_command_in_another_process(tmp_path):
    fake = FakeNvml(state_path=tmp_path / "fake.json")
    path = crashed_run(fake)
    res = kdvfs(tmp_path / "fake.json", "reset", "--state-dir", str(path.parent))
    assert res.returncode == 0, res.stderr
    assert "restored GPU GPU-fake-0000" in res.stdout and "424242" in res.stdout
    assert unlocked(fake) and not path.exists()
    fake.privileged = False
    denied = kdvfs(tmp_path / "fake.json", "reset", "--all")
    assert denied.returncode == 2 and "no permission" in denied.stderr and "--cap-add SYS_ADMIN" in denied.stderr
