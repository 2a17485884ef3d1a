"""Issue 20, kdvfsd: no input ends the service, lines are capped whole, connections are limited
per user, accept() failures back off, refusals are audited at a bounded rate, a set applies all
its clocks or none and only supported ones, a run refused as busy closes cleanly, and kdvfsd and
direct NVML runs never drive one GPU at once.

End-to-end cases run a real service process (``service`` from test_kdvfsd); an unlisted user is a
connection made with another effective uid (tests run as root). Unit cases drive an in-process
server on the fake NVML.
"""
from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import socket
import tempfile
import time
from pathlib import Path

import pytest

from kdvfs_plugins import KdvfsConfig
from kdvfs_plugins.clocks import ClockPair
from kdvfs_plugins.config import default_state_dir
from kdvfs_plugins.devices import NvmlDevice
from kdvfs_plugins.devices.base import HostMarker
from kdvfs_plugins.devices.service import ServiceNvmlDevice
from kdvfs_plugins.engine import Engine
from kdvfs_plugins.errors import GpuBusyError, InvalidClockError
from kdvfs_plugins.guard import ClockGuard, state_paths
from kdvfs_plugins.kdvfsd import ServiceError, ServiceGpuBusyError
from kdvfs_plugins.kdvfsd import protocol as P
from kdvfs_plugins.kdvfsd.config import config_from_dict
from kdvfs_plugins.kdvfsd.server import ACCEPT_BACKOFF_MIN_S, KdvfsdServer, Peer, Session

from fakes.fake_nvml import NVMLError, FakeNvml
from test_kdvfsd import GPU0, GPU1, UID, kill, service, start_client, unlocked, wait_for  # noqa: F401 (fixture)

STRANGER = 12345  # a uid the config does not list


@pytest.fixture
def sock_dir():
    """A socket directory that another uid can reach (pytest's own tmp dirs are root-only)."""
    d = tempfile.mkdtemp(prefix="kdvfsd-test-")
    os.chmod(d, 0o755)
    yield Path(d)
    shutil.rmtree(d, ignore_errors=True)


