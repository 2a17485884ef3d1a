"""kdvfsd: a real service process on a Unix socket in a tmp dir, on the fake NVML (state file).

Tests run as root, so "a user outside the allowed set" is made by leaving this uid (and its
groups) out of the config. Every service a test starts is stopped by the test's fixture.
"""
from __future__ import annotations

import grp
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from kdvfs_plugins.clocks import ClockPair
from kdvfs_plugins.devices.service import ServiceNvmlDevice, probe_service, service_socket_path
from kdvfs_plugins.errors import DeviceUnavailableError, GpuBusyError, InvalidClockError, NoPermissionError
from kdvfs_plugins.kdvfsd import (
    KdvfsdClient, RateLimitedError, ServiceError, ServiceGpuBusyError, ServiceNotAllowedError, ServiceNotRunningError,
)
from kdvfs_plugins.kdvfsd.config import ServiceConfigError, config_from_dict, load_config
from fakes.fake_nvml import FakeNvml
from fakes.procs import ROOT, shim_env

GPU0, GPU1 = "GPU-fake-0000", "GPU-fake-0001"
UID = os.getuid()


class Service:
    """One kdvfsd process with its own socket, audit log, state dir and fake GPUs."""

    def __init__(self, tmp: Path, gpus: int = 2, **config):
        self.tmp = tmp
        tmp.mkdir(exist_ok=True)
        self.fake_state = tmp / "fake-nvml.json"
        self.fake = FakeNvml(gpus=gpus, state_path=self.fake_state)
        self.socket_path = str(tmp / "kdvfsd.sock")
        self.audit_path = tmp / "audit.log"
        self.config = {
            "socket_path": self.socket_path, "audit_log": str(self.audit_path), "state_dir": str(tmp / "state"),
            "users": {str(UID): ["*"]},
        }
        self.config.update(config)
        self.socket_path = self.config["socket_path"]
        self.proc: subprocess.Popen | None = None
        #: Run in the service's process before it starts (a lower file limit, say).
        self.preexec = None

    def start(self) -> "Service":
        cfg = self.tmp / "kdvfsd.json"
        cfg.write_text(json.dumps(self.config))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kdvfs_plugins.kdvfsd", "--config", str(cfg)],
            env=shim_env(self.fake_state), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            preexec_fn=self.preexec,
        )
        # The service logs "listening on" once it accepts connections; a reader thread drains its log.
        self.log: list[str] = []
        ready = threading.Event()

        def read(stream=self.proc.stderr, log=self.log):
            for line in stream:
                log.append(line)
                if "listening on" in line:
                    ready.set()
            ready.set()

        self._reader = threading.Thread(target=read, daemon=True)
        self._reader.start()
        if not ready.wait(15) or self.proc.poll() is not None:
            err = self.stop()
            raise AssertionError(f"kdvfsd did not start:\n{err}")
        return self

    def stop(self, sig=signal.SIGTERM) -> str:
        """Stop the service; returns its log."""
        if self.proc is None:
            return ""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self._reader.join(timeout=10)
        self.proc.stderr.close()
        self.proc = None
        return "".join(self.log)

    def client(self, **kw) -> KdvfsdClient:
        return KdvfsdClient(self.socket_path, **kw)

    def gpu(self, i: int = 0) -> dict:
        return self.fake.gpu_state(i)

    def audit(self) -> list[dict]:
        if not self.audit_path.exists():
            return []
        return [json.loads(line) for line in self.audit_path.read_text().splitlines() if line.strip()]


@pytest.fixture
def service(tmp_path):
    """Factory: ``service(**config)`` starts one; all are stopped at the end of the test."""
    started: list[Service] = []

    def make(gpus: int = 2, preexec=None, **config) -> Service:
        s = Service(tmp_path / f"svc{len(started)}", gpus, **config)
        s.preexec = preexec
        started.append(s)
        return s.start()

    yield make
    for s in started:
        s.stop(signal.SIGKILL if s.proc is not None and s.proc.poll() is None else signal.SIGTERM)


