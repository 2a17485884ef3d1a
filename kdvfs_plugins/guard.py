"""The clock owner: restores what kdvfs changed, whatever way the process ends.

- One writer per GPU: an exclusive ``flock`` on ``<state_dir>/gpu-<uuid>.lock``; the kernel drops
  it when the process dies, even by SIGKILL.
- Before the first write, ``gpu-<uuid>.json`` records what is about to change. A normal end, an
  exception, SIGINT, SIGTERM or interpreter exit restores the clocks and removes it. After a
  SIGKILL the file stays; the next start on that GPU, or ``kdvfs reset``, restores and removes it.
"""
from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Callable, Optional

from .errors import GpuBusyError, NoPermissionError
from .log import logger

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _safe_name(uuid: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in uuid)


def state_paths(state_dir: str | os.PathLike, uuid: str) -> tuple[Path, Path]:
    base = Path(state_dir) / f"gpu-{_safe_name(uuid)}"
    return base.with_suffix(".lock"), base.with_suffix(".json")


class ClockGuard:
    """Owns one GPU's clocks for this process. Use :meth:`acquire`, then :meth:`write` for changes."""

    def __init__(self, device, state_dir: str | os.PathLike, *, handle_signals: bool = True):
        self.device = device
        info = device.info()
        self.uuid = info.uuid
        self.state_dir = Path(state_dir)
        self.lock_path, self.state_path = state_paths(state_dir, self.uuid)
        self.handle_signals = handle_signals
        self._lock = threading.RLock()
        self._fd: Optional[int] = None
        self._dirty = False
        self._closed = False
        #: A dead writer's state file that could not be restored (no permission) and must survive.
        self._inherited = False
        self._previous_handlers: dict = {}

    # ------------------------------------------------------------------ ownership
    def acquire(self) -> None:
        """Become the GPU's one writer; restore what a crashed writer left behind."""
        self._take_lock()
        try:
            self._restore_stale()
        except BaseException:
            self._drop_lock()
            raise
        atexit.register(self.release)
        if self.handle_signals and threading.current_thread() is threading.main_thread():
            for sig in _SIGNALS:
                self._previous_handlers[sig] = signal.signal(sig, self._on_signal)

    def _take_lock(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _read_pid(fd)
            os.close(fd)
            raise GpuBusyError(self.uuid, owner, str(self.lock_path)) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd

    def _drop_lock(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._fd, fcntl.LOCK_UN)
                os.close(self._fd)
            self._fd = None

    def _restore_stale(self, *, quiet: bool = False) -> Optional[dict]:
        """Reset clocks a dead writer left locked (we hold the lock). Returns its record, if any."""
        if not self.state_path.exists():
            return None
        stale = _read_json(self.state_path)
        stale.setdefault("state_file", str(self.state_path))
        if not quiet:
            logger.warning(
                "GPU %s: process %s left clocks locked (%s); restoring them now",
                self.uuid, stale.get("pid", "?"), self.state_path,
            )
        try:
            self.device.reset_clocks()
        except NoPermissionError as exc:
            if quiet:
                raise
            # This run may still measure (observe); the file stays so that a permitted
            # `kdvfs reset` can finish the job later.
            logger.warning("GPU %s stays locked: %s Run `kdvfs reset` with permission.", self.uuid, exc)
            self._inherited = True
            return stale
        self.state_path.unlink(missing_ok=True)
        return stale

    def write(self, change: Callable[[], None]) -> bool:
        """Run a clock change unless the guard has closed. Records the change first."""
        with self._lock:
            if self._closed:
                return False
            first = not self._dirty
            if first:
                self._record()
                self._dirty = True
            try:
                change()
            except NoPermissionError:
                # Permission covers both locks, so a refused first write changed nothing.
                if first and not self._inherited:
                    self.state_path.unlink(missing_ok=True)
                    self._dirty = False
                raise
            if self._closed:
                # A signal handler on this thread released the guard while the change ran.
                self.device.reset_clocks()
                self.state_path.unlink(missing_ok=True)
            return True

    def _record(self) -> None:
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({
            "pid": os.getpid(), "uuid": self.uuid, "device_kind": self.device.kind,
            "changed": ["sm_locked_clocks", "mem_locked_clocks"], "found": "unlocked",
            "since": time.time(),
        }))
        with open(tmp) as f:
            os.fsync(f.fileno())
        os.replace(tmp, self.state_path)

    # ------------------------------------------------------------------ restore
    def restore(self) -> None:
        """Put the clocks back as found (unlocked) if kdvfs changed them. Idempotent."""
        with self._lock:
            if self._dirty:
                self.device.reset_clocks()
                # After a fall back to observe the reset above wrote nothing: keep a record that
                # this run did not create.
                if not self._inherited or self.device.kind == "nvml":
                    self.state_path.unlink(missing_ok=True)
                self._dirty = False

    def release(self) -> None:
        """Restore, stop writing, and give up ownership of the GPU."""
        with self._lock:
            if self._closed:
                return
            try:
                self.restore()
            finally:
                self._closed = True
                self._drop_lock()
                self._restore_handlers()
                with contextlib.suppress(Exception):
                    atexit.unregister(self.release)

    def _restore_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig, prev in self._previous_handlers.items():
            with contextlib.suppress(Exception):
                if signal.getsignal(sig) == self._on_signal:
                    signal.signal(sig, prev)
        self._previous_handlers.clear()

    def _on_signal(self, signum, frame) -> None:
        prev = self._previous_handlers.get(signum)
        try:
            self.release()
        finally:
            if callable(prev):
                prev(signum, frame)
            elif prev == signal.SIG_IGN:
                return
            else:
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)


def _read_pid(fd: int) -> Optional[int]:
    with contextlib.suppress(Exception):
        os.lseek(fd, 0, os.SEEK_SET)
        return int(os.read(fd, 32).decode().strip() or 0) or None
    return None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def all_states(state_dir: str | os.PathLike) -> list[dict]:
    """Every state file, each with ``alive``: whether its writer still holds the GPU's lock."""
    out = []
    for state in sorted(Path(state_dir).glob("gpu-*.json")):
        lock = state.with_suffix(".lock")
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
            alive, owner = False, None
        except BlockingIOError:
            alive, owner = True, _read_pid(fd)
        finally:
            os.close(fd)
        rec = _read_json(state)
        rec["state_file"] = str(state)
        rec["alive"] = alive
        if alive:
            rec["owner_pid"] = owner
        out.append(rec)
    return out


def stale_states(state_dir: str | os.PathLike) -> list[dict]:
    """State files whose writer is gone (their lock is free): GPUs left with locked clocks."""
    return [rec for rec in all_states(state_dir) if not rec["alive"]]


def reclaim(device, state_dir: str | os.PathLike, *, force: bool = False) -> Optional[dict]:
    """Restore a GPU that a dead writer left locked, holding its lock meanwhile (``kdvfs reset``).

    Returns the dead writer's record, or None when there was none. ``force`` resets the locked
    clocks even without a record. GpuBusyError if a live writer owns the GPU; NoPermissionError
    if this process may not write clocks.
    """
    guard = ClockGuard(device, state_dir, handle_signals=False)
    guard._take_lock()
    try:
        rec = guard._restore_stale(quiet=True)
        if rec is None and force:
            device.reset_clocks()
        return rec
    finally:
        guard._drop_lock()