def connect_as(uid: int, path: str) -> socket.socket:
    """A connection whose kernel-reported peer uid is ``uid`` (SO_PEERCRED takes the effective uid)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(5)
    os.seteuid(uid)
    try:
        sock.connect(path)
    finally:
        os.seteuid(0)
    return sock


def ask(sock: socket.socket, line: bytes) -> dict:
    with contextlib.suppress(BrokenPipeError):  # a refused connection was answered and closed already
        sock.sendall(line)
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = sock.recv(65536)
        if not chunk:
            break
        buf += chunk
    return json.loads(buf.split(b"\n")[0]) if buf else {}


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------------------------- no input ends it
@pytest.mark.parametrize("line", [b"[" * 1000, b"{" * 1000, b'{"op":"set","gpu":' + b"[" * 400 + b"]" * 400 + b"}"],
                         ids=["lists", "objects", "inside-a-request"])
def test_a_deep_json_line_from_an_unlisted_user_gets_bad_request_and_the_service_stays_up(service, sock_dir, line):
    svc = service(socket_path=str(sock_dir / "kdvfsd.sock"))
    victim = svc.client()
    victim.set_clocks(GPU0, 1410, 1593)
    attacker = connect_as(STRANGER, svc.socket_path)
    try:
        assert len(line) < P.MAX_LINE_BYTES
        answer = ask(attacker, line + b"\n")
        assert answer["ok"] is False and answer["error"] == "bad_request"
        assert ask(attacker, b'{"op":"hello"}\n')["error"] == "not_allowed"  # still connected, still refused
    finally:
        attacker.close()
    assert svc.proc.poll() is None, svc.stop()
    g = svc.gpu(0)
    assert g["sm_locked"] == [1410, 1410] and g["mem_locked"] == [1593, 1593]  # the other session keeps its clocks
    victim.set_clocks(GPU0, 1395, 1593)
    victim.close()


def test_a_whole_line_longer_than_the_cap_is_refused(service):
    svc = service()
    raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    raw.settimeout(5)
    raw.connect(svc.socket_path)
    raw.sendall(b'{"op":"hello","pad":"' + b"x" * 60_000 + b'"}\n')  # arrives whole, newline and all
    reply = b""
    while True:
        chunk = raw.recv(65536)
        if not chunk:
            break
        reply += chunk
    raw.close()
    assert json.loads(reply)["error"] == "bad_request" and b"longer than 1024 bytes" in reply
    with svc.client() as c:
        c.set_clocks(GPU0, 1410, 2619)


# ---------------------------------------------------------------------------------- connections and the audit log
def test_connections_are_limited_per_user(service, sock_dir):
    svc = service(socket_path=str(sock_dir / "kdvfsd.sock"), limits={"connections_per_user": 3})
    mine = [svc.client() for _ in range(3)]
    for c in mine:
        c.hello()
    with pytest.raises(ServiceError, match="already has 3 connections open"):
        svc.client().hello()
    strangers = [connect_as(STRANGER, svc.socket_path) for _ in range(4)]
    try:
        answers = [ask(s, b'{"op":"hello"}\n') for s in strangers]
        # An unlisted user keeps two connections: enough to learn that it is not listed.
        assert [a["error"] for a in answers] == ["not_allowed", "not_allowed", "too_many_connections",
                                                 "too_many_connections"]
    finally:
        for s in strangers:
            s.close()
    mine[0].close()
    c = svc.client()
    c.set_clocks(GPU0, 1410, 2619)  # a slot freed by a close is served again
    for x in [c, *mine[1:]]:
        x.close()


def test_out_of_descriptors_the_service_does_not_spin(service):
    # A file limit of 200: the old service accepted until EMFILE, then spun on the readable listener.
    svc = service(preexec=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (200, 200)))
    held = []
    try:
        for _ in range(150):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(svc.socket_path)
            held.append(s)
        time.sleep(0.3)
        before = cpu_s(svc.proc.pid)
        time.sleep(1.0)
        used = cpu_s(svc.proc.pid) - before
        assert used < 0.2, f"the service used {used:.2f} s of CPU in 1 s while 150 connections were held"
    finally:
        for s in held:
            s.close()
    assert wait_for(lambda: svc.proc.poll() is None and len(svc.log) < 40, 1.0) is not None, "".join(svc.log[-5:])
    with svc.client() as c:
        c.set_clocks(GPU0, 1410, 2619)
    log = svc.stop()
    assert log.count("accept failed") < 10, log[-2000:]


def test_refusals_are_audited_at_a_bounded_rate(service, sock_dir):
    svc = service(socket_path=str(sock_dir / "kdvfsd.sock"))
    s = connect_as(STRANGER, svc.socket_path)
    s.sendall(b'{"op":"hello"}\n' * 3000)
    time.sleep(0.3)
    s.close()
    for _ in range(30):
        connect_as(STRANGER, svc.socket_path).close()
    svc.stop()
    mine = [r for r in svc.audit() if r["uid"] == STRANGER]
    assert 0 < len(mine) <= 60, f"{len(mine)} audit lines for one unlisted user"
    assert sum(r.get("suppressed", 0) for r in mine) > 0 or len(mine) < 30
    assert svc.audit_path.stat().st_size < 20_000


# ---------------------------------------------------------------------------------- all clocks or none
def test_a_set_with_an_invalid_sm_clock_leaves_the_memory_clock_alone(service):
    svc = service()
    with svc.client() as c:
        with pytest.raises(InvalidClockError, match="rejected SM clock 1411 MHz.*nearest 1410 MHz"):
            c.set_clocks(GPU0, 1411, 1593)
        assert svc.gpu(0)["mem_locked"] is None and svc.gpu(0)["writes"] == 0
        c.set_clocks(GPU0, 1410, 2619)
        with pytest.raises(InvalidClockError, match="rejected memory clock 1600 MHz"):
            c.set_clocks(GPU0, 1395, 1600)
        assert svc.gpu(0)["sm_locked"] == [1410, 1410] and svc.gpu(0)["mem_locked"] == [2619, 2619]


# ---------------------------------------------------------------------------------- in-process server
class PermissiveNvml(FakeNvml):
    """A driver that takes any clock in range: NVML documents no support check for locked clocks."""

    def nvmlDeviceSetGpuLockedClocks(self, h, min_mhz, max_mhz):
        self._write(h, "sm_locked", [min_mhz, max_mhz])

    def nvmlDeviceSetMemoryLockedClocks(self, h, min_mhz, max_mhz):
        self._write(h, "mem_locked", [min_mhz, max_mhz])


class FailingSmNvml(FakeNvml):
    """The SM lock fails (an unknown driver error) after the memory lock went through."""

    def nvmlDeviceSetGpuLockedClocks(self, h, min_mhz, max_mhz):
        raise NVMLError(999)


@contextlib.contextmanager
def in_process(tmp_path, nvml=None, **cfg):
    config = config_from_dict({"socket_path": str(tmp_path / "s.sock"), "audit_log": str(tmp_path / "audit.log"),
                               "state_dir": str(tmp_path / "state"), "users": {str(UID): ["*"]}, **cfg}, "test")
    server = KdvfsdServer(config, nvml=nvml or FakeNvml(gpus=2))
    try:
        yield server
    finally:
        for s in list(server.sessions):
            server._end(s, "test over")
        server.audit.close()
        server.sel.close()


def session(server, uid=UID):
    a, b = socket.socketpair()
    s = Session(a, Peer(os.getpid(), uid, os.getgid()), server.gpus_for(uid, os.getgid()), server.config.rate_limit.burst)
    server.sessions.add(s)
    server.conns_by_uid[uid] = server.conns_by_uid.get(uid, 0) + 1
    return s, b


def set_line(gpu, sm, mem):
    return P.set_request(gpu, sm, mem).rstrip(b"\n")


def test_clocks_are_checked_against_the_supported_lists(tmp_path):
    fake = PermissiveNvml(gpus=2)
    with in_process(tmp_path, fake) as server:
        s, _peer = session(server)
        answer = json.loads(server._handle(s, set_line(GPU0, 1411, 1593)))
        assert answer["error"] == "invalid_clock" and "nearest 1410 MHz" in answer["message"]
        answer = json.loads(server._handle(s, set_line(GPU0, 1410, 1600)))
        assert answer["error"] == "invalid_clock" and "2619, 1593 MHz" in answer["message"]
        assert fake.gpu_state(0)["writes"] == 0 and GPU0 not in server.owners  # no claim either
        assert server._handle(s, set_line(GPU0, 1410, 1593)) == P.OK_LINE


def test_a_failed_sm_lock_puts_the_memory_lock_back(tmp_path):
    fake = FailingSmNvml(gpus=2)
    with in_process(tmp_path, fake) as server:
        s, _peer = session(server)
        answer = json.loads(server._handle(s, set_line(GPU0, 1410, 1593)))
        assert answer["error"] == "device_error"
        assert fake.gpu_state(0)["mem_locked"] is None  # as before the request
        server._handle(s, b'{"op":"reset","gpu":"%s"}' % GPU0.encode())
        fake.nvmlDeviceSetMemoryLockedClocks(server.by_uuid[GPU0].handle, 2619, 2619)  # locked by an earlier set
        s.owned[GPU0] = 2619
        server._handle(s, set_line(GPU0, 1410, 1593))
        assert fake.gpu_state(0)["mem_locked"] == [2619, 2619] and s.owned[GPU0] == 2619


def test_accept_failures_pause_the_listener_with_a_growing_back_off(tmp_path, caplog):
    class Exhausted:
        def accept(self):
            raise OSError(24, "Too many open files")

        def fileno(self):
            return listener.fileno()

    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / "l.sock"))
    listener.listen(1)
    with in_process(tmp_path) as server:
        server.listener = Exhausted()
        server.sel.register(server.listener, 1, (server._accept, None))
        with caplog.at_level("INFO", logger="kdvfsd"):
            for _ in range(5):
                server._accept(None)
                assert server.listener not in [k.fileobj for k in server.sel.get_map().values()]
                server._resume_accept()
        assert server._accept_backoff_s == ACCEPT_BACKOFF_MIN_S * 32
        assert sum("accept failed" in r.getMessage() for r in caplog.records) == 1  # one line a second
        server.sel.unregister(server.listener)
        server.listener = None
    listener.close()


def test_an_exception_while_serving_one_client_ends_only_that_session(tmp_path):
    with in_process(tmp_path) as server:
        good, _g = session(server)
        assert server._handle(good, set_line(GPU1, 1410, 2619)) == P.OK_LINE
        bad, _b = session(server)
        server.sel.register(bad.sock, 1, (server._on_readable, bad))
        _b.sendall(b'{"op":"hello"}\n')
        server._handle = None  # any bug in a handler
        for key, _ in server.sel.select(1.0):
            handler, sess = key.data
            try:
                handler(sess)
            except Exception as exc:  # what serve_forever does
                server._internal_error(sess, exc)
        assert bad.closed and not good.closed and server.owners[GPU1] is good


# ---------------------------------------------------------------------------------- a run that cannot get the GPU
def test_a_run_refused_as_busy_closes_without_error_or_state_file(service, tmp_path):
    svc = service()
    owner = start_client(svc, GPU0, 1410, 1593)
    try:
        dev = ServiceNvmlDevice(0, nvml=FakeNvml(state_path=svc.fake_state), socket_path=svc.socket_path,
                                marker_factory=HostMarker)
        cfg = KdvfsConfig.from_dict({"mode": "apply", "device": "nvml", "run_dir": str(tmp_path / "run"),
                                     "region_clocks": {"forward": [1500, 2619], "backward": [1395, 2619]}})
        eng = Engine(cfg, device=dev).start()
        for step in range(5):
            eng.step_begin(step)
            eng.region_enter("forward")
            eng.region_exit("forward")
            eng.region_enter("backward")
            eng.region_exit("backward")
            eng.step_end()
        eng.close()  # raised ServiceGpuBusyError before
        assert not state_paths(default_state_dir(), GPU0)[1].exists()
        assert svc.gpu(0)["sm_locked"] == [1410, 1410]  # the owner's clocks
        # After the first refusal the run stops asking for a while (no record written per change).
        wait_for(lambda: any(r["op"] == "set" and r["pid"] == os.getpid() for r in svc.audit()), 3.0)
        asked = [r for r in svc.audit() if r["pid"] == os.getpid() and r["op"] == "set"]
        assert [r["result"] for r in asked] == ["busy"]
    finally:
        kill(owner)


def test_an_audit_log_that_cannot_be_written_does_not_stop_the_service(service):
    svc = service(audit_log="/dev/full")  # every write fails with ENOSPC
    with svc.client() as c:
        c.set_clocks(GPU0, 1410, 2619)
        c.set_clocks(GPU0, 1395, 1593)
    assert wait_for(lambda: unlocked(svc), 2.0) is not None  # the session's end still restored
    assert svc.proc.poll() is None
    with svc.client() as c:
        c.hello()
    assert "lines are being lost" in svc.stop()


# ---------------------------------------------------------------------------------- kdvfsd and direct runs
def test_kdvfsd_and_a_direct_run_never_drive_one_gpu(service):
    svc = service()
    local = FakeNvml(state_path=svc.fake_state)
    with svc.client() as c:
        c.set_clocks(GPU0, 1410, 1593)
        direct = ClockGuard(NvmlDevice(0, nvml=local, marker_factory=HostMarker), default_state_dir(),
                            handle_signals=False)
        with pytest.raises(GpuBusyError, match=f"process {svc.proc.pid}"):
            direct.acquire()
        assert svc.gpu(0)["sm_locked"] == [1410, 1410]
        # The other way round: a direct run holds GPU 1, the service refuses it.
        direct1 = ClockGuard(NvmlDevice(1, nvml=local, marker_factory=HostMarker), default_state_dir(),
                             handle_signals=False)
        direct1.acquire()
        direct1.write(lambda: direct1.device.set_clocks(ClockPair(1500, 2619)))
        with pytest.raises(ServiceGpuBusyError, match="driven directly through NVML") as err:
            c.set_clocks(GPU1, 1410, 1593)
        assert err.value.owner_pid == os.getpid()
        assert svc.gpu(1)["sm_locked"] == [1500, 1500]
        direct1.release()
        c.set_clocks(GPU1, 1410, 1593)  # free again
    assert wait_for(lambda: unlocked(svc, 0) and unlocked(svc, 1), 2.0) is not None


# ---------------------------------------------------------------------------------- restart, restore clocks
def test_a_site_configures_the_clocks_kdvfsd_restores(service):
    svc = service(restore_clocks={"*": [1410, 1593]})
    with svc.client() as c:
        c.set_clocks(GPU0, 1500, 2619)
        c.reset(GPU0)
        assert svc.gpu(0)["sm_locked"] == [1410, 1410] and svc.gpu(0)["mem_locked"] == [1593, 1593]
        c.set_clocks(GPU0, 1500, 2619)
    assert wait_for(lambda: svc.gpu(0)["sm_locked"] == [1410, 1410], 2.0) is not None
    assert svc.gpu(0)["mem_locked"] == [1593, 1593]


def test_unsupported_restore_clocks_stop_the_service_with_a_clear_error(tmp_path, caplog):
    from kdvfs_plugins.kdvfsd.server import main

    cfg = tmp_path / "k.json"
    cfg.write_text(json.dumps({"socket_path": str(tmp_path / "s.sock"), "audit_log": None, "state_dir": None,
                               "restore_clocks": {"0": [1411, 1593]}}))
    with caplog.at_level("ERROR", logger="kdvfsd"):
        assert main(["--config", str(cfg), "--check"], nvml=FakeNvml()) == 2
    assert any("restore_clocks: 1411/1593 MHz: rejected SM clock 1411 MHz" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("record", ["[]", "null", "{bad", json.dumps({"gpu": GPU0, "pid": 1, "boot_id": "earlier"})])
def test_claim_records_that_are_odd_or_from_an_earlier_boot_are_forgotten(service, tmp_path, record):
    svc = service()
    svc.stop()
    svc.fake.lock(0, 1410, 1593)  # an administrator's lock after the reboot
    state = Path(svc.config["state_dir"])
    (state / "claim-GPU-fake-0000.json").write_text(record)
    svc.start()  # a list crashed the start before
    assert svc.gpu(0)["sm_locked"] == [1410, 1410]
    assert not (state / "claim-GPU-fake-0000.json").exists()
