"""kdvfsd, the clock service: a root daemon that sets GPU clocks for allowed users.

One thread, one ``selectors`` loop, no locks: requests are tiny and each is a couple of NVML
calls, so serving them in turn is both the fastest and the easiest to audit. The loop watches

- the listening Unix socket (new clients; identified by SO_PEERCRED: pid, uid, gid),
- each client's connection (requests; EOF ends the session),
- each client's process through a pidfd where the kernel has them (the process's death ends the
  session even if a forked child still holds a copy of the connection),
- a wake-up pipe for signals (SIGTERM/SIGINT stop, SIGHUP reopens the audit log).

No input may end it: a request line is bounded (length and nesting) before it is parsed, and
an exception while serving one client ends that client's session only. Connections are limited
per uid and in all; when accept() fails (out of descriptors) the listener pauses with a growing
back-off instead of spinning; refusals are audited at a bounded rate per uid.

A set is checked against the GPU's supported clock lists, then applied whole or not at all: if
the SM lock fails after the memory lock, the memory lock is put back. A session that claims a
GPU also takes its system-wide lock (:mod:`kdvfs_plugins.ownership`), so kdvfsd and runs that
write through NVML themselves never drive one GPU at once.

A session owns a GPU from its first write to it until the session ends; then the service resets
the locked SM and memory clocks at once. NVML cannot report whether clocks are locked, so the
state a session starts from is taken to be "unlocked" (the driver's default), which is what the
restore returns to; the clocks read at the claim go into the audit log.

Python stdlib only, plus ``pynvml`` (injectable: ``KdvfsdServer(config, nvml=...)``).
"""
from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import pwd
import resource
import selectors
import signal
import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional

from ..ownership import GpuLockedElsewhere, boot_id, check_private_dir, lock_gpu, read_json, write_json
from . import protocol as P
from .config import (
    ALL_GPUS, DEFAULT_CONFIG_PATH, UNLISTED_CONNECTIONS_PER_USER, ServiceConfig, ServiceConfigError, load_config,
)

log = logging.getLogger("kdvfsd")

_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
#: An audit line waits at most this long in the buffer (requests never wait for the disk).
AUDIT_FLUSH_S = 1.0
#: Refusals (unlisted users, bad requests, busy GPUs, too many connections) are audited per uid
#: at this sustained rate with this burst; the next line counts those left out (``suppressed``).
REFUSAL_AUDIT_PER_S = 5.0
REFUSAL_AUDIT_BURST = 20
#: After accept() fails (out of descriptors) the listener pauses, doubling up to the maximum.
ACCEPT_BACKOFF_MIN_S = 0.01
ACCEPT_BACKOFF_MAX_S = 1.0
#: Descriptors kept back from connections (listener, wake-up pair, audit log, locks, NVML).
FD_RESERVE = 64


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    gid: int


@dataclass(frozen=True)
class Gpu:
    index: int
    uuid: str
    handle: object
    #: memory clock -> the SM clocks supported with it (None: the lists could not be read)
    sm_by_mem: Optional[Mapping[int, frozenset]] = None
    #: (SM, memory) MHz a restore locks instead of unlocking (``restore_clocks``)
    restore: Optional[tuple[int, int]] = None


