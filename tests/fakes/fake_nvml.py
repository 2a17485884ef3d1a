"""A fake ``pynvml`` that keeps state, for testing every clock write without a GPU.

It models an H100 (clock lists from the measured data), locked SM and memory clocks with their
resets, NVMLError_NoPermission when unprivileged, NVMLError_InvalidArgument for unsupported
clocks, and an energy counter that grows with time. State can live in a JSON file so that
several processes (a killed run, then ``kdvfs reset``) see the same GPU.
"""
from __future__ import annotations

import fcntl
import json
import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from kdvfs_plugins.data import h100_clock_lists, h100_default_clocks

NVML_SUCCESS = 0
NVML_ERROR_UNINITIALIZED = 1
NVML_ERROR_INVALID_ARGUMENT = 2
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NO_PERMISSION = 4
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_LIBRARY_NOT_FOUND = 12
NVML_CLOCK_GRAPHICS = 0
NVML_CLOCK_SM = 1
NVML_CLOCK_MEM = 2


class NVMLError(Exception):
    _by_code: dict = {}

    def __new__(cls, value):
        sub = NVMLError._by_code.get(value, cls) if cls is NVMLError else cls
        obj = Exception.__new__(sub)
        obj.value = value
        return obj

    def __init__(self, value):
        self.value = value
        super().__init__(value)

    def __str__(self):
        return {2: "Invalid Argument", 3: "Not Supported", 4: "Insufficient Permissions",
                12: "NVML Shared Library Not Found"}.get(self.value, f"error {self.value}")


def _sub(name, code):
    cls = type(name, (NVMLError,), {})
    NVMLError._by_code[code] = cls
    return cls


NVMLError_InvalidArgument = _sub("NVMLError_InvalidArgument", NVML_ERROR_INVALID_ARGUMENT)
NVMLError_NotSupported = _sub("NVMLError_NotSupported", NVML_ERROR_NOT_SUPPORTED)
NVMLError_NoPermission = _sub("NVMLError_NoPermission", NVML_ERROR_NO_PERMISSION)
NVMLError_Uninitialized = _sub("NVMLError_Uninitialized", NVML_ERROR_UNINITIALIZED)
NVMLError_LibraryNotFound = _sub("NVMLError_LibraryNotFound", NVML_ERROR_LIBRARY_NOT_FOUND)

_MEM, _SM = h100_clock_lists()
_DEV = h100_default_clocks()["device"]


