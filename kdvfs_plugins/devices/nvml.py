"""Real GPUs through NVML (package ``nvidia-ml-py``, imported as ``pynvml``).

NVML errors become kdvfs errors in one place (:func:`_nvml_errors`). Clock writes use locked
clocks (``nvmlDeviceSetGpuLockedClocks`` / ``nvmlDeviceSetMemoryLockedClocks``); application
clocks are deprecated and do not move the runtime memory clock.
"""
from __future__ import annotations

import contextlib
import os
import threading
import weakref
from typing import Optional

from ..clocks import ClockPair, ClockTable
from ..errors import DeviceError, DeviceUnavailableError, InvalidClockError, NoPermissionError, NotSupportedError
from .base import Device, DeviceInfo, Marker, make_real_marker_factory

_init_lock = threading.Lock()
# Counted per NVML module: an injected module (a test double, another binding) has its own session.
# Weak keys: a module dropped with devices still open must not pass its count to a newcomer.
_init_counts: "weakref.WeakKeyDictionary[object, int]" = weakref.WeakKeyDictionary()


def import_nvml():
    """The ``pynvml`` module, or DeviceUnavailableError saying how to install it."""
    try:
        import pynvml
    except ImportError as exc:  # pragma: no cover - a dependency of the package
        raise DeviceUnavailableError("pynvml is missing: pip install nvidia-ml-py") from exc
    return pynvml


@contextlib.contextmanager
def _nvml_errors(nvml, what: str):
    try:
        yield
    except nvml.NVMLError as exc:
        code = getattr(exc, "value", None)
        if code == nvml.NVML_ERROR_NO_PERMISSION:
            raise NoPermissionError(what) from exc
        if code == nvml.NVML_ERROR_NOT_SUPPORTED:
            raise NotSupportedError(f"{what}: not supported by this GPU or driver") from exc
        if code == nvml.NVML_ERROR_INVALID_ARGUMENT:
            raise InvalidClockError(f"{what}: the driver rejected the value (invalid argument)") from exc
        if code in (nvml.NVML_ERROR_LIBRARY_NOT_FOUND, nvml.NVML_ERROR_DRIVER_NOT_LOADED):
            raise DeviceUnavailableError(f"{what}: no NVIDIA driver ({exc})") from exc
        raise DeviceError(f"{what}: NVML error {exc}") from exc


def nvml_init(nvml) -> None:
    with _init_lock:
        if _init_counts.get(nvml, 0) == 0:
            with _nvml_errors(nvml, "nvmlInit"):
                nvml.nvmlInit()
        _init_counts[nvml] = _init_counts.get(nvml, 0) + 1


def nvml_shutdown(nvml) -> None:
    with _init_lock:
        left = max(0, _init_counts.get(nvml, 0) - 1)
        if left:
            _init_counts[nvml] = left
            return
        _init_counts.pop(nvml, None)
        with contextlib.suppress(Exception):
            nvml.nvmlShutdown()


def nvml_gpu_count(nvml) -> int:
    """Number of GPUs NVML sees (NVML must be initialised)."""
    with _nvml_errors(nvml, "nvmlDeviceGetCount"):
        return int(nvml.nvmlDeviceGetCount())


