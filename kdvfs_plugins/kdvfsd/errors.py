"""Typed errors of the kdvfsd client, as subclasses of :mod:`kdvfs_plugins.errors`.

Each is a subclass of the error kdvfs already handles in the same way: a refused user is a
:class:`NoPermissionError` (training falls back to ``observe``), a GPU held by another session is
a :class:`GpuBusyError`, a missing service is a :class:`DeviceUnavailableError`.
"""
from __future__ import annotations

from ..errors import DeviceError, DeviceUnavailableError, GpuBusyError, NoPermissionError

START_HINT = (
    "start it with `sudo systemctl start kdvfsd` (or run `sudo kdvfsd --config /etc/kdvfsd.toml`; "
    "see docs/kdvfsd.md), or unset KDVFSD_SOCKET to stop using it"
)


class ServiceError(DeviceError):
    """kdvfsd answered with an error, or the connection to it broke."""


class ServiceNotRunningError(DeviceUnavailableError):
    """No kdvfsd listens on the socket."""

    def __init__(self, socket_path: str, cause: str):
        self.socket_path = socket_path
        DeviceUnavailableError.__init__(self, f"no kdvfsd clock service at {socket_path} ({cause}): {START_HINT}")


class ServiceNotAllowedError(NoPermissionError):
    """kdvfsd refused this user, or this GPU for this user."""

    def __init__(self, message: str):
        # NoPermissionError's own text tells how to get permission; kdvfsd's message is more precise.
        DeviceError.__init__(self, message)


class ServiceGpuBusyError(GpuBusyError):
    """Another kdvfsd session owns the GPU's clocks."""

    def __init__(self, gpu: str, owner_pid: int | None, message: str):
        self.owner_pid = owner_pid
        self.gpu = gpu
        DeviceError.__init__(self, message)


class RateLimitedError(ServiceError):
    """This client sent more clock requests than the service's rate limit allows."""
