"""A GPU whose clock writes go through the kdvfsd clock service (for users without root).

Readings stay local NVML calls (unprivileged and fast); ``set_clocks`` and ``reset_clocks`` are
requests on one persistent connection to kdvfsd, which checks who asks, owns the GPU for this
session and restores it when the session ends, however the process ends.

Chosen where the environment variable ``KDVFSD_SOCKET`` (or a config attribute
``kdvfsd_socket``) names the service's socket and the service answers ``hello``.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Optional

from ..clocks import ClockPair
from ..kdvfsd.client import KdvfsdClient
from ..kdvfsd.protocol import SOCKET_ENV
from .base import DeviceInfo, Marker
from .nvml import NvmlDevice


def service_socket_path(config=None) -> Optional[str]:
    """The socket kdvfs should use: the config's ``kdvfsd_socket``, else ``$KDVFSD_SOCKET``, else None."""
    return getattr(config, "kdvfsd_socket", None) or os.environ.get(SOCKET_ENV) or None


def probe_service(socket_path: str, timeout_s: float = 1.0) -> tuple[bool, str]:
    """Does a kdvfsd at ``socket_path`` answer ``hello`` and serve this user? Returns (usable, why)."""
    client = KdvfsdClient(socket_path, timeout_s=timeout_s)
    try:
        hello = client.hello()
    except Exception as exc:  # not running, not allowed, broken: each message says what to do
        return False, str(exc)
    finally:
        client.close()
    if not hello.gpus:
        return False, f"kdvfsd at {socket_path} serves this user but allows it no GPU"
    return True, f"clock writes through kdvfsd at {socket_path} ({len(hello.gpus)} GPU(s) allowed)"


class ServiceNvmlDevice(NvmlDevice):
    """An :class:`NvmlDevice` whose writes are requests to kdvfsd. ``kind`` stays ``nvml``: for the
    rest of kdvfs it is a clock-writing NVML device."""

    via_service = True

    def __init__(self, index: int = 0, nvml=None, marker_factory=None, *, nvml_index: Optional[int] = None,
                 socket_path: Optional[str] = None, client: Optional[KdvfsdClient] = None):
        super().__init__(index, nvml, marker_factory, nvml_index=nvml_index)
        try:
            self.client = client if client is not None else KdvfsdClient(socket_path)
            # Fails early, with the service's own message, when it is not running or refuses this user.
            self.hello = self.client.hello()
        except BaseException:
            super().close()
            raise
        self._service_info: Optional[DeviceInfo] = None

    def info(self) -> DeviceInfo:
        if self._service_info is None:
            base = super().info()
            # Whether this process may write is the service's answer, not this process's capabilities.
            self._service_info = dataclasses.replace(base, can_write_clocks=base.uuid in self.hello.gpus)
            self._info = self._service_info
        return self._service_info

    def set_clocks(self, clocks: ClockPair, marker: Optional[Marker] = None) -> None:
        info = self.info()
        info.clocks.check(clocks)  # refused here without a round trip
        self.client.set_clocks(info.uuid, clocks.sm_mhz, clocks.mem_mhz)

    def reset_clocks(self, marker: Optional[Marker] = None) -> None:
        self.client.reset(self.info().uuid)

    def close(self) -> None:
        if not self._closed:
            # Ends the session: the service restores whatever is still locked on this GPU.
            self.client.close()
        super().close()