class FakeNvml:
    """Stands in for the ``pynvml`` module (pass it as ``nvml=`` or install it as ``pynvml``)."""

    NVMLError = NVMLError
    NVMLError_InvalidArgument = NVMLError_InvalidArgument
    NVMLError_NotSupported = NVMLError_NotSupported
    NVMLError_NoPermission = NVMLError_NoPermission
    NVML_ERROR_INVALID_ARGUMENT = NVML_ERROR_INVALID_ARGUMENT
    NVML_ERROR_NOT_SUPPORTED = NVML_ERROR_NOT_SUPPORTED
    NVML_ERROR_NO_PERMISSION = NVML_ERROR_NO_PERMISSION
    NVML_ERROR_DRIVER_NOT_LOADED = NVML_ERROR_DRIVER_NOT_LOADED
    NVML_ERROR_LIBRARY_NOT_FOUND = NVML_ERROR_LIBRARY_NOT_FOUND
    NVML_CLOCK_GRAPHICS = NVML_CLOCK_GRAPHICS
    NVML_CLOCK_SM = NVML_CLOCK_SM
    NVML_CLOCK_MEM = NVML_CLOCK_MEM

    def __init__(self, gpus: int = 1, privileged: bool = True, state_path: str | os.PathLike | None = None,
                 driver: bool = True):
        self.state_path = Path(state_path) if state_path else None
        self.driver = driver
        self._mem_state = None
        self.calls: list[tuple] = []
        self._initialised = 0
        # A signal handler may re-enter the fake on the thread that holds the file lock (a real
        # driver call would simply finish first): let that thread in instead of deadlocking.
        self._tlock = threading.RLock()
        self._depth = 0
        if self.state_path is None or not self.state_path.exists():
            self._save({
                "privileged": privileged,
                "gpus": [self._fresh_gpu(i) for i in range(gpus)],
                "t0": time.time(),
            })

    @staticmethod
    def _fresh_gpu(i):
        return {"uuid": f"GPU-fake-{i:04d}", "sm_locked": None, "mem_locked": None, "writes": 0}

    # --------------------------------------------------------------- state
    @contextmanager
    def _state(self, write=False):
        if self.state_path is None:
            yield self._mem_state
            return
        with self._tlock:
            lk = None
            if self._depth == 0:
                lk = open(self.state_path.with_suffix(".lock"), "a+")
                fcntl.flock(lk, fcntl.LOCK_EX)
            self._depth += 1
            try:
                state = json.loads(self.state_path.read_text())
                yield state
                if write:
                    self._save(state)
            finally:
                self._depth -= 1
                if lk is not None:
                    lk.close()

    def _save(self, state):
        if self.state_path is None:
            self._mem_state = state
        else:
            # Atomic: a process killed mid-write, or a reader, never sees half a file.
            tmp = self.state_path.with_name(f"{self.state_path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(state))
            os.replace(tmp, self.state_path)

    @property
    def privileged(self) -> bool:
        with self._state() as s:
            return s["privileged"]

    @privileged.setter
    def privileged(self, value: bool) -> None:
        with self._state(write=True) as s:
            s["privileged"] = value

    def gpu_state(self, i: int = 0) -> dict:
        """A copy of GPU i's state: sm_locked, mem_locked ([min, max] or None), writes."""
        with self._state() as s:
            return dict(s["gpus"][i])

    def lock(self, i: int, sm_mhz: int, mem_mhz: int) -> None:
        """Put GPU i in a locked state directly (as another tool would)."""
        with self._state(write=True) as s:
            s["gpus"][i]["sm_locked"] = [sm_mhz, sm_mhz]
            s["gpus"][i]["mem_locked"] = [mem_mhz, mem_mhz]

    # --------------------------------------------------------------- NVML API
    def _check_init(self):
        if self._initialised <= 0:
            raise NVMLError(NVML_ERROR_UNINITIALIZED)

    def nvmlInit(self):
        if not self.driver:
            raise NVMLError(NVML_ERROR_LIBRARY_NOT_FOUND)
        self._initialised += 1

    def nvmlShutdown(self):
        self._initialised -= 1

    def nvmlDeviceGetCount(self):
        self._check_init()
        with self._state() as s:
            return len(s["gpus"])

    def nvmlDeviceGetHandleByIndex(self, i):
        self._check_init()
        if not 0 <= i < self.nvmlDeviceGetCount():
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        return i

    def nvmlDeviceGetUUID(self, h):
        with self._state() as s:
            return s["gpus"][h]["uuid"]

    def nvmlDeviceGetName(self, h):
        return _DEV["name"]

    def nvmlSystemGetDriverVersion(self):
        return _DEV["driver"]

    def nvmlDeviceGetSupportedMemoryClocks(self, h):
        return list(_MEM)

    def nvmlDeviceGetSupportedGraphicsClocks(self, h, mem_mhz):
        if mem_mhz not in _MEM:
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        return list(_SM)

    def nvmlDeviceGetEnforcedPowerLimit(self, h):
        return int(_DEV["power_limit_W"] * 1000)

    def nvmlDeviceGetClockInfo(self, h, clock_type):
        g = self.gpu_state(h)
        if clock_type == NVML_CLOCK_MEM:
            return g["mem_locked"][0] if g["mem_locked"] else _MEM[0]
        return g["sm_locked"][0] if g["sm_locked"] else 1755

    def nvmlDeviceGetTotalEnergyConsumption(self, h):
        with self._state() as s:
            return int((time.time() - s["t0"]) * 500_000)  # 500 W, in mJ

    def nvmlDeviceGetPowerUsage(self, h):
        return 500_000

    #: Set False to stand for a GPU or driver without the instant power field.
    has_power_instant = True
    NVML_FI_DEV_POWER_INSTANT = 186

    def nvmlDeviceGetFieldValues(self, h, fields):
        from types import SimpleNamespace

        if not self.has_power_instant:
            return [SimpleNamespace(nvmlReturn=3, valueType=1, value=SimpleNamespace(uiVal=0)) for _ in fields]
        return [SimpleNamespace(nvmlReturn=0, valueType=1, value=SimpleNamespace(uiVal=612_000)) for _ in fields]

    def _write(self, h, key, value):
        self.calls.append((key, h, value))
        with self._state(write=True) as s:
            if not s["privileged"]:
                raise NVMLError(NVML_ERROR_NO_PERMISSION)
            s["gpus"][h][key] = value
            s["gpus"][h]["writes"] += 1

    def nvmlDeviceSetGpuLockedClocks(self, h, min_mhz, max_mhz):
        if min_mhz not in _SM or max_mhz not in _SM or min_mhz > max_mhz:
            self.calls.append(("sm_locked", h, "invalid"))
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        self._write(h, "sm_locked", [min_mhz, max_mhz])

    def nvmlDeviceSetMemoryLockedClocks(self, h, min_mhz, max_mhz):
        if min_mhz not in _MEM or max_mhz not in _MEM or min_mhz > max_mhz:
            self.calls.append(("mem_locked", h, "invalid"))
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        self._write(h, "mem_locked", [min_mhz, max_mhz])

    def nvmlDeviceResetGpuLockedClocks(self, h):
        self._write(h, "sm_locked", None)

    def nvmlDeviceResetMemoryLockedClocks(self, h):
        self._write(h, "mem_locked", None)
