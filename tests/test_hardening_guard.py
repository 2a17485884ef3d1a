"""Issue 20, direct NVML runs: every fatal signal restores, SIGKILL is restored by the watchdog,
one writer per GPU across state directories, state files that cannot be planted or crash
``kdvfs reset``, records from an earlier boot, and the site's clocks for administrators' locks.

All on the fake NVML; crash tests share its state with child processes through the shim.
"""
import json
import os
import signal
import time
from pathlib import Path

import pytest

from kdvfs_plugins import ClockPair
from kdvfs_plugins.commands import info as info_cmd
from kdvfs_plugins.commands import reset as reset_cmd
from kdvfs_plugins.config import default_state_dir
from kdvfs_plugins.devices import NvmlDevice
from kdvfs_plugins.devices.base import HostMarker
from kdvfs_plugins.errors import ConfigError, GpuBusyError, StateDirError
from kdvfs_plugins.guard import ClockGuard, state_paths

from fakes.fake_nvml import FakeNvml
from fakes.procs import kdvfs, start_training
from test_guard import UUID, nvml_engine, run_steps, unlocked
from test_kdvfsd import wait_for



def state_file(state_dir=None) -> Path:
    return state_paths(state_dir or default_state_dir(), UUID)[1]


@pytest.fixture
def shared_fake(tmp_path):
    path = tmp_path / "fake-gpu.json"
    return FakeNvml(state_path=path), path


# ---------------------------------------------------------------------- signals
@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGALRM,
                                 signal.SIGRTMIN + 3],
                         ids=["SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGALRM", "SIGRTMIN+3"])
def test_every_fatal_signal_restores_as_sigterm_does(shared_fake, monkeypatch, sig):
    # Without the watchdog, so that only the signal handler can have restored.
    monkeypatch.setenv("KDVFS_WATCHDOG", "0")
    fake, path = shared_fake
    proc = start_training(path, 1500, 1593)
    try:
        assert fake.gpu_state(0)["sm_locked"] == [1500, 1500] and state_file().exists()
        proc.send_signal(sig)
        rc = proc.wait(10)
    finally:
        proc.kill()
        proc.communicate(timeout=10)
    assert rc == -sig  # the signal still ends the process as its default action would
    assert unlocked(fake) and not state_file().exists()


# ---------------------------------------------------------------------- SIGKILL and the watchdog
def test_sigkill_is_restored_by_the_watchdog_within_100_ms(shared_fake):
    fake, path = shared_fake
    proc = start_training(path, 1500, 1593)
    try:
        assert fake.gpu_state(0)["sm_locked"] == [1500, 1500]
        t0 = time.monotonic()
        os.kill(proc.pid, signal.SIGKILL)
        took = wait_for(lambda: unlocked(fake), 2.0)
        proc.wait(10)
    finally:
        proc.kill()
        proc.communicate(timeout=10)
    assert took is not None, f"clocks still locked 2 s after SIGKILL: {fake.gpu_state(0)}"
    print(f"\nSIGKILL -> clocks restored by the watchdog after {took * 1e3:.1f} ms")
    assert took < 0.100, f"restored after {took * 1e3:.1f} ms"
    assert time.monotonic() - t0 < 2.0
    assert wait_for(lambda: not state_file().exists(), 2.0) is not None  # nothing left for `kdvfs reset`
    # The GPU is free for the next writer, without `kdvfs reset`.
    eng = nvml_engine(fake, Path(path).parent)
    run_steps(eng)
    eng.close()
    assert unlocked(fake)


def test_a_normal_end_stops_the_watchdog_without_a_restore(shared_fake):
    fake, path = shared_fake
    proc = start_training(path, 1500, 1593)
    proc.send_signal(signal.SIGTERM)
    proc.wait(10)
    proc.communicate(timeout=10)  # returns only once the watchdog (holding stderr) has gone too
    assert unlocked(fake)
    writes = fake.gpu_state(0)["writes"]
    time.sleep(0.05)
    assert fake.gpu_state(0)["writes"] == writes


# ---------------------------------------------------------------------- one writer across state dirs
def test_a_second_run_with_another_state_dir_gets_busy_and_leaves_the_first_alone(shared_fake, tmp_path, monkeypatch):
    fake, path = shared_fake
    first = start_training(path, 1500, 1593)  # state dir of this test (KDVFS_STATE_DIR)
    try:
        other = tmp_path / "another-home" / "state"
        monkeypatch.setenv("KDVFS_STATE_DIR", str(other))  # another HOME, sudo -E, another KDVFS_STATE_DIR
        writes = fake.gpu_state(0)["writes"]
        with pytest.raises(GpuBusyError, match=f"process {first.pid}") as err:
            nvml_engine(fake, tmp_path, sm_mhz=1200, mem_mhz=2619, state_dir=str(other))
        assert err.value.owner_pid == first.pid and "observe" in str(err.value)
        g = fake.gpu_state(0)
        assert g["sm_locked"] == [1500, 1500] and g["mem_locked"] == [1593, 1593] and g["writes"] == writes
        assert first.poll() is None
        # `kdvfs reset --all` from the other state dir leaves it alone too.
        res = reset_cmd.reset(str(other), all_gpus=True, nvml=fake)
        assert res["reset"] == [] and [b["owner_pid"] for b in res["busy"]] == [first.pid]
        assert fake.gpu_state(0)["sm_locked"] == [1500, 1500]
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(10)
        first.communicate(timeout=10)
    assert unlocked(fake)


