"""Devices behind one protocol: ``nvml`` (writes clocks), ``observe`` (reads only), ``simulated``."""
from __future__ import annotations

from typing import Optional

from ..errors import DeviceUnavailableError
from ..hookspecs import hookimpl
from ..log import logger
from .base import Device, DeviceInfo, HostMarker, Marker
from . import nvml as _nvml
from .nvml import NvmlDevice, import_nvml, writes_permitted
from .observe import ObserveDevice, observe_instead
from .service import ServiceNvmlDevice, probe_service, service_socket_path
from .simulated import SimulatedDevice

__all__ = [
    "Device", "DeviceInfo", "Marker", "HostMarker", "NvmlDevice", "ObserveDevice", "SimulatedDevice",
    "open_device", "choose_kind", "observe_instead", "ServiceNvmlDevice",
]


def choose_kind(requested: str, nvml=None, config=None) -> tuple[str, str]:
    """Resolve ``auto`` to a device kind. Returns (kind, why)."""
    if requested != "auto":
        return requested, "as configured"
    try:
        nvml = nvml if nvml is not None else import_nvml()
        # Through the shared count: a bare nvmlShutdown would end the session of an open device.
        _nvml.nvml_init(nvml)
        try:
            count = _nvml.nvml_gpu_count(nvml)
        finally:
            _nvml.nvml_shutdown(nvml)
    except Exception as exc:  # any failure here means: no usable NVIDIA driver
        cause = getattr(exc, "__cause__", None) or exc
        return "simulated", f"no NVIDIA driver found ({type(cause).__name__}); using the virtual H100"
    if count == 0:
        return "simulated", "NVML reports no GPU; using the virtual H100"
    # A named clock service comes first, even for root: it keeps one writer per GPU machine-wide.
    socket_path = service_socket_path(config)
    if socket_path:
        usable, why = probe_service(socket_path)
        if usable:
            return "nvml", why
        if not _nvml.writes_permitted():
            return "observe", f"{why}; measuring only"
    # Looked up on the module so that one replacement (a test, a clock service) governs every caller.
    if _nvml.writes_permitted():
        return "nvml", "NVML present and this process may set clocks"
    return "observe", (
        "NVML present but this process may not set clocks (needs root, or --cap-add SYS_ADMIN in a "
        "container); measuring only"
    )


def open_device(kind: str, index: int, *, nvml=None, config=None) -> Device:
    if kind == "simulated":
        if config is not None:
            return SimulatedDevice(
                index, noise=config.sim_noise, seed=config.sim_seed, switch_latency_ms=config.sim_switch_latency_ms
            )
        return SimulatedDevice(index)
    if kind == "nvml":
        socket_path = service_socket_path(config)
        if socket_path and (not _nvml.writes_permitted() or probe_service(socket_path)[0]):
            return ServiceNvmlDevice(index, nvml=nvml, socket_path=socket_path)
        return NvmlDevice(index, nvml=nvml)
    if kind == "observe":
        return ObserveDevice(index, nvml=nvml)
    raise DeviceUnavailableError(f"unknown device kind {kind!r}; use auto, nvml, observe or simulated")


class BuiltinDevices:
    """The built-in ``kdvfs_make_device``: a plugin may answer first and supply its own device."""

    def __init__(self, nvml=None):
        self.nvml = nvml
        self._said = False

    @hookimpl(trylast=True)
    def kdvfs_make_device(self, config, index):
        kind, why = choose_kind(config.device, nvml=self.nvml, config=config)
        if not self._said:
            logger.info("device %s for GPU %d: %s", kind, index, why)
            self._said = True
        return open_device(kind, index, nvml=self.nvml, config=config)
