"""The guard's watchdog: restores a GPU's clocks within milliseconds of its writer's death.

A signal handler cannot run after SIGKILL (or the OOM killer), so :class:`~kdvfs_plugins.guard.ClockGuard`
starts this small helper process when it takes a GPU. The helper opens NVML at once, says it is
ready, and then sleeps on two things the kernel wakes it for when the writer dies, however it
dies: the far end of a pipe (EOF) and a pidfd on the writer (for a forked child that inherited
the pipe). The writer tells it over the pipe when clocks are locked (``L``), restored (``U``), and
when it ends normally (``Q``). Dying with clocks locked, the helper restores them (the driver
default, or ``KDVFS_RESTORE_CLOCKS``), removes the writer's state file and exits. It holds the
writer's GPU locks meanwhile (inherited), so no new writer starts on the GPU before it is done.

Run as ``python -m kdvfs_plugins.watchdog FD_IN FD_READY UUID STATE_FILE WRITER_PID``; standard
library and ``pynvml`` only, so that it is ready within a fraction of a second.
"""
from __future__ import annotations

import os
import select
import signal
import sys

from .ownership import restore_clocks_from_env

#: Signals a job's process group or its scheduler sends: the writer restores on them itself, and
#: the watchdog must outlive it to cover the writer's SIGKILL that may follow.
_IGNORED = ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGPIPE", "SIGALRM")


def _say(msg: str) -> None:
    try:
        os.write(2, f"kdvfs watchdog: {msg}\n".encode())
    except OSError:
        pass


def _restore(nvml, handle, uuid: str) -> str:
    target = restore_clocks_from_env()
    try:
        if target is not None:
            sm_mhz, mem_mhz = target
            nvml.nvmlDeviceSetMemoryLockedClocks(handle, mem_mhz, mem_mhz)
            nvml.nvmlDeviceSetGpuLockedClocks(handle, sm_mhz, sm_mhz)
            return f"locked at {sm_mhz}/{mem_mhz} MHz (KDVFS_RESTORE_CLOCKS)"
        nvml.nvmlDeviceResetGpuLockedClocks(handle)
        try:
            nvml.nvmlDeviceResetMemoryLockedClocks(handle)
        except nvml.NVMLError as exc:
            if getattr(exc, "value", None) != getattr(nvml, "NVML_ERROR_NOT_SUPPORTED", 3):
                raise
        return "unlocked (driver default)"
    except Exception as exc:  # noqa: BLE001 - reported; the state file stays for `kdvfs reset`
        return f"FAILED ({type(exc).__name__}: {exc}); run `kdvfs reset`"


def main(argv: list[str]) -> int:
    fd_in, fd_ready, uuid, state_file, writer_pid = int(argv[0]), int(argv[1]), argv[2], argv[3], int(argv[4])
    for name in _IGNORED:
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)
    import pynvml as nvml

    nvml.nvmlInit()
    handle = None
    for i in range(int(nvml.nvmlDeviceGetCount())):
        h = nvml.nvmlDeviceGetHandleByIndex(i)
        u = nvml.nvmlDeviceGetUUID(h)
        if (u.decode() if isinstance(u, bytes) else str(u)) == uuid:
            handle = h
            break
    if handle is None:
        _say(f"no GPU {uuid}; not watching")
        return 1
    pidfd = None
    if hasattr(os, "pidfd_open"):
        try:
            pidfd = os.pidfd_open(writer_pid)
        except OSError:
            pidfd = None  # already gone (handled by EOF) or no pidfd support
    os.set_blocking(fd_in, False)
    os.write(fd_ready, b"R")
    os.close(fd_ready)
    poll = select.poll()
    poll.register(fd_in, select.POLLIN | select.POLLHUP)
    if pidfd is not None:
        poll.register(pidfd, select.POLLIN)
    locked = False
    while True:
        poll.poll()
        died = False
        while True:  # drain what the writer said before it went
            try:
                data = os.read(fd_in, 256)
            except BlockingIOError:
                break
            if not data:
                died = True
                break
            for ch in data.decode("ascii", "replace"):
                if ch == "L":
                    locked = True
                elif ch == "U":
                    locked = False
                elif ch == "Q":
                    return 0
        if pidfd is not None and select.select([pidfd], [], [], 0)[0]:
            died = True
        if died:
            break
    if locked:
        result = _restore(nvml, handle, uuid)
        if not result.startswith("FAILED"):
            try:
                os.unlink(state_file)
            except OSError:
                pass
        _say(f"process {writer_pid} died with GPU {uuid} clocks locked; {result}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