# ---------------------------------------------------------------------- state directory safety
def _root_only_file(tmp_path, name):
    f = tmp_path / name
    f.write_text("secret: do not touch\n")
    f.chmod(0o600)
    return f


def test_symlinks_planted_in_the_state_dir_are_never_written_through(tmp_path, kdvfs_log):
    fake = FakeNvml()
    d = Path(default_state_dir())
    d.mkdir(parents=True, mode=0o700)
    lock, state = state_paths(d, UUID)
    victim_lock = _root_only_file(tmp_path, "victim-1")
    victim_tmp = _root_only_file(tmp_path, "victim-2")
    lock.symlink_to(victim_lock)
    state.with_suffix(".tmp").symlink_to(victim_tmp)  # the old fixed temp name
    eng = nvml_engine(fake, tmp_path)
    run_steps(eng)
    eng.close()
    assert victim_lock.read_text() == "secret: do not touch\n" and victim_tmp.read_text() == "secret: do not touch\n"
    assert eng.device.kind == "observe" and fake.gpu_state(0)["writes"] == 0
    msg = " ".join(r.getMessage() for r in kdvfs_log if r.levelname == "WARNING")
    assert "is a symbolic link" in msg and "observe" in msg
    # A planted state file link is replaced, not followed.
    lock.unlink()
    victim_state = _root_only_file(tmp_path, "victim-3")
    state.symlink_to(victim_state)
    guard = ClockGuard(NvmlDevice(nvml=fake, marker_factory=HostMarker), d, handle_signals=False)
    guard.acquire()
    guard.write(lambda: guard.device.set_clocks(ClockPair(1500, 1593)))
    assert victim_state.read_text() == "secret: do not touch\n"
    assert not state.is_symlink() and json.loads(state.read_text())["pid"] == os.getpid()
    guard.release()
    assert unlocked(fake) and victim_state.exists()


@pytest.mark.parametrize("how", ["writable by others", "another user's"])
def test_a_state_dir_another_user_can_write_is_refused_clearly(tmp_path, kdvfs_log, how):
    fake = FakeNvml()
    d = Path(default_state_dir())
    d.mkdir(parents=True)
    if how == "writable by others":
        d.chmod(0o777)
    else:
        os.chown(d, 12345, 12345)  # sudo -E with the user's HOME
    guard = ClockGuard(NvmlDevice(nvml=fake, marker_factory=HostMarker), d, handle_signals=False)
    with pytest.raises(StateDirError) as err:
        guard.acquire()
    text = str(err.value)
    assert str(d) in text and "KDVFS_STATE_DIR" in text
    assert ("writable by others" in text) if how == "writable by others" else ("belongs to uid 12345" in text)
    assert list(d.iterdir()) == []  # nothing created there
    eng = nvml_engine(fake, tmp_path)  # a run falls back to observe with that message
    run_steps(eng)
    eng.close()
    assert eng.device.kind == "observe" and fake.gpu_state(0)["writes"] == 0
    assert any(str(d) in r.getMessage() and "observe" in r.getMessage() for r in kdvfs_log)


def test_a_group_writable_state_dir_of_the_users_own_group_is_accepted():
    # User private groups (umask 002): the group is the user alone. Tests run as root, group root.
    d = Path(default_state_dir())
    d.mkdir(parents=True)
    d.chmod(0o770)
    guard = ClockGuard(NvmlDevice(nvml=FakeNvml(), marker_factory=HostMarker), d, handle_signals=False)
    guard.acquire()
    guard.release()


def test_a_lock_dir_anyone_can_write_must_be_sticky(tmp_path, monkeypatch):
    lock_dir = tmp_path / "locks"
    lock_dir.mkdir()
    lock_dir.chmod(0o777)  # anyone could delete a held lock file and take the GPU twice
    monkeypatch.setenv("KDVFS_LOCK_DIR", str(lock_dir))
    guard = ClockGuard(NvmlDevice(nvml=FakeNvml(), marker_factory=HostMarker), default_state_dir(), handle_signals=False)
    with pytest.raises(StateDirError, match="not sticky.*KDVFS_LOCK_DIR"):
        guard.acquire()
    lock_dir.chmod(0o1777)
    guard.acquire()
    guard.release()