def _text(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def nvml_index_for_local(local_index: int, nvml) -> int:
    """NVML index of the GPU that CUDA calls ``local_index``.

    NVML ignores CUDA_VISIBLE_DEVICES, so entries are matched by index or UUID.
    """
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if not visible:
        return local_index
    entries = [e.strip() for e in visible.split(",") if e.strip()]
    if local_index >= len(entries):
        raise DeviceUnavailableError(
            f"GPU {local_index} is not visible: CUDA_VISIBLE_DEVICES={visible!r} lists {len(entries)}"
        )
    entry = entries[local_index]
    if entry.isdigit():
        return int(entry)
    with _nvml_errors(nvml, "nvmlDeviceGetCount"):
        count = nvml.nvmlDeviceGetCount()
    for i in range(count):
        with _nvml_errors(nvml, "nvmlDeviceGetUUID"):
            uuid = _text(nvml.nvmlDeviceGetUUID(nvml.nvmlDeviceGetHandleByIndex(i)))
        if uuid == entry or uuid.startswith(entry):
            return i
    raise DeviceUnavailableError(f"no GPU matches CUDA_VISIBLE_DEVICES entry {entry!r}")


class NvmlDevice(Device):
    """A GPU driven through NVML. Writes need root or CAP_SYS_ADMIN (see ``kdvfs info``)."""

    kind = "nvml"

    def __init__(self, index: int = 0, nvml=None, marker_factory=None, *, nvml_index: Optional[int] = None):
        """GPU ``index`` as CUDA numbers it; ``nvml_index`` instead names NVML's own numbering
        (the ``kdvfs`` command works on every GPU, whatever CUDA_VISIBLE_DEVICES says)."""
        self.nvml = nvml if nvml is not None else import_nvml()
        nvml_init(self.nvml)
        try:
            self.index = index if nvml_index is None else nvml_index
            self.nvml_index = nvml_index_for_local(index, self.nvml) if nvml_index is None else nvml_index
            with self._errors(f"opening GPU {self.nvml_index} (nvmlDeviceGetHandleByIndex)"):
                self.handle = self.nvml.nvmlDeviceGetHandleByIndex(self.nvml_index)
        except BaseException:
            nvml_shutdown(self.nvml)
            raise
        # Resolved at the first marker: choosing it imports torch, which `kdvfs info` and
        # `kdvfs reset` never need.
        self._marker_factory = marker_factory
        self._info: Optional[DeviceInfo] = None
        self._closed = False

    @classmethod
    def open_by_uuid(cls, uuid: str, nvml=None, marker_factory=None) -> "NvmlDevice":
        """The GPU whose NVML UUID is ``uuid`` (state files name GPUs by UUID: indices can change)."""
        nvml = nvml if nvml is not None else import_nvml()
        nvml_init(nvml)
        try:
            for i in range(nvml_gpu_count(nvml)):
                with _nvml_errors(nvml, "nvmlDeviceGetUUID"):
                    if _text(nvml.nvmlDeviceGetUUID(nvml.nvmlDeviceGetHandleByIndex(i))) == uuid:
                        return cls(nvml=nvml, marker_factory=marker_factory, nvml_index=i)
        finally:
            nvml_shutdown(nvml)
        raise DeviceUnavailableError(
            f"no GPU with UUID {uuid} on this machine (`kdvfs info` lists them); "
            "if the GPU was removed, delete its state file"
        )

    def _errors(self, what: str):
        return _nvml_errors(self.nvml, what)

    # ------------------------------------------------------------------ readings
    def info(self) -> DeviceInfo:
        if self._info is None:
            n = self.nvml
            with self._errors("reading device information"):
                name = _text(n.nvmlDeviceGetName(self.handle))
                uuid = _text(n.nvmlDeviceGetUUID(self.handle))
                driver = _text(n.nvmlSystemGetDriverVersion())
                mem = [int(m) for m in n.nvmlDeviceGetSupportedMemoryClocks(self.handle)]
                sm_by_mem = {
                    m: tuple(sorted((int(s) for s in n.nvmlDeviceGetSupportedGraphicsClocks(self.handle, m)), reverse=True))
                    for m in mem
                }
                power_limit_w = n.nvmlDeviceGetEnforcedPowerLimit(self.handle) / 1000.0
            mem_sorted = tuple(sorted(mem, reverse=True))
            default = ClockPair(sm_by_mem[mem_sorted[0]][0], mem_sorted[0])
            self._info = DeviceInfo(
                kind=self.kind, index=self.index, name=name, uuid=uuid, driver=driver,
                clocks=ClockTable(mem_sorted, sm_by_mem, default), power_limit_w=power_limit_w,
                can_write_clocks=writes_permitted(),
            )
        return self._info

    def current_clocks(self) -> ClockPair:
        n = self.nvml
        with self._errors("nvmlDeviceGetClockInfo"):
            return ClockPair(
                int(n.nvmlDeviceGetClockInfo(self.handle, n.NVML_CLOCK_SM)),
                int(n.nvmlDeviceGetClockInfo(self.handle, n.NVML_CLOCK_MEM)),
            )

    def energy_mj(self) -> int:
        with self._errors("nvmlDeviceGetTotalEnergyConsumption"):
            return int(self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle))

    @property
    def power_source(self) -> str:
        """``instant`` where the GPU answers NVML's ``POWER_INSTANT`` field (a 100 ms average on
        the H100, following a step in power within ~0.11 s, 2.5 µs a read), else ``usage``:
        ``nvmlDeviceGetPowerUsage``, a ~1 s running average on the H100, so energy integrated
        from it lags the work by about half a second. Decided once, at the first reading."""
        if getattr(self, "_power_source", None) is None:
            self._power_source = "instant" if self._instant_mw() is not None else "usage"
        return self._power_source

    def _instant_mw(self) -> Optional[int]:
        """The instant power field in mW, or None where this GPU or NVML does not give it."""
        n = self.nvml
        field = getattr(n, "NVML_FI_DEV_POWER_INSTANT", None)
        get = getattr(n, "nvmlDeviceGetFieldValues", None)
        if field is None or get is None:
            return None
        try:
            fv = get(self.handle, [field])[0]
        except Exception:  # an older driver or a GPU without the field
            return None
        if getattr(fv, "nvmlReturn", 1) != 0:
            return None
        value = fv.value
        for attr in ("uiVal", "ulVal", "ullVal", "sllVal", "siVal"):  # by NVML's value type
            v = getattr(value, attr, None)
            if v and (fv.valueType != 0):
                return int(v)
        return int(getattr(value, "dVal", 0)) or None

    def power_mw(self) -> int:
        if self.power_source == "instant":
            mw = self._instant_mw()
            if mw is not None:
                return mw
        with self._errors("nvmlDeviceGetPowerUsage"):
            return int(self.nvml.nvmlDeviceGetPowerUsage(self.handle))

    def marker(self) -> Marker:
        if self._marker_factory is None:
            self._marker_factory = make_real_marker_factory()
        return self._marker_factory()

    # ------------------------------------------------------------------ writes
    def set_clocks(self, clocks: ClockPair, marker: Optional[Marker] = None) -> None:
        self.info().clocks.check(clocks)
        n = self.nvml
        with self._errors(f"locking memory clock at {clocks.mem_mhz} MHz"):
            n.nvmlDeviceSetMemoryLockedClocks(self.handle, clocks.mem_mhz, clocks.mem_mhz)
        with self._errors(f"locking SM clock at {clocks.sm_mhz} MHz"):
            n.nvmlDeviceSetGpuLockedClocks(self.handle, clocks.sm_mhz, clocks.sm_mhz)

    def reset_clocks(self, marker: Optional[Marker] = None) -> None:
        n = self.nvml
        with self._errors("resetting locked SM clocks"):
            n.nvmlDeviceResetGpuLockedClocks(self.handle)
        try:
            with self._errors("resetting locked memory clocks"):
                n.nvmlDeviceResetMemoryLockedClocks(self.handle)
        except NotSupportedError:
            pass  # GPUs before Ampere have no memory clock lock to undo

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            nvml_shutdown(self.nvml)


def writes_permitted() -> bool:
    """Whether this process may set clocks: the SYS_ADMIN capability (bit 21 of CapEff).

    The capability decides, not the user id: root in a container started without
    ``--cap-add SYS_ADMIN`` is refused by the driver. Only where the capabilities cannot be
    read does root count as permitted.
    """
    caps = effective_capabilities()
    if caps is not None:
        return bool(caps >> 21 & 1)
    return hasattr(os, "geteuid") and os.geteuid() == 0


def effective_capabilities() -> Optional[int]:
    """This process's effective capability mask, or None where the system does not show it."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return int(line.split()[1], 16)
    except (OSError, ValueError, IndexError):
        pass
    return None