def wait_for(predicate, timeout_s: float, poll_s: float = 0.001):
    """Poll ``predicate`` until true; returns the seconds it took, or None on timeout."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if predicate():
            return time.monotonic() - t0
        time.sleep(poll_s)
    return None


def unlocked(svc: Service, i: int = 0) -> bool:
    g = svc.gpu(i)
    return g["sm_locked"] is None and g["mem_locked"] is None


# A client in its own process: sets clocks, says so, then waits to be killed.
CLIENT = """
import sys, time
from kdvfs_plugins.kdvfsd import KdvfsdClient
c = KdvfsdClient(sys.argv[1])
c.set_clocks(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
print("SET", flush=True)
time.sleep(30)
"""


def start_client(svc: Service, gpu: str = GPU0, sm_mhz: int = 1410, mem_mhz: int = 1593) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", CLIENT, svc.socket_path, gpu, str(sm_mhz), str(mem_mhz)],
                            env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline().strip()
    if line != "SET":
        proc.kill()
        raise AssertionError(f"client failed: {proc.communicate(timeout=10)[1]}")
    return proc


def kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.communicate(timeout=10)


# ---------------------------------------------------------------------------------- session restore
def test_sigkill_of_the_client_restores_clocks_within_100_ms(service):
    svc = service()
    proc = start_client(svc, sm_mhz=1410, mem_mhz=1593)
    assert svc.gpu(0)["sm_locked"] == [1410, 1410] and svc.gpu(0)["mem_locked"] == [1593, 1593]
    t0 = time.monotonic()
    os.kill(proc.pid, signal.SIGKILL)
    took = wait_for(lambda: unlocked(svc), timeout_s=2.0)
    kill(proc)
    assert took is not None, f"clocks still locked 2 s after SIGKILL: {svc.gpu(0)}"
    assert time.monotonic() - t0 < 2.0 and took < 0.100, f"restored after {took * 1e3:.1f} ms"
    # The GPU is free again for the next session.
    with svc.client() as c:
        c.set_clocks(GPU0, 1395, 2619)


def test_process_death_restores_even_if_a_child_holds_the_connection(service):
    """The service watches the client process itself: a forked child that inherited the socket
    (a data loader worker, say) does not keep the GPU locked after the parent dies."""
    svc = service()
    script = """
import socket, subprocess, sys, time
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])
s.sendall(b'{"op":"set","gpu":"GPU-fake-0000","sm_mhz":1410,"mem_mhz":2619}\\n'); s.recv(100)
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"], pass_fds=[s.fileno()],\n                         stdout=subprocess.DEVNULL)
print(child.pid, flush=True)
time.sleep(30)
"""
    proc = subprocess.Popen([sys.executable, "-c", script, svc.socket_path], stdout=subprocess.PIPE, text=True)
    holder_pid = int(proc.stdout.readline())
    try:
        assert svc.gpu(0)["sm_locked"] == [1410, 1410]
        os.kill(proc.pid, signal.SIGKILL)
        took = wait_for(lambda: unlocked(svc), timeout_s=2.0)
        assert took is not None and took < 0.100, f"not restored while a child holds the socket ({took})"
    finally:
        kill(proc)
        os.kill(holder_pid, signal.SIGKILL)
        wait_for(lambda: not Path(f"/proc/{holder_pid}").exists() or _zombie(holder_pid), 5.0, 0.01)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] == "Z"
    except OSError:
        return True


def test_close_restores_and_release_frees_the_gpu(service):
    svc = service()
    a = svc.client()
    a.set_clocks(GPU0, 1410, 2619)
    a.release(GPU0)
    assert unlocked(svc)
    with svc.client() as b:  # released: another session may take it while ``a`` lives on
        b.set_clocks(GPU0, 1395, 2619)
        b.reset(GPU0)  # unlocks, keeps ownership
        assert unlocked(svc)
        b.set_clocks(GPU0, 1380, 1593)
        assert svc.gpu(0)["mem_locked"] == [1593, 1593]
        with pytest.raises(ServiceGpuBusyError):
            a.set_clocks(GPU0, 1410, 2619)
    assert wait_for(lambda: unlocked(svc), 2.0) is not None
    a.close()


def test_sigterm_of_the_service_restores_every_gpu_and_removes_the_socket(service):
    svc = service()
    c = svc.client()
    c.set_clocks(GPU0, 1410, 2619)
    c.set_clocks(GPU1, 1395, 1593)
    err = svc.stop()
    assert unlocked(svc, 0) and unlocked(svc, 1), err
    assert not Path(svc.socket_path).exists()
    with pytest.raises(ServiceError, match="lost the connection"):
        c.set_clocks(GPU0, 1410, 2619)  # the broken connection is dropped ...
    with pytest.raises(ServiceNotRunningError):
        c.set_clocks(GPU0, 1410, 2619)  # ... and a reconnect finds no service
    c.close()


def test_a_restarted_service_resets_what_a_killed_service_left_locked(service, tmp_path):
    svc = service()
    c = svc.client()
    c.set_clocks(GPU0, 1410, 2619)
    svc.stop(signal.SIGKILL)  # no chance to restore
    c.close()
    assert svc.gpu(0)["sm_locked"] == [1410, 1410]
    svc.start()  # the claim record in state_dir names the GPU
    assert unlocked(svc)
    assert any(r["op"] == "restore_after_restart" and r["gpu"] == GPU0 for r in svc.audit())


# ---------------------------------------------------------------------------------- ownership and access
def test_a_second_session_for_the_same_gpu_is_refused_naming_the_owner_pid(service):
    svc = service()
    owner = start_client(svc)
    try:
        with svc.client() as c:
            with pytest.raises(ServiceGpuBusyError) as exc:
                c.set_clocks(GPU0, 1395, 2619)
            assert isinstance(exc.value, GpuBusyError)
            assert exc.value.owner_pid == owner.pid
            assert f"process {owner.pid}" in str(exc.value) and "observe" in str(exc.value)
            with pytest.raises(ServiceGpuBusyError):
                c.reset(GPU0)  # a reset is a write too
            c.set_clocks(GPU1, 1395, 2619)  # another GPU is free
    finally:
        kill(owner)
    assert svc.gpu(0)["sm_locked"] is None or wait_for(lambda: unlocked(svc), 2.0) is not None


def test_a_user_outside_the_allowed_set_is_refused(service):
    svc = service(users={str(UID + 4242): ["*"]}, groups={})
    with svc.client() as c:
        with pytest.raises(ServiceNotAllowedError) as exc:
            c.hello()
        assert isinstance(exc.value, NoPermissionError)  # kdvfs falls back to observe on it
        assert f"uid {UID}" in str(exc.value) and "observe" in str(exc.value)
        with pytest.raises(ServiceNotAllowedError):
            c.set_clocks(GPU0, 1410, 2619)
    assert svc.gpu(0)["writes"] == 0
    usable, why = probe_service(svc.socket_path)
    assert not usable and f"uid {UID}" in why


def test_a_group_entry_allows_its_members(service):
    svc = service(users={}, groups={str(os.getgid()): [0]})
    with svc.client() as c:
        assert c.hello().gpus == (GPU0,)
        c.set_clocks(GPU0, 1410, 2619)


def test_the_gpu_allow_list_is_enforced(service):
    svc = service(users={str(UID): [0]})
    with svc.client() as c:
        assert c.hello().gpus == (GPU0,)
        with pytest.raises(ServiceNotAllowedError) as exc:
            c.set_clocks(GPU1, 1410, 2619)
        assert GPU1 in str(exc.value) and GPU0 in str(exc.value)
        with pytest.raises(ServiceNotAllowedError):
            c.reset(GPU1)
        with pytest.raises(DeviceUnavailableError, match="no GPU with UUID"):
            c.set_clocks("GPU-not-here", 1410, 2619)
        c.set_clocks(GPU0, 1410, 2619)
    assert svc.gpu(1)["writes"] == 0
    # By UUID as well as by index.
    svc2 = service(users={str(UID): [GPU1]})
    with svc2.client() as c:
        assert c.hello().gpus == (GPU1,)


def test_the_rate_limit_triggers_with_a_clear_error(service):
    svc = service(rate_limit={"requests_per_s": 2, "burst": 5})
    with svc.client() as c:
        for i in range(5):
            c.set_clocks(GPU0, 1410 if i % 2 else 1395, 2619)
        with pytest.raises(RateLimitedError, match=r"rate limit of 2 requests/s \(burst 5\)"):
            c.set_clocks(GPU0, 1380, 2619)
        time.sleep(0.6)  # one token back
        c.set_clocks(GPU0, 1380, 2619)
    assert wait_for(lambda: any(r["op"] == "disconnect" for r in svc.audit()), 2.0) is not None
    assert sum(r["op"] == "rate_limited" for r in svc.audit()) == 1


def test_invalid_clocks_and_bad_requests_get_clear_errors(service):
    svc = service()
    with svc.client() as c:
        with pytest.raises(InvalidClockError, match="rejected"):
            c.set_clocks(GPU0, 1411, 2619)
    raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    raw.settimeout(5)
    raw.connect(svc.socket_path)
    raw.sendall(b"not json\n")
    assert json.loads(raw.recv(4096))["error"] == "bad_request"
    raw.sendall(b'{"op":"set","gpu":"GPU-fake-0000","sm_mhz":"fast","mem_mhz":2619}\n')
    assert json.loads(raw.recv(4096))["error"] == "bad_request"
    raw.sendall(b"x" * 5000)  # no newline, over the limit: the service hangs up
    reply = raw.recv(4096)
    assert b"longer than" in reply and raw.recv(4096) == b""
    raw.close()
    with svc.client() as c:  # still serving
        c.set_clocks(GPU0, 1410, 2619)


def test_the_audit_log_records_who_set_what_when(service):
    svc = service()
    c = svc.client()
    c.set_clocks(GPU0, 1410, 2619)
    c.set_clocks(GPU0, 1395, 1593)
    pid = c.hello().pid
    c.close()
    assert wait_for(lambda: any(r["op"] == "disconnect" for r in svc.audit()), 2.0) is not None
    recs = [r for r in svc.audit() if r["pid"] == pid]
    assert pid == os.getpid()
    ops = [r["op"] for r in recs]
    assert ops == ["connect", "claim", "set", "set", "restore", "disconnect"], ops
    sets = [r for r in recs if r["op"] == "set"]
    assert [(r["gpu"], r["sm_mhz"], r["mem_mhz"], r["uid"], r["result"]) for r in sets] == [
        (GPU0, 1410, 2619, UID, "ok"), (GPU0, 1395, 1593, UID, "ok")]
    assert all(r["time"].endswith("Z") for r in recs)
    restore = next(r for r in recs if r["op"] == "restore")
    assert restore["result"] == "ok" and restore["why"] == "connection closed"


# ---------------------------------------------------------------------------------- client and device
def test_service_not_running_says_how_to_start_it(tmp_path):
    with pytest.raises(ServiceNotRunningError, match="systemctl start kdvfsd") as exc:
        KdvfsdClient(str(tmp_path / "none.sock")).hello()
    assert isinstance(exc.value, DeviceUnavailableError)
    assert probe_service(str(tmp_path / "none.sock"))[0] is False


def test_service_device_sets_clocks_through_the_service(service, monkeypatch):
    svc = service()
    monkeypatch.setenv("KDVFSD_SOCKET", svc.socket_path)
    assert service_socket_path() == svc.socket_path
    assert probe_service(svc.socket_path)[0] is True
    local = FakeNvml(state_path=svc.fake_state)  # this process's own NVML, for readings
    dev = ServiceNvmlDevice(0, nvml=local)
    try:
        assert dev.kind == "nvml" and dev.info().can_write_clocks and dev.info().uuid == GPU0
        dev.set_clocks(ClockPair(1410, 1593))
        assert svc.gpu(0)["sm_locked"] == [1410, 1410] and svc.gpu(0)["mem_locked"] == [1593, 1593]
        assert dev.current_clocks() == ClockPair(1410, 1593)  # read locally
        assert not [c for c in local.calls if c[0] in ("sm_locked", "mem_locked")], "writes must not be local"
        with pytest.raises(InvalidClockError):
            dev.set_clocks(ClockPair(1411, 1593))  # refused before any round trip
        dev.reset_clocks()
        assert unlocked(svc)
        dev.set_clocks(ClockPair(1395, 2619))
    finally:
        dev.close()
    assert wait_for(lambda: unlocked(svc), 2.0) is not None  # closing the device ended the session


# ---------------------------------------------------------------------------------- configuration
def test_config_files_are_validated(tmp_path, monkeypatch):
    toml = tmp_path / "kdvfsd.toml"
    toml.write_text('socket_path = "/run/x.sock"\nsocket_mode = "0660"\n[users]\n"1001" = [0, "GPU-a"]\n'
                    '[rate_limit]\nrequests_per_s = 50\nburst = 10\n')
    cfg = load_config(toml)
    assert cfg.users == {1001: (0, "GPU-a")} and cfg.socket_mode == 0o660 and cfg.rate_limit.burst == 10
    # The example names a group the administrator creates (docs/kdvfsd.md).
    real_getgrnam = grp.getgrnam
    monkeypatch.setattr(grp, "getgrnam", lambda n: grp.struct_group(("kdvfs", "x", 4321, [])) if n == "kdvfs"
                        else real_getgrnam(n))
    example = load_config(ROOT / "examples" / "kdvfsd.toml")
    assert example.socket_path == "/run/kdvfsd.sock" and example.groups == {4321: ("*",)}
    for bad, key in [({"sockt_path": "x"}, "sockt_path"), ({"socket_mode": "0666"}, "socket_mode"),
                     ({"users": {"no-such-user-kdvfs": ["*"]}}, "users.no-such-user-kdvfs"),
                     ({"users": {"0": []}}, "users.0"), ({"rate_limit": {"burst": 0}}, "rate_limit")]:
        with pytest.raises(ServiceConfigError, match=key):
            config_from_dict(bad, "test")