def _text(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _user_groups(uid: int, gid: int) -> set[int]:
    """The peer's primary gid plus the user's groups in the group database."""
    groups = {gid}
    try:
        groups.update(os.getgrouplist(pwd.getpwuid(uid).pw_name, gid))
    except (KeyError, OSError):
        pass
    return groups


class AuditLog:
    """JSON lines of who (uid, pid) did what (op, GPU, clocks) when, and with what result.

    Buffered: a request appends a line in memory; the loop flushes at most ``AUDIT_FLUSH_S`` later,
    and at once for claims, restores and session ends. No fsync: the log is for accountability,
    and a power loss also resets the GPUs.
    """

    def __init__(self, path: Optional[str]):
        self.path = path
        self._f = None
        self._dirty = False
        self._last_flush_s = time.monotonic()
        self._sec = -1
        self._sec_text = ""
        self._failed_s = -1e9
        self.reopen(first=True)

    def reopen(self, first: bool = False) -> None:
        """Open (again, after log rotation on SIGHUP). Only the first open may fail loudly: later,
        a log that cannot be written must not stop the service that restores the clocks."""
        if self._f is not None:
            try:
                self._f.close()
            except OSError as exc:
                self._failed(exc)
            self._f = None
        if self.path:
            try:
                p = Path(self.path)
                p.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
                fd = os.open(p, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o640)
                self._f = os.fdopen(fd, "a", buffering=1 << 16)
            except OSError as exc:
                if first:
                    raise
                self._failed(exc)

    def _failed(self, exc: OSError) -> None:
        now = time.monotonic()
        if now - self._failed_s >= 60.0:  # a full disk fails every write: say so once a minute
            self._failed_s = now
            log.error("audit log %s: %s; lines are being lost", self.path, exc)

    def _stamp(self) -> str:
        t = time.time()
        sec = int(t)
        if sec != self._sec:
            self._sec, self._sec_text = sec, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
        return f"{self._sec_text}.{int((t - sec) * 1e6):06d}Z"

    def record(self, peer: Optional[Peer], op: str, result: str, **fields) -> None:
        if self._f is None:
            return
        head = {"time": self._stamp(), "uid": peer.uid if peer else None, "pid": peer.pid if peer else None,
                "op": op, "result": result}
        try:
            self._f.write(json.dumps({**head, **fields}, separators=(",", ":")) + "\n")
        except OSError as exc:
            self._failed(exc)
        self._dirty = True

    def flush(self) -> None:
        if self._f is not None and self._dirty:
            try:
                self._f.flush()
            except OSError as exc:
                self._failed(exc)
            self._dirty = False
        self._last_flush_s = time.monotonic()

    def maybe_flush(self) -> None:
        if self._dirty and time.monotonic() - self._last_flush_s >= AUDIT_FLUSH_S:
            self.flush()

    def close(self) -> None:
        self.flush()
        if self._f is not None:
            try:
                self._f.close()
            except OSError as exc:
                self._failed(exc)
            self._f = None


class Session:
    """One client connection: who it is, what it may drive, what it owns."""

    __slots__ = ("sock", "peer", "user", "gpus", "owned", "buf", "tokens", "stamp_s", "limited", "pidfd", "closed",
                 "since")

    def __init__(self, sock: socket.socket, peer: Peer, gpus: Optional[frozenset], burst: int):
        self.sock = sock
        self.peer = peer
        self.user = _user_name(peer.uid)
        #: UUIDs this peer may drive; None: the peer is not allowed at all.
        self.gpus = gpus
        #: uuid -> memory clock this session last locked (None: not locked since the claim or a reset)
        self.owned: dict[str, Optional[int]] = {}
        self.buf = b""
        self.tokens = float(burst)
        self.stamp_s = time.monotonic()
        self.limited = False
        self.pidfd: Optional[int] = None
        self.closed = False
        self.since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class KdvfsdServer:
    """The daemon. ``open()`` binds the socket, ``serve_forever()`` runs until stopped, ``close()``
    restores every GPU still owned and removes the socket."""

    def __init__(self, config: ServiceConfig, nvml=None):
        if nvml is None:
            import pynvml as nvml
        self.config = config
        self.nvml = nvml
        self.nvml.nvmlInit()
        self.gpus = self._enumerate()
        self.by_uuid = {g.uuid: g for g in self.gpus}
        self.owners: dict[str, Session] = {}
        self.sessions: set[Session] = set()
        self.audit = AuditLog(config.audit_log)
        self.sel = selectors.DefaultSelector()
        self.listener: Optional[socket.socket] = None
        self._wake_r: Optional[socket.socket] = None
        self._wake_w: Optional[socket.socket] = None
        self._stop = False
        self._reopen_audit = False
        self._rate = config.rate_limit.requests_per_s
        self._burst = float(config.rate_limit.burst)
        self._ok = P.OK_LINE
        self.conns_by_uid: dict[int, int] = {}
        self.max_connections = config.limits.connections
        #: uid -> [tokens, stamp_s, suppressed] of the refusal audit budget
        self._refusals: dict[int, list] = {}
        self._accept_backoff_s = ACCEPT_BACKOFF_MIN_S
        self._accept_paused_until: Optional[float] = None
        #: uuid -> fd of the GPU's system-wide lock, held while a session owns the GPU
        self._gpu_locks: dict[str, int] = {}
        #: what = [last_log_s, left_out] for log lines that a client could repeat at will
        self._log_budget: dict[str, list] = {}

    # ------------------------------------------------------------------ GPUs and access
    def _enumerate(self) -> list[Gpu]:
        n = self.nvml
        found = []
        for i in range(int(n.nvmlDeviceGetCount())):
            h = n.nvmlDeviceGetHandleByIndex(i)
            uuid = _text(n.nvmlDeviceGetUUID(h))
            try:
                sm_by_mem = {int(m): frozenset(int(c) for c in n.nvmlDeviceGetSupportedGraphicsClocks(h, m))
                             for m in n.nvmlDeviceGetSupportedMemoryClocks(h)}
            except n.NVMLError as exc:
                log.warning("GPU %s: cannot read its supported clocks (%s); clock locks on it will be refused", uuid, exc)
                sm_by_mem = None
            found.append(Gpu(i, uuid, h, sm_by_mem))
        self.gpus, self.by_uuid = found, {g.uuid: g for g in found}
        out = []
        for g in found:
            restore = None
            for sel, clocks in self.config.restore_clocks.items():
                if g.uuid in self._resolve((sel,), f"restore_clocks.{sel}"):
                    restore = clocks
            if restore is not None and self._unsupported(g, *restore):
                raise ServiceConfigError(self.config.source, "restore_clocks",
                                         f"{restore[0]}/{restore[1]} MHz: {self._unsupported(g, *restore)}")
            out.append(Gpu(g.index, g.uuid, g.handle, g.sm_by_mem, restore))
        return out

    def _resolve(self, selectors_: tuple, where: str) -> set[str]:
        out = set()
        for sel in selectors_:
            if sel == ALL_GPUS:
                out.update(self.by_uuid)
            elif isinstance(sel, int):
                if sel < len(self.gpus):
                    out.add(self.gpus[sel].uuid)
                else:
                    log.warning("%s: GPU index %d does not exist here (%d GPUs); ignored", where, sel, len(self.gpus))
            else:
                hits = [u for u in self.by_uuid if u == sel or u.startswith(sel)]
                if not hits:
                    log.warning("%s: no GPU with UUID %s here; ignored", where, sel)
                out.update(hits)
        return out

    def gpus_for(self, uid: int, gid: int) -> Optional[frozenset]:
        """The UUIDs a peer may drive, or None if neither the user nor any of its groups is listed."""
        listed = False
        out: set[str] = set()
        if uid in self.config.users:
            listed = True
            out |= self._resolve(self.config.users[uid], f"users.{uid}")
        for g in _user_groups(uid, gid):
            if g in self.config.groups:
                listed = True
                out |= self._resolve(self.config.groups[g], f"groups.{g}")
        return frozenset(out) if listed else None

    # ------------------------------------------------------------------ lifecycle
    def open(self) -> "KdvfsdServer":
        self._raise_file_limit()
        self._restore_after_restart()
        self.listener = self._bind()
        self.sel.register(self.listener, selectors.EVENT_READ, (self._accept, None))
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.sel.register(self._wake_r, selectors.EVENT_READ, (self._on_wake, None))
        if threading.current_thread() is threading.main_thread():
            signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
            signal.signal(signal.SIGTERM, self._on_stop_signal)
            signal.signal(signal.SIGINT, self._on_stop_signal)
            signal.signal(signal.SIGHUP, self._on_hup)
        self.audit.record(None, "start", "ok", server_pid=os.getpid(), gpus=[g.uuid for g in self.gpus],
                          socket=self.config.socket_path)
        self.audit.flush()
        log.info("listening on %s (mode %o), %d GPU(s), config %s", self.config.socket_path,
                 self.config.socket_mode, len(self.gpus), self.config.source)
        _sd_notify(b"READY=1")
        return self

    def _raise_file_limit(self) -> None:
        """Take the hard file limit, and keep connections within it (two descriptors each: the
        socket and the client's pidfd) so that accept() does not run out."""
        try:
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            if hard == resource.RLIM_INFINITY or hard > soft:
                target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
                resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
                soft = target
        except (ValueError, OSError):
            soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        fit = max(1, (soft - FD_RESERVE) // 2)
        if fit < self.config.limits.connections:
            log.warning("limits.connections = %d does not fit the file limit (%d); serving at most %d connections",
                        self.config.limits.connections, soft, fit)
        self.max_connections = min(self.config.limits.connections, fit)

    def _bind(self) -> socket.socket:
        path = self.config.socket_path
        if os.path.exists(path):
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(path)
            except OSError:
                os.unlink(path)  # left behind by a daemon that died: nobody listens
            else:
                raise RuntimeError(f"another kdvfsd already listens on {path}; stop it first")
            finally:
                probe.close()
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # Created owner-only, then opened up: nobody can connect in between with wider rights.
        old = os.umask(0o177)
        try:
            sock.bind(path)
        finally:
            os.umask(old)
        if self.config.socket_group is not None:
            from .config import _gid

            os.chown(path, -1, _gid(self.config.socket_group, self.config.source))
        os.chmod(path, self.config.socket_mode)
        sock.listen(128)
        sock.setblocking(False)
        return sock

    def serve_forever(self) -> None:
        sel, audit = self.sel, self.audit
        while not self._stop:
            timeout = AUDIT_FLUSH_S
            if self._accept_paused_until is not None:
                timeout = min(timeout, max(0.0, self._accept_paused_until - time.monotonic()))
            for key, _ in sel.select(timeout):
                handler, session = key.data
                try:
                    handler(session)
                except Exception as exc:  # noqa: BLE001 - one client's trouble must not end every session
                    self._internal_error(session, exc)
            if self._accept_paused_until is not None and time.monotonic() >= self._accept_paused_until:
                self._resume_accept()
            audit.maybe_flush()
            if self._reopen_audit:
                self._reopen_audit = False
                audit.close()
                audit.reopen()

    def stop(self) -> None:
        """Ask the loop to end (safe from another thread or a signal handler)."""
        self._stop = True
        if self._wake_w is not None:
            try:
                self._wake_w.send(b"\0")
            except OSError:
                pass

    def close(self) -> None:
        _sd_notify(b"STOPPING=1")
        for s in list(self.sessions):
            self._end(s, "service stopping")
        if self.listener is not None:
            self.sel.unregister(self.listener)
            self.listener.close()
            self.listener = None
            try:
                os.unlink(self.config.socket_path)
            except OSError:
                pass
        for sock in (self._wake_r, self._wake_w):
            if sock is not None:
                sock.close()
        self.audit.record(None, "stop", "ok", server_pid=os.getpid())
        self.audit.close()
        self.sel.close()
        try:
            self.nvml.nvmlShutdown()
        except Exception:
            pass

    def _internal_error(self, s: Optional[Session], exc: Exception) -> None:
        self._log_limited("internal", logging.ERROR, "internal error serving %s: %s: %s",
                          f"pid {s.peer.pid}" if s is not None else "the service", type(exc).__name__, exc)
        if s is not None:
            try:
                self._end(s, f"internal error ({type(exc).__name__})")
            except Exception:  # noqa: BLE001
                s.closed = True
                self.sessions.discard(s)

    def _log_limited(self, what: str, level: int, msg: str, *args) -> None:
        """At most one log line a second per ``what``; the next one says how many were left out."""
        now = time.monotonic()
        b = self._log_budget.setdefault(what, [-1e9, 0])
        if now - b[0] < 1.0:
            b[1] += 1
            return
        if b[1]:
            msg += f" (and {b[1]} more like it)"
        b[0], b[1] = now, 0
        log.log(level, msg, *args)

    def _on_stop_signal(self, signum, frame) -> None:
        self._stop = True

    def _on_hup(self, signum, frame) -> None:
        self._reopen_audit = True

    def _on_wake(self, _session) -> None:
        try:
            while self._wake_r.recv(512):
                pass
        except OSError:
            pass

    # ------------------------------------------------------------------ claims that survive the daemon
    def _claim_path(self, uuid: str) -> Optional[Path]:
        if not self.config.state_dir:
            return None
        safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in uuid)
        return Path(self.config.state_dir) / f"claim-{safe}.json"

    def _restore_after_restart(self) -> None:
        """GPUs that a previous daemon had handed out when it died: reset them now."""
        if not self.config.state_dir:
            return
        d = check_private_dir(self.config.state_dir)
        for f in sorted(d.glob("claim-*.json")):
            rec = read_json(f) or {}
            gpu = self.by_uuid.get(rec.get("gpu")) if isinstance(rec.get("gpu"), str) else None
            if gpu is None:
                log.warning("ignoring claim record %s (unreadable, or no such GPU here)", f)
                f.unlink(missing_ok=True)
                continue
            if rec.get("boot_id") and rec["boot_id"] != boot_id():
                log.info("forgetting claim record %s from before the last reboot (the reboot reset the clocks)", f)
                f.unlink(missing_ok=True)
                continue
            try:
                lock_fd = lock_gpu(gpu.uuid)
            except (GpuLockedElsewhere, OSError) as exc:
                # A run that writes through NVML itself owns the GPU now: its clocks are its own.
                log.warning("GPU %s: not resetting after restart: %s", gpu.uuid, exc)
                f.unlink(missing_ok=True)
                continue
            try:
                result = self._reset_gpu(gpu)
            finally:
                os.close(lock_fd)
            log.warning("GPU %s was still claimed by pid %s when kdvfsd last stopped; reset: %s",
                        gpu.uuid, rec.get("pid"), result)
            self.audit.record(None, "restore_after_restart", result, gpu=gpu.uuid, owner_pid=rec.get("pid"),
                              owner_uid=rec.get("uid"))
            f.unlink(missing_ok=True)

    # ------------------------------------------------------------------ connections
    def _accept(self, _session) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:  # out of descriptors: pause the listener instead of spinning on it
                self._pause_accept(exc)
                return
            self._accept_backoff_s = ACCEPT_BACKOFF_MIN_S
            conn.setblocking(False)
            pid, uid, gid = _PEERCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
            peer = Peer(pid, uid, gid)
            gpus = self.gpus_for(uid, gid)
            per_user = self.config.limits.connections_per_user if gpus is not None else min(
                UNLISTED_CONNECTIONS_PER_USER, self.config.limits.connections_per_user)
            if len(self.sessions) >= self.max_connections or self.conns_by_uid.get(uid, 0) >= per_user:
                self._refuse_connection(conn, peer, per_user)
                continue
            s = Session(conn, peer, gpus, self.config.rate_limit.burst)
            self.sessions.add(s)
            self.conns_by_uid[uid] = self.conns_by_uid.get(uid, 0) + 1
            self.sel.register(conn, selectors.EVENT_READ, (self._on_readable, s))
            self._watch_process(s)
            if s.gpus is not None:
                self.audit.record(peer, "connect", "ok", user=s.user, gpus=sorted(s.gpus))
            else:
                self._refused(peer, "connect", "not_allowed", user=s.user)

    def _refuse_connection(self, conn: socket.socket, peer: Peer, per_user: int) -> None:
        mine = self.conns_by_uid.get(peer.uid, 0)
        if mine >= per_user:
            why = (f"kdvfsd: user {_user_name(peer.uid)} (uid {peer.uid}) already has {mine} connections open, the "
                   f"most one user may; one connection per training process is enough. Close the others "
                   "(the administrator sets [limits] connections_per_user)")
        else:
            why = (f"kdvfsd: the service has {len(self.sessions)} connections open, the most it serves; "
                   "try again later (the administrator sets [limits] connections)")
        try:
            conn.send(P.error(P.E_TOO_MANY, why))
        except OSError:
            pass
        conn.close()
        self._refused(peer, "connect", P.E_TOO_MANY, open=mine)

    def _pause_accept(self, exc: OSError) -> None:
        delay = self._accept_backoff_s
        self._accept_backoff_s = min(ACCEPT_BACKOFF_MAX_S, delay * 2)
        self._accept_paused_until = time.monotonic() + delay
        try:
            self.sel.unregister(self.listener)
        except (KeyError, ValueError):
            pass
        level = logging.ERROR if exc.errno in (errno.EMFILE, errno.ENFILE) else logging.WARNING
        self._log_limited("accept", level, "accept failed (%s); new connections wait %.0f ms (%d open)",
                          exc, delay * 1e3, len(self.sessions))

    def _resume_accept(self) -> None:
        self._accept_paused_until = None
        if self.listener is not None:
            try:
                self.sel.register(self.listener, selectors.EVENT_READ, (self._accept, None))
            except KeyError:
                pass  # still registered

    def _refused(self, peer: Peer, op: str, result: str, **fields) -> None:
        """Audit a refusal, at most REFUSAL_AUDIT_PER_S per uid (burst REFUSAL_AUDIT_BURST)."""
        now = time.monotonic()
        b = self._refusals.get(peer.uid)
        if b is None:
            if len(self._refusals) > 4096:  # uids that stopped asking: forget them
                self._refusals.clear()
            b = self._refusals[peer.uid] = [float(REFUSAL_AUDIT_BURST), now, 0]
        else:
            b[0] = min(float(REFUSAL_AUDIT_BURST), b[0] + (now - b[1]) * REFUSAL_AUDIT_PER_S)
            b[1] = now
        if b[0] < 1.0:
            b[2] += 1
            return
        b[0] -= 1.0
        if b[2]:
            fields["suppressed"] = b[2]
            b[2] = 0
        self.audit.record(peer, op, result, **fields)

    def _watch_process(self, s: Session) -> None:
        """A pidfd on the client process: its death ends the session even if the socket lives on in
        a forked child (a data loader worker, say)."""
        if s.peer.pid <= 0 or not hasattr(os, "pidfd_open"):
            return
        try:
            s.pidfd = os.pidfd_open(s.peer.pid)
        except ProcessLookupError:
            self._end(s, "process already exited")
            return
        except OSError:  # kernel before 5.3, or a sandbox without pidfd: EOF alone ends the session
            return
        self.sel.register(s.pidfd, selectors.EVENT_READ, (self._on_process_exit, s))

    def _on_process_exit(self, s: Session) -> None:
        self._end(s, "process exited")

    def _on_readable(self, s: Session) -> None:
        try:
            data = s.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._end(s, "connection closed")
            return
        buf = s.buf + data if s.buf else data
        if b"\n" not in buf:
            if len(buf) > P.MAX_LINE_BYTES:
                self._oversized(s)
            else:
                s.buf = buf
            return
        *lines, s.buf = buf.split(b"\n")
        if len(s.buf) > P.MAX_LINE_BYTES or any(len(line) > P.MAX_LINE_BYTES for line in lines):
            self._oversized(s)  # a whole line is capped as a partial one is
            return
        out = [self._handle(s, line) for line in lines]
        if not s.closed:
            self._send(s, out[0] if len(out) == 1 else b"".join(out))

    def _oversized(self, s: Session) -> None:
        self._refused(s.peer, "request", P.E_BAD_REQUEST, why="oversized")
        self._send(s, P.error(P.E_BAD_REQUEST, f"kdvfsd: request longer than {P.MAX_LINE_BYTES} bytes; "
                                               "a request is one short JSON line (see protocol.py)"))
        self._end(s, "oversized request")

    def _send(self, s: Session, data: bytes) -> None:
        try:
            sent = s.sock.send(data)
        except OSError:
            sent = -1
        if sent != len(data):
            # Answers are a few dozen bytes; a full buffer means the client stopped reading them.
            self._end(s, "client does not read its answers")

    def _end(self, s: Session, why: str) -> None:
        if s.closed:
            return
        s.closed = True
        for fd in (s.sock, s.pidfd):
            if fd is None:
                continue
            try:
                self.sel.unregister(fd)
            except (KeyError, ValueError):
                pass
        s.sock.close()
        if s.pidfd is not None:
            os.close(s.pidfd)
        for uuid in list(s.owned):
            self._give_back(s, uuid, why)
        self.sessions.discard(s)
        left = self.conns_by_uid.get(s.peer.uid, 0) - 1
        if left > 0:
            self.conns_by_uid[s.peer.uid] = left
        else:
            self.conns_by_uid.pop(s.peer.uid, None)
        if s.gpus is not None:
            self.audit.record(s.peer, "disconnect", "ok", why=why)
            self.audit.flush()
        else:
            self._refused(s.peer, "disconnect", "not_allowed", why=why)

    # ------------------------------------------------------------------ requests
    def _handle(self, s: Session, line: bytes) -> bytes:
        # Token bucket: refill by elapsed time, spend one per request.
        now = time.monotonic()
        tokens = s.tokens + (now - s.stamp_s) * self._rate
        if tokens > self._burst:
            tokens = self._burst
        s.stamp_s = now
        if tokens < 1.0:
            s.tokens = tokens
            if not s.limited:  # one audit line per burst of refusals, not one per request
                s.limited = True
                self.audit.record(s.peer, "rate_limited", "refused")
            return P.error(
                P.E_RATE_LIMITED,
                f"kdvfsd: process {s.peer.pid} exceeded the rate limit of {self._rate:g} requests/s "
                f"(burst {int(self._burst)}); wait {(1.0 - tokens) / self._rate * 1e3:.1f} ms, or change clocks "
                "less often (raise the actuator's floor between switches); the administrator sets "
                "[rate_limit] in the kdvfsd config",
            )
        s.tokens = tokens - 1.0
        s.limited = False
        try:
            req = P.parse_request(line)
        except ValueError as exc:
            self._refused(s.peer, "request", P.E_BAD_REQUEST, why=str(exc)[:80])
            return P.error(P.E_BAD_REQUEST, f"kdvfsd: {exc}; a request is one JSON object per line with an "
                                            '"op" (see protocol.py)')
        op = req["op"]
        if s.gpus is None:
            self._refused(s.peer, op if op in P.OPS else "?", "not_allowed")
            return P.error(
                P.E_NOT_ALLOWED,
                f"kdvfsd: user {s.user} (uid {s.peer.uid}) may not set GPU clocks: neither the user nor its "
                f"groups are listed in {self.config.source}. Ask the administrator to add you under [users] or "
                "[groups], or use device='observe' (measures, never writes).",
            )
        if op == "set":
            return self._set(s, req)
        if op == "hello":
            return P.encode({
                "ok": True, "service": "kdvfsd", "version": P.PROTOCOL_VERSION, "server_pid": os.getpid(),
                "uid": s.peer.uid, "pid": s.peer.pid, "gpus": sorted(s.gpus),
                "rate_limit": {"requests_per_s": self._rate, "burst": int(self._burst)},
            })
        if op == "reset":
            return self._reset(s, req, release=False)
        if op == "release":
            return self._reset(s, req, release=True)
        return P.error(P.E_BAD_REQUEST, f"unknown op {op!r}; ops: {', '.join(P.OPS)}")

    def _gpu(self, s: Session, req: dict, op: str) -> tuple[Optional[Gpu], Optional[bytes]]:
        uuid = req.get("gpu")
        gpu = self.by_uuid.get(uuid) if isinstance(uuid, str) else None
        if gpu is None:
            self._refused(s.peer, op, P.E_UNKNOWN_GPU, gpu=str(uuid)[:80])
            return None, P.error(P.E_UNKNOWN_GPU, f"kdvfsd: no GPU with UUID {str(uuid)[:80]!r} on this machine; "
                                                  "`kdvfs info` lists the GPUs and their UUIDs")
        if uuid not in s.gpus:
            self._refused(s.peer, op, P.E_NOT_ALLOWED, gpu=uuid)
            mine = ", ".join(sorted(s.gpus)) or "none"
            return None, P.error(P.E_NOT_ALLOWED, f"kdvfsd: user {s.user} (uid {s.peer.uid}) may not drive GPU {uuid} "
                                                  f"(NVML index {gpu.index}); allowed: {mine}. Ask the administrator "
                                                  f"to list it in {self.config.source}, or use device='observe' on it.")
        owner = self.owners.get(uuid)
        if owner is s:
            return gpu, None
        if owner is not None:
            self._refused(s.peer, op, P.E_BUSY, gpu=uuid, owner_pid=owner.peer.pid)
            return None, P.error(
                P.E_BUSY,
                f"kdvfsd: GPU {uuid} is owned by another session: process {owner.peer.pid} (user {owner.user}) since "
                f"{owner.since}. One writer per GPU: wait for that process to end (its clocks are restored then), "
                "or run this one with device='observe'.",
                gpu=uuid, owner_pid=owner.peer.pid, owner_uid=owner.peer.uid,
            )
        refusal = self._claim(s, gpu, op)
        return (None, refusal) if refusal is not None else (gpu, None)

    def _claim(self, s: Session, gpu: Gpu, op: str) -> Optional[bytes]:
        """Make ``gpu`` the session's: its system-wide lock, then the claim record. A refusal, or None."""
        try:
            self._gpu_locks[gpu.uuid] = lock_gpu(gpu.uuid)
        except GpuLockedElsewhere as exc:
            self._refused(s.peer, op, P.E_BUSY, gpu=gpu.uuid, owner_pid=exc.owner_pid, direct=True)
            return P.error(
                P.E_BUSY,
                f"kdvfsd: GPU {gpu.uuid} is driven directly through NVML by process {exc.owner_pid or '?'} (not "
                "through kdvfsd). One writer per GPU: wait for that process to end, or run this one with "
                "device='observe'.",
                gpu=gpu.uuid, owner_pid=exc.owner_pid,
            )
        except OSError as exc:
            self._log_limited("gpu-lock", logging.ERROR, "GPU %s: cannot take its system-wide lock: %s", gpu.uuid, exc)
            return P.error(P.E_DEVICE, f"kdvfsd: cannot take GPU {gpu.uuid}'s system-wide lock ({exc}); ask the "
                                       "administrator to check the service's log")
        found = self._read_clocks(gpu)
        self.owners[gpu.uuid] = s
        s.owned[gpu.uuid] = None
        path = self._claim_path(gpu.uuid)
        if path is not None:  # once per session and GPU, not per request
            try:
                write_json(path, {"gpu": gpu.uuid, "pid": s.peer.pid, "uid": s.peer.uid, "since": s.since,
                                  "boot_id": boot_id()})
            except OSError as exc:
                self._log_limited("claim-record", logging.ERROR, "cannot write claim record %s: %s", path, exc)
        self.audit.record(s.peer, "claim", "ok", gpu=gpu.uuid, found="unlocked", found_clocks_mhz=found)
        self.audit.flush()
        return None

    def _read_clocks(self, gpu: Gpu) -> Optional[list]:
        n = self.nvml
        try:
            return [int(n.nvmlDeviceGetClockInfo(gpu.handle, n.NVML_CLOCK_SM)),
                    int(n.nvmlDeviceGetClockInfo(gpu.handle, n.NVML_CLOCK_MEM))]
        except Exception:
            return None

    def _unsupported(self, gpu: Gpu, sm: int, mem: int) -> Optional[str]:
        """Why ``sm``/``mem`` MHz is not in the GPU's supported lists, or None. NVML documents no
        such check for locked clocks, so the service makes it."""
        if gpu.sm_by_mem is None:
            return f"the supported clocks of GPU {gpu.uuid} could not be read, so no clock is locked on it"
        if mem not in gpu.sm_by_mem:
            return (f"rejected memory clock {mem} MHz: GPU {gpu.uuid} supports "
                    f"{', '.join(map(str, sorted(gpu.sm_by_mem, reverse=True)))} MHz")
        allowed = gpu.sm_by_mem[mem]
        if sm not in allowed:
            nearest = min(allowed, key=lambda c: (abs(c - sm), c)) if allowed else None
            return (f"rejected SM clock {sm} MHz: not supported by GPU {gpu.uuid} with memory at {mem} MHz; "
                    f"nearest {nearest} MHz (`kdvfs info` lists them)")
        return None

    def _set(self, s: Session, req: dict) -> bytes:
        sm, mem = req.get("sm_mhz"), req.get("mem_mhz")
        if type(sm) is not int or type(mem) is not int or not (0 < sm < 100_000 and 0 < mem < 100_000):
            self._refused(s.peer, "set", P.E_BAD_REQUEST)
            return P.error(P.E_BAD_REQUEST, "kdvfsd: set needs integer sm_mhz and mem_mhz in MHz")
        uuid = req.get("gpu")
        known = self.by_uuid.get(uuid) if isinstance(uuid, str) else None
        if known is not None and s.gpus is not None and uuid in s.gpus:
            problem = self._unsupported(known, sm, mem)
            if problem is not None:  # before any claim or write: nothing changes
                code = P.E_INVALID_CLOCK if known.sm_by_mem is not None else P.E_NOT_SUPPORTED
                self._refused(s.peer, "set", code, gpu=uuid, sm_mhz=sm, mem_mhz=mem)
                return P.error(code, f"kdvfsd: {problem}")
        gpu, refusal = self._gpu(s, req, "set")
        if refusal is not None:
            return refusal
        n = self.nvml
        before = s.owned[gpu.uuid]
        mem_written = False
        try:
            # The memory lock is only rewritten when it changes: most switches move the SM clock only.
            if before != mem:
                s.owned[gpu.uuid] = None
                n.nvmlDeviceSetMemoryLockedClocks(gpu.handle, mem, mem)
                s.owned[gpu.uuid] = mem
                mem_written = True
            n.nvmlDeviceSetGpuLockedClocks(gpu.handle, sm, sm)
        except n.NVMLError as exc:
            if mem_written:  # all or nothing: put the memory lock back as it was before this request
                self._undo_memory_lock(s, gpu, before)
            code, msg = self._nvml_error(exc, f"locking {sm}/{mem} MHz on GPU {gpu.uuid}")
            self._refused(s.peer, "set", code, gpu=gpu.uuid, sm_mhz=sm, mem_mhz=mem)
            return P.error(code, msg)
        self.audit.record(s.peer, "set", "ok", gpu=gpu.uuid, sm_mhz=sm, mem_mhz=mem)
        return self._ok

    def _undo_memory_lock(self, s: Session, gpu: Gpu, before: Optional[int]) -> None:
        n = self.nvml
        try:
            if before is not None:
                n.nvmlDeviceSetMemoryLockedClocks(gpu.handle, before, before)
            elif gpu.restore is not None:
                n.nvmlDeviceSetMemoryLockedClocks(gpu.handle, gpu.restore[1], gpu.restore[1])
            else:
                n.nvmlDeviceResetMemoryLockedClocks(gpu.handle)
            s.owned[gpu.uuid] = before
        except n.NVMLError as exc:
            s.owned[gpu.uuid] = None  # unknown: the next set rewrites it, the session's end resets it
            self._log_limited("undo", logging.ERROR, "GPU %s: putting the memory lock back failed: %s", gpu.uuid, exc)

    def _reset(self, s: Session, req: dict, *, release: bool) -> bytes:
        op = "release" if release else "reset"
        gpu, refusal = self._gpu(s, req, op)
        if refusal is not None:
            return refusal
        if release:
            result = self._give_back(s, gpu.uuid, "released by the client")
        else:
            result = self._reset_gpu(gpu)
            s.owned[gpu.uuid] = None
            self.audit.record(s.peer, op, result, gpu=gpu.uuid)
        if result != "ok":
            return P.error(P.E_DEVICE, f"kdvfsd: resetting GPU {gpu.uuid} failed ({result})")
        return self._ok

    def _reset_gpu(self, gpu: Gpu) -> str:
        """Unlock SM and memory clocks (or lock the site's ``restore_clocks``); 'ok' or what went wrong."""
        n = self.nvml
        if gpu.restore is not None:
            sm, mem = gpu.restore
            try:
                n.nvmlDeviceSetMemoryLockedClocks(gpu.handle, mem, mem)
                n.nvmlDeviceSetGpuLockedClocks(gpu.handle, sm, sm)
            except n.NVMLError as exc:
                return self._nvml_error(exc, f"restoring {sm}/{mem} MHz (restore_clocks)")[1]
            return "ok"
        try:
            n.nvmlDeviceResetGpuLockedClocks(gpu.handle)
        except n.NVMLError as exc:
            return self._nvml_error(exc, "resetting locked SM clocks")[1]
        try:
            n.nvmlDeviceResetMemoryLockedClocks(gpu.handle)
        except n.NVMLError as exc:
            if getattr(exc, "value", None) != n.NVML_ERROR_NOT_SUPPORTED:  # no memory lock before Ampere
                return self._nvml_error(exc, "resetting locked memory clocks")[1]
        return "ok"

    def _give_back(self, s: Session, uuid: str, why: str) -> str:
        """End ``s``'s ownership of a GPU, restoring the clocks it found (unlocked)."""
        gpu = self.by_uuid[uuid]
        t0 = time.perf_counter()
        result = self._reset_gpu(gpu)
        s.owned.pop(uuid, None)
        if self.owners.get(uuid) is s:
            del self.owners[uuid]
            fd = self._gpu_locks.pop(uuid, None)
            if fd is not None:
                os.close(fd)
        path = self._claim_path(uuid)
        if path is not None and result == "ok":
            path.unlink(missing_ok=True)  # kept on failure: the next start of kdvfsd tries again
        if result != "ok":
            log.error("GPU %s: restoring after pid %d (%s) failed: %s", uuid, s.peer.pid, why, result)
        self.audit.record(s.peer, "restore", result, gpu=uuid, why=why, restore_ms=round((time.perf_counter() - t0) * 1e3, 3))
        self.audit.flush()
        return result

    def _nvml_error(self, exc, what: str) -> tuple[str, str]:
        n = self.nvml
        code = getattr(exc, "value", None)
        if code == n.NVML_ERROR_INVALID_ARGUMENT:
            return P.E_INVALID_CLOCK, f"kdvfsd: {what}: the driver rejected the value; `kdvfs info` lists the supported clocks"
        if code == n.NVML_ERROR_NOT_SUPPORTED:
            return P.E_NOT_SUPPORTED, f"kdvfsd: {what}: not supported by this GPU or driver"
        if code == n.NVML_ERROR_NO_PERMISSION:
            return P.E_NO_PERMISSION, (f"kdvfsd: {what}: the service itself may not set clocks; it must run as root "
                                       "(or with CAP_SYS_ADMIN): ask the administrator")
        return P.E_DEVICE, f"kdvfsd: {what}: NVML error {exc}"


def _sd_notify(message: bytes) -> None:
    """Tell systemd (Type=notify) where it asks; a no-op elsewhere."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.sendto(message, addr)
    except OSError:
        pass


def main(argv: Optional[list] = None, nvml=None) -> int:
    ap = argparse.ArgumentParser(prog="kdvfsd", description="GPU clock service for users without root (runs as root).")
    ap.add_argument("--config", default=os.environ.get("KDVFSD_CONFIG", DEFAULT_CONFIG_PATH),
                    help=f"TOML or JSON config file (default {DEFAULT_CONFIG_PATH})")
    ap.add_argument("--check", action="store_true", help="validate the config, show who gets which GPUs, and exit")
    args = ap.parse_args(argv)
    logging.basicConfig(stream=sys.stderr, format="kdvfsd: %(message)s", level=logging.INFO)
    try:
        config = load_config(args.config)
    except ServiceConfigError as exc:
        log.error("%s", exc)
        return 2
    try:
        server = KdvfsdServer(config, nvml)
    except ServiceConfigError as exc:  # restore_clocks that a GPU does not support
        log.error("%s", exc)
        return 2
    except Exception as exc:  # no driver, no pynvml: say so and fail the unit
        log.error("cannot read the GPUs through NVML (%s: %s); is the NVIDIA driver loaded?", type(exc).__name__, exc)
        return 1
    if args.check:
        for uid, sel in config.users.items():
            print(f"user {_user_name(uid)} (uid {uid}): {sorted(server._resolve(sel, f'users.{uid}'))}")
        for gid, sel in config.groups.items():
            print(f"group {gid}: {sorted(server._resolve(sel, f'groups.{gid}'))}")
        server.nvml.nvmlShutdown()
        return 0
    try:
        server.open()
    except (OSError, RuntimeError) as exc:
        log.error("cannot start (socket %s, state_dir %s): %s", config.socket_path, config.state_dir, exc)
        server.close()
        return 1
    try:
        server.serve_forever()
    finally:
        server.close()
        log.info("stopped; every GPU still owned was restored")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
