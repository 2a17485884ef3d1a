"""The clocks are always restored: normal end, refused writes, signals, SIGKILL then reset or restart.

Everything runs against the fake NVML's state; the crash tests share it with child processes
through a JSON file and the ``pynvml`` shim.
"""
import json
import os
import signal
from pathlib import Path

import pytest

from kdvfs_plugins import ClockPair, KdvfsConfig
from kdvfs_plugins.config import default_state_dir
from kdvfs_plugins.devices import NvmlDevice
from kdvfs_plugins.devices.base import HostMarker
from kdvfs_plugins.engine import Engine
from kdvfs_plugins.errors import GpuBusyError
from kdvfs_plugins.guard import ClockGuard, all_states, stale_states, state_paths

from fakes.fake_nvml import FakeNvml
from fakes.procs import kdvfs, start_training

UUID = "GPU-fake-0000"
PLAN = {"mode": "apply", "device": "nvml", "sm_mhz": 1500, "mem_mhz": 1593}


def unlocked(fake, i=0):
    g = fake.gpu_state(i)
    return g["sm_locked"] is None and g["mem_locked"] is None


def state_file() -> Path:
    return state_paths(default_state_dir(), UUID)[1]


def nvml_engine(fake, tmp_path, **cfg):
    dev = NvmlDevice(0, nvml=fake, marker_factory=HostMarker)
    config = KdvfsConfig.from_dict({**PLAN, "run_dir": str(tmp_path / "run"), **cfg})
    return Engine(config, device=dev).start()


def run_steps(eng, n=3):
    for s in range(n):
        eng.step_begin(s)
        eng.region_enter("forward")
        eng.region_exit("forward")
        eng.region_enter("backward")
        eng.region_exit("backward")
        eng.step_end()


@pytest.fixture
def shared_fake(tmp_path):
    """A fake GPU whose state lives in a file that child processes share."""
    path = tmp_path / "fake-gpu.json"
    return FakeNvml(state_path=path), path


# ---------------------------------------------------------------------- in process
def test_engine_restores_clocks_after_normal_close(tmp_path):
    fake = FakeNvml()
    eng = nvml_engine(fake, tmp_path)
    run_steps(eng)
    g = fake.gpu_state(0)
    assert g["sm_locked"] == [1500, 1500] and g["mem_locked"] == [1593, 1593]
    record = json.loads(state_file().read_text())  # written before the first write
    assert record["pid"] == os.getpid() and record["uuid"] == UUID
    eng.close()
    assert unlocked(fake) and not state_file().exists()
    # ownership is given up: the next writer gets the GPU
    again = ClockGuard(NvmlDevice(nvml=fake, marker_factory=HostMarker), default_state_dir())
    again.acquire()
    again.release()


def test_no_clock_written_means_no_state_file(tmp_path):
    fake = FakeNvml()
    eng = nvml_engine(fake, tmp_path, mode="observe")
    run_steps(eng)
    eng.close()
    assert fake.gpu_state(0)["writes"] == 0 and not state_file().exists()


def test_refused_writes_fall_back_to_observe_with_one_warning(tmp_path, kdvfs_log):
    fake = FakeNvml(privileged=False)
    eng = nvml_engine(fake, tmp_path, region_clocks={"backward": [1200, 2619]})
    run_steps(eng, 5)  # several distinct changes per step: each would be refused
    assert eng.device.kind == "observe" and eng.session.device_kind == "observe"
    assert len(eng.device.would_set) > 3  # it kept recording what it would have set
    eng.close()
    warnings = [r.getMessage() for r in kdvfs_log if r.levelname == "WARNING"]
    assert len(warnings) == 1, warnings
    assert "no permission" in warnings[0] and "SYS_ADMIN" in warnings[0] and "observe" in warnings[0]
    assert fake.gpu_state(0)["writes"] == 0 and unlocked(fake)
    assert eng.summary()["steps"] == 5
    assert not state_file().exists()  # a refused write changed nothing: no record left behind


def test_guard_rejects_a_write_after_release(tmp_path):
    fake = FakeNvml()
    dev = NvmlDevice(nvml=fake, marker_factory=HostMarker)
    guard = ClockGuard(dev, default_state_dir(), handle_signals=False)
    guard.acquire()
    guard.release()
    assert guard.write(lambda: dev.set_clocks(ClockPair(1500, 2619))) is False
    assert fake.gpu_state(0)["writes"] == 0


