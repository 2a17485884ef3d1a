"""The kdvfsd client: one persistent connection, one request and one answer at a time.

A connection is a session: the GPUs it writes to are its own until it closes or its process
dies, and then the service restores them. Reconnecting starts a new session.
"""
from __future__ import annotations

import os
import socket
import threading
import weakref
from dataclasses import dataclass
from typing import Optional

from ..errors import DeviceError, DeviceUnavailableError, InvalidClockError, NotSupportedError
from . import protocol as P
from .errors import RateLimitedError, ServiceError, ServiceGpuBusyError, ServiceNotAllowedError, ServiceNotRunningError

#: Every live client, so that a forked child drops its copy of the parent's connection.
_clients: "weakref.WeakSet[KdvfsdClient]" = weakref.WeakSet()


def _after_fork_in_child() -> None:
    # The child must not talk on the parent's session (the two would interleave on one stream),
    # and closing its copy lets the service see EOF once the parent's own copy closes.
    for c in list(_clients):
        c._forget_connection()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


@dataclass(frozen=True)
class ServiceHello:
    """What the service says about itself and about this client."""

    version: int
    server_pid: int
    uid: int
    pid: int
    gpus: tuple[str, ...]  # UUIDs this client may drive
    rate_limit_per_s: float
    rate_limit_burst: int


def default_socket_path() -> str:
    return os.environ.get(P.SOCKET_ENV) or P.DEFAULT_SOCKET_PATH


class KdvfsdClient:
    """Talks to kdvfsd over its Unix socket. Thread-safe; connects on first use."""

    def __init__(self, socket_path: Optional[str] = None, *, timeout_s: float = 5.0):
        self.socket_path = socket_path or default_socket_path()
        self.timeout_s = timeout_s
        self._sock: Optional[socket.socket] = None
        self._buf = b""
        # Reentrant: a signal handler on the thread that is mid-request (the guard restoring on
        # SIGTERM) may send its own request; answers come back in order either way.
        self._lock = threading.RLock()
        _clients.add(self)

    # ------------------------------------------------------------------ connection
    def connect(self) -> "KdvfsdClient":
        with self._lock:
            if self._sock is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(self.timeout_s)
                try:
                    sock.connect(self.socket_path)
                except (FileNotFoundError, ConnectionRefusedError) as exc:
                    sock.close()
                    raise ServiceNotRunningError(self.socket_path, type(exc).__name__) from None
                except PermissionError:
                    sock.close()
                    raise ServiceNotAllowedError(
                        f"kdvfsd: the socket {self.socket_path} does not let this user connect; ask the administrator "
                        "to add you to the group that owns it (socket_group in the kdvfsd config), or use "
                        "device='observe'"
                    ) from None
                except OSError as exc:
                    sock.close()
                    raise ServiceNotRunningError(self.socket_path, str(exc)) from None
                self._sock = sock
                self._buf = b""
        return self

    def close(self) -> None:
        """End the session: the service restores every GPU this client changed."""
        with self._lock:
            if self._sock is not None:
                try:
                    self._sock.close()
                finally:
                    self._sock = None
                    self._buf = b""

    def _forget_connection(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            except OSError:
                pass
        self._sock = None
        self._buf = b""
        self._lock = threading.RLock()  # a lock held by another parent thread would never be released here

    @property
    def connected(self) -> bool:
        return self._sock is not None

    def __enter__(self) -> "KdvfsdClient":
        return self.connect()

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    # ------------------------------------------------------------------ requests
    def _request(self, line: bytes) -> Optional[dict]:
        """Send one request, return its answer (None for the plain ``{"ok":true}``)."""
        with self._lock:
            if self._sock is None:
                self.connect()
            sock = self._sock
            try:
                sock.sendall(line)
                buf = self._buf
                while True:
                    nl = buf.find(b"\n")
                    if nl >= 0:
                        break
                    chunk = sock.recv(4096)
                    if not chunk:
                        raise ConnectionResetError("kdvfsd closed the connection")
                    buf += chunk
            except (socket.timeout, OSError) as exc:
                # The session is gone or in an unknown state: drop it, the next call starts afresh
                # (and the service restores whatever this session had changed).
                self.close()
                if isinstance(exc, socket.timeout):
                    raise ServiceError(f"kdvfsd at {self.socket_path} did not answer within {self.timeout_s:g} s; "
                                       "check `systemctl status kdvfsd`") from None
                raise ServiceError(f"lost the connection to kdvfsd at {self.socket_path} ({exc}); clocks this "
                                   "session set were restored by the service; the next request reconnects") from None
            answer, self._buf = buf[: nl + 1], buf[nl + 1:]
        if answer == P.OK_LINE:
            return None
        msg = P.decode(answer)
        if not msg.get("ok"):
            raise _typed_error(msg)
        return msg

    def hello(self) -> ServiceHello:
        m = self._request(b'{"op":"hello"}\n') or {}
        rl = m.get("rate_limit", {})
        return ServiceHello(
            version=int(m.get("version", 0)), server_pid=int(m.get("server_pid", 0)), uid=int(m.get("uid", -1)),
            pid=int(m.get("pid", 0)), gpus=tuple(m.get("gpus", ())),
            rate_limit_per_s=float(rl.get("requests_per_s", 0)), rate_limit_burst=int(rl.get("burst", 0)),
        )

    def set_clocks(self, gpu_uuid: str, sm_mhz: int, mem_mhz: int) -> None:
        """Lock the SM and memory clocks of ``gpu_uuid`` (the first write makes the GPU this session's)."""
        self._request(P.set_request(gpu_uuid, sm_mhz, mem_mhz))

    def reset(self, gpu_uuid: str) -> None:
        """Unlock the clocks of ``gpu_uuid``; this session keeps the GPU."""
        self._request(P.gpu_request("reset", gpu_uuid))

    def release(self, gpu_uuid: str) -> None:
        """Unlock the clocks of ``gpu_uuid`` and let other sessions have it."""
        self._request(P.gpu_request("release", gpu_uuid))


def _typed_error(msg: dict) -> DeviceError:
    code, text = msg.get("error"), str(msg.get("message", "kdvfsd refused the request"))
    if code == P.E_NOT_ALLOWED:
        return ServiceNotAllowedError(text)
    if code == P.E_BUSY:
        return ServiceGpuBusyError(str(msg.get("gpu", "")), msg.get("owner_pid"), text)
    if code == P.E_RATE_LIMITED:
        return RateLimitedError(text)
    if code == P.E_INVALID_CLOCK:
        return InvalidClockError(text)
    if code == P.E_NOT_SUPPORTED:
        return NotSupportedError(text)
    if code == P.E_UNKNOWN_GPU:
        return DeviceUnavailableError(text)
    # E_NO_PERMISSION (the service itself lacks the right: an administrator's problem, not this user's),
    # E_DEVICE, E_BAD_REQUEST
    return ServiceError(text)