@pytest.mark.parametrize("how", ["a file", "cannot be created"])
def test_an_unusable_state_dir_falls_back_to_observe_not_oserror(tmp_path, monkeypatch, kdvfs_log, how):
    fake = FakeNvml()
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    state_dir = blocker if how == "a file" else blocker / "sub" / "kdvfs"
    eng = nvml_engine(fake, tmp_path, state_dir=str(state_dir))
    run_steps(eng)
    eng.close()
    assert eng.device.kind == "observe" and fake.gpu_state(0)["writes"] == 0
    warnings = [r.getMessage() for r in kdvfs_log if r.levelname == "WARNING"]
    assert len(warnings) == 1 and f"kdvfs state directory {state_dir}" in warnings[0]
    assert "KDVFS_STATE_DIR" in warnings[0] and "observe" in warnings[0]


@pytest.mark.parametrize("content", ["[]", "null", "[1, 2]", "\"x\"", "{not json", "[" * 5000])
def test_a_state_file_that_is_not_an_object_does_not_crash_reset(content):
    fake = FakeNvml()
    fake.lock(0, 1500, 1593)
    state_file().parent.mkdir(parents=True, mode=0o700)
    state_file().write_text(content)
    res = reset_cmd.reset(nvml=fake)
    # Unreadable: named as such, not a TypeError; the next start still restores what it can.
    assert [e["state_file"] for e in res["errors"]] == [str(state_file())]
    assert "unreadable state file" in res["errors"][0]["error"]
    assert "could not reset" in reset_cmd.format_text(res)
    guard = ClockGuard(NvmlDevice(nvml=fake, marker_factory=HostMarker), default_state_dir(), handle_signals=False)
    guard.acquire()
    guard.release()
    assert unlocked(fake) and not state_file().exists()


def test_a_record_from_an_earlier_boot_is_forgotten_not_restored(tmp_path):
    fake = FakeNvml()
    fake.lock(0, 1410, 1593)  # an administrator's lock, set after the reboot
    state_file().parent.mkdir(parents=True, mode=0o700)
    state_file().write_text(json.dumps({"pid": 4242, "uuid": UUID, "boot_id": "an-earlier-boot"}))
    assert [s["uuid"] for s in reset_cmd.all_states(default_state_dir())] == [UUID]
    guard = ClockGuard(NvmlDevice(nvml=fake, marker_factory=HostMarker), default_state_dir(), handle_signals=False)
    guard.acquire()
    assert fake.gpu_state(0)["sm_locked"] == [1410, 1410]  # untouched
    assert not state_file().exists()
    guard.release()
    assert fake.gpu_state(0)["sm_locked"] == [1410, 1410]  # nothing written, nothing restored
    # Records of this boot carry its ID.
    eng = nvml_engine(fake, tmp_path)
    run_steps(eng)
    rec = json.loads(state_file().read_text())
    assert rec["boot_id"] == Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    eng.close()


# ---------------------------------------------------------------------- administrators' locks
def test_a_site_restores_its_own_clocks_instead_of_unlocking(tmp_path, monkeypatch):
    monkeypatch.setenv("KDVFS_RESTORE_CLOCKS", "1410/1593")
    fake = FakeNvml()
    fake.lock(0, 1410, 1593)
    eng = nvml_engine(fake, tmp_path, sm_mhz=1500, mem_mhz=2619)
    run_steps(eng)
    assert fake.gpu_state(0)["sm_locked"] == [1500, 1500]
    eng.close()
    g = fake.gpu_state(0)
    assert g["sm_locked"] == [1410, 1410] and g["mem_locked"] == [1593, 1593]
    assert not state_file().exists()


@pytest.mark.parametrize("value", ["fast", "1410", "1410/1593/1", "-5/1593", "1e400/1593"])
def test_a_malformed_site_restore_setting_is_a_config_error(tmp_path, monkeypatch, value):
    monkeypatch.setenv("KDVFS_RESTORE_CLOCKS", value)
    with pytest.raises(ConfigError, match="KDVFS_RESTORE_CLOCKS"):
        nvml_engine(FakeNvml(), tmp_path)


def test_kdvfs_info_says_what_a_restore_cannot_bring_back(monkeypatch):
    text = info_cmd.format_text(info_cmd.collect(FakeNvml()))
    assert "administrator" in text and "KDVFS_RESTORE_CLOCKS" in text
    monkeypatch.setenv("KDVFS_RESTORE_CLOCKS", "1410/1593")
    assert "1410/1593 MHz" in info_cmd.format_text(info_cmd.collect(FakeNvml()))


def test_kdvfs_reset_restores_to_the_site_clocks(shared_fake, monkeypatch):
    fake, path = shared_fake
    monkeypatch.setenv("KDVFS_WATCHDOG", "0")
    proc = start_training(path, 1500, 2619)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    proc.communicate(timeout=10)
    monkeypatch.setenv("KDVFS_RESTORE_CLOCKS", "1410/1593")
    res = kdvfs(path, "reset", "--json")
    assert res.returncode == 0, res.stderr
    g = fake.gpu_state(0)
    assert g["sm_locked"] == [1410, 1410] and g["mem_locked"] == [1593, 1593]