def test_guard_released_during_a_write_leaves_clocks_unlocked(tmp_path):
    # A signal handler runs on the training thread, possibly inside a clock write (inline markers).
    fake = FakeNvml()
    dev = NvmlDevice(nvml=fake, marker_factory=HostMarker)
    guard = ClockGuard(dev, default_state_dir(), handle_signals=False)
    guard.acquire()

    def change():
        dev.set_clocks(ClockPair(1500, 2619))
        guard.release()  # the "handler" fires after the mem lock and SM lock
        dev.set_clocks(ClockPair(1200, 2619))  # the interrupted write finishes afterwards

    guard.write(change)
    assert unlocked(fake) and not state_file().exists()


def test_second_writer_in_process_is_refused(tmp_path):
    fake = FakeNvml()
    eng = nvml_engine(fake, tmp_path)
    with pytest.raises(GpuBusyError, match=f"process {os.getpid()}"):
        nvml_engine(fake, tmp_path)
    eng.close()


def test_stale_state_without_permission_is_kept_and_training_goes_on(tmp_path, kdvfs_log):
    fake = FakeNvml()
    fake.lock(0, 1500, 1593)
    state_file().parent.mkdir(parents=True, exist_ok=True)
    state_file().write_text(json.dumps({"pid": 999999, "uuid": UUID}))
    fake.privileged = False
    eng = nvml_engine(fake, tmp_path)
    run_steps(eng)
    eng.close()
    assert eng.device.kind == "observe"
    assert state_file().exists()  # a permitted `kdvfs reset` still knows what to undo
    assert any("kdvfs reset" in r.getMessage() for r in kdvfs_log)
    fake.privileged = True
    assert [s["uuid"] for s in stale_states(default_state_dir())] == [UUID]


# ---------------------------------------------------------------------- other processes
def test_second_writer_gets_busy_error_naming_the_owner(shared_fake):
    fake, path = shared_fake
    owner = start_training(path, 1500, 1593, "holdonly", ready="HOLDING")
    try:
        dev = NvmlDevice(nvml=fake, marker_factory=HostMarker)
        with pytest.raises(GpuBusyError, match=f"process {owner.pid}") as err:
            ClockGuard(dev, default_state_dir()).acquire()
        assert err.value.owner_pid == owner.pid and "observe" in str(err.value)
        assert [s["alive"] for s in all_states(default_state_dir())] == []  # it has written nothing yet
    finally:
        owner.kill()
        owner.wait(10)
    # the kernel dropped its lock with the process
    guard = ClockGuard(NvmlDevice(nvml=fake, marker_factory=HostMarker), default_state_dir())
    guard.acquire()
    guard.release()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_restores_clocks(shared_fake, sig):
    fake, path = shared_fake
    proc = start_training(path, 1500, 1593)
    try:
        assert fake.gpu_state(0)["sm_locked"] == [1500, 1500]
        assert state_file().exists()
        live = all_states(default_state_dir())
        assert live[0]["alive"] and live[0]["owner_pid"] == proc.pid
        assert stale_states(default_state_dir()) == []  # a live writer's file is not stale
        proc.send_signal(sig)
        rc = proc.wait(10)
    finally:
        proc.kill()
    assert rc != 0  # the signal still ends the process (SIGTERM: -15; SIGINT: KeyboardInterrupt)
    assert unlocked(fake) and not state_file().exists()


def _killed_run(fake, path, monkeypatch):
    # Without its watchdog: the case where the watchdog dies too (the whole job SIGKILLed).
    monkeypatch.setenv("KDVFS_WATCHDOG", "0")
    proc = start_training(path, 1500, 1593)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(10) == -signal.SIGKILL
    g = fake.gpu_state(0)
    assert g["sm_locked"] == [1500, 1500] and g["mem_locked"] == [1593, 1593]
    assert state_file().exists()
    return proc.pid


def test_sigkill_then_kdvfs_reset_restores(shared_fake, monkeypatch):
    fake, path = shared_fake
    pid = _killed_run(fake, path, monkeypatch)
    assert [s["pid"] for s in stale_states(default_state_dir())] == [pid]
    res = kdvfs(path, "reset", "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert [(r["uuid"], r["pid"]) for r in out["restored"]] == [(UUID, pid)]
    assert unlocked(fake) and not state_file().exists()
    again = kdvfs(path, "reset")
    assert again.returncode == 0 and "nothing to reset" in again.stdout


def test_sigkill_then_next_start_restores(shared_fake, tmp_path, kdvfs_log, monkeypatch):
    fake, path = shared_fake
    pid = _killed_run(fake, path, monkeypatch)
    eng = nvml_engine(fake, tmp_path, mode="observe")  # restores at acquire, before any step
    assert unlocked(fake) and not state_file().exists()
    assert any(f"process {pid} left clocks locked" in r.getMessage() for r in kdvfs_log)
    eng.close()
