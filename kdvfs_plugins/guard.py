"""The clock owner: restores what kdvfs changed, whatever way the process ends.

- One writer per GPU: an exclusive ``flock`` on ``<state_dir>/gpu-<uuid>.lock`` (this user's runs
  and ``kdvfs reset``), and one on the GPU's system-wide lock (:mod:`.ownership`: every user,
  every state directory, and kdvfsd). The kernel drops both when the process dies.
- Before the first write, ``gpu-<uuid>.json`` records what is about to change (with the boot
  ID). A normal end, an exception, interpreter exit, and every signal whose default action ends
  the process (SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1, ...) restore the clocks and remove it.
- After SIGKILL, the watchdog (:mod:`.watchdog`, a helper process started at :meth:`ClockGuard.acquire`)
  learns of the death from the kernel and restores within milliseconds. Should it die too, the
  file stays; the next start on that GPU, or ``kdvfs reset``, restores and removes it, unless it
  is from an earlier boot (the reboot already reset the clocks).
- "Restore" means unlock (the driver's default): NVML cannot read back locked clocks, so a lock
  an administrator set before the run cannot be seen. A site names its clocks in
  ``KDVFS_RESTORE_CLOCKS="SM/MEM"``, and restores lock those instead.
- State files are never written through a planted link, and a state directory another user
  can write is refused (:class:`StateDirError`; the run falls back to observe).
"""
from __future__ import annotations

import atexit
import contextlib
import errno
import fcntl
import os
import select
import signal
import subprocess
import sys
import threading
import time
import weakref
from pathlib import Path
from typing import Callable, Optional

from .errors import ConfigError, GpuBusyError, NoPermissionError, StateDirError
from .log import logger
from .ownership import (
    LOCK_DIR_ENV, RESTORE_ENV, GpuLockedElsewhere, UnsafePathError, boot_id, check_private_dir, lock_gpu, open_lock_file, read_json,
    restore_clocks_from_env, safe_name, write_json,
)

#: Restored on, whatever handler was there before (it is called afterwards).
_SIGNALS = (signal.SIGINT, signal.SIGTERM)
#: Restored on where their handler is the default, whose action ends the process. Faults
#: (SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGABRT from C) never reach a Python handler: the watchdog
#: covers them, as it covers SIGKILL.
_FATAL_BY_DEFAULT = tuple(getattr(signal, name) for name in (
    "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGALRM", "SIGVTALRM", "SIGPROF", "SIGXCPU", "SIGXFSZ",
    "SIGPIPE", "SIGIO", "SIGPWR", "SIGSTKFLT", "SIGABRT",
) if hasattr(signal, name)) + (
    # Real-time signals end the process by default too (those a library handles in C are skipped:
    # their handler is not the default).
    tuple(range(signal.SIGRTMIN, signal.SIGRTMAX + 1)) if hasattr(signal, "SIGRTMIN") else ())
WATCHDOG_ENV = "KDVFS_WATCHDOG"
#: After a busy refusal, writes are refused here for this long before the service is asked again.
BUSY_RETRY_S = 10.0
_guards: "weakref.WeakSet[ClockGuard]" = weakref.WeakSet()


def _safe_name(uuid: str) -> str:
    return safe_name(uuid)


def state_paths(state_dir: str | os.PathLike, uuid: str) -> tuple[Path, Path]:
    base = Path(state_dir) / f"gpu-{_safe_name(uuid)}"
    return base.with_suffix(".lock"), base.with_suffix(".json")


def site_restore_clocks():
    """``KDVFS_RESTORE_CLOCKS`` as a ClockPair, or None (restore = unlock). ConfigError if malformed."""
    from .clocks import ClockPair

    try:
        pair = restore_clocks_from_env()
    except ValueError:
        raise ConfigError(RESTORE_ENV, os.environ.get(RESTORE_ENV),
                          'allowed: SM/MEM in whole MHz from 1 to 99999, e.g. "1410/1593"; unset it to restore '
                          "the driver's default clocks", source="environment") from None
    return None if pair is None else ClockPair(*pair)


def _why(exc: OSError) -> str:
    if isinstance(exc, UnsafePathError):
        return str(exc.strerror)
    where = f" ({exc.filename})" if exc.filename else ""
    return f"cannot be created or opened: {exc.strerror or exc}{where}"


def _watchdog_wanted(device) -> bool:
    """A watchdog only where a child process can open the same NVML by name (``pynvml``)."""
    if os.environ.get(WATCHDOG_ENV, "1") == "0" or getattr(device, "via_service", False):
        return False
    nvml = sys.modules.get("pynvml")
    return nvml is not None and getattr(device, "nvml", None) is nvml


class _Watch:
    """The parent's end of a running watchdog."""

    __slots__ = ("proc", "to_fd", "ready_fd", "ready")

    def __init__(self, proc, to_fd: int, ready_fd: int):
        self.proc, self.to_fd, self.ready_fd, self.ready = proc, to_fd, ready_fd, False


class ClockGuard:
    """Owns one GPU's clocks for this process. Use :meth:`acquire`, then :meth:`write` for changes."""

    def __init__(self, device, state_dir: str | os.PathLike, *, handle_signals: bool = True):
        self.device = device
        info = device.info()
        self.uuid = info.uuid
        self.state_dir = Path(state_dir)
        self.lock_path, self.state_path = state_paths(state_dir, self.uuid)
        self.handle_signals = handle_signals
        #: Through kdvfsd the service owns the GPU machine-wide and restores it itself.
        self.via_service = bool(getattr(device, "via_service", False))
        self._lock = threading.RLock()
        self._fd: Optional[int] = None
        self._sys_fd: Optional[int] = None
        self._watch: Optional[_Watch] = None
        self._dirty = False
        self._closed = False
        #: A dead writer's state file that could not be restored (no permission) and must survive.
        self._inherited = False
        self._previous_handlers: dict = {}
        self.restore_to = None
        #: A busy refusal (another kdvfsd session owns the GPU) and until when it is answered
        #: from here: each attempt would otherwise write and fsync a record for nothing.
        self._busy: Optional[GpuBusyError] = None
        self._busy_until_s = 0.0

    # ------------------------------------------------------------------ ownership
    def acquire(self) -> None:
        """Become the GPU's one writer; restore what a crashed writer left behind."""
        self.restore_to = None if self.via_service else site_restore_clocks()
        self._take_lock()
        try:
            self._restore_stale()
            self._start_watchdog()
        except BaseException:
            self._stop_watchdog()
            self._drop_lock()
            raise
        _guards.add(self)
        atexit.register(self.release)
        if self.handle_signals and threading.current_thread() is threading.main_thread():
            for sig in _SIGNALS:
                self._previous_handlers[sig] = signal.signal(sig, self._on_signal)
            for sig in _FATAL_BY_DEFAULT:
                with contextlib.suppress(OSError, ValueError):
                    if signal.getsignal(sig) == signal.SIG_DFL:
                        self._previous_handlers[sig] = signal.signal(sig, self._on_signal)

    def _take_lock(self) -> None:
        try:
            check_private_dir(self.state_dir)
            fd = open_lock_file(self.lock_path)
        except OSError as exc:
            raise StateDirError(str(self.state_dir), _why(exc)) from None
        if not _flock_unless_alive(fd, lambda: _read_pid(fd)):
            owner = _read_pid(fd)
            os.close(fd)
            raise GpuBusyError(self.uuid, owner, str(self.lock_path)) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd
        if self.via_service:
            return
        try:
            self._sys_fd = _retry_while_restoring(lambda: lock_gpu(self.uuid))
        except GpuLockedElsewhere as exc:
            # Another user, state directory or kdvfsd session: its clocks are not this run's to touch.
            self._drop_lock()
            raise GpuBusyError(self.uuid, exc.owner_pid, exc.lock_path) from None
        except OSError as exc:
            self._drop_lock()
            raise StateDirError(str(self.state_dir), f"the GPU's system-wide lock cannot be taken ({_why(exc)})",
                                hint=f"Set {LOCK_DIR_ENV} to a directory every clock writer on this machine "
                                     "can create files in (default /run/lock/kdvfs)") from None

    def _drop_lock(self) -> None:
        if self._sys_fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._sys_fd, fcntl.LOCK_UN)
                os.close(self._sys_fd)
            self._sys_fd = None
        if self._fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._fd, fcntl.LOCK_UN)
                os.close(self._fd)
            self._fd = None

    def _put_back(self) -> None:
        """Restore the GPU: unlock, or lock the site's clocks (``KDVFS_RESTORE_CLOCKS``)."""
        if self.restore_to is not None:
            self.device.set_clocks(self.restore_to)
        else:
            self.device.reset_clocks()

    def _restore_stale(self, *, quiet: bool = False) -> Optional[dict]:
        """Reset clocks a dead writer left locked (we hold the lock). Returns its record, if any."""
        stale = read_json(self.state_path)
        if stale is None:
            return None
        if stale.get("boot_id") and stale["boot_id"] != boot_id():
            # The reboot reset the clocks; what is locked now is someone else's (an administrator's).
            logger.info("GPU %s: forgetting %s, left by process %s before the last reboot",
                        self.uuid, self.state_path, stale.get("pid", "?"))
            self.state_path.unlink(missing_ok=True)
            return None
        stale.setdefault("state_file", str(self.state_path))
        if not quiet:
            logger.warning(
                "GPU %s: process %s left clocks locked (%s); restoring them now",
                self.uuid, stale.get("pid", "?"), self.state_path,
            )
        try:
            self._put_back()
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
            if self._busy is not None and time.monotonic() < self._busy_until_s:
                raise self._busy.with_traceback(None)
            first = not self._dirty
            if first:
                self._record()
                self._dirty = True
            try:
                change()
            except (NoPermissionError, GpuBusyError) as exc:
                # Refused before anything changed: permission covers both locks, and a GPU that is
                # busy belongs to another writer (a kdvfsd session). Nothing of ours to restore.
                if first and not self._inherited:
                    self.state_path.unlink(missing_ok=True)
                    self._dirty = False
                    self._tell(b"U")
                if isinstance(exc, GpuBusyError):
                    self._busy, self._busy_until_s = exc, time.monotonic() + BUSY_RETRY_S
                raise
            if self._closed:
                # A signal handler on this thread released the guard while the change ran.
                self._put_back()
                self.state_path.unlink(missing_ok=True)
            return True

    def _record(self) -> None:
        try:
            write_json(self.state_path, {
                "pid": os.getpid(), "uuid": self.uuid, "device_kind": self.device.kind,
                "changed": ["sm_locked_clocks", "mem_locked_clocks"], "found": "unlocked",
                "restore_to": None if self.restore_to is None else self.restore_to.to_dict(),
                "boot_id": boot_id(), "since": time.time(),
            })
        except OSError as exc:
            raise StateDirError(str(self.state_dir), f"cannot write {self.state_path.name} ({_why(exc)})") from None
        self._await_watchdog()
        self._tell(b"L")

    # ------------------------------------------------------------------ the watchdog
    def _start_watchdog(self) -> None:
        if not _watchdog_wanted(self.device):
            return
        to_r, to_w = os.pipe()
        ready_r, ready_w = os.pipe()
        pkg_root = str(Path(__file__).resolve().parents[1])
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (pkg_root, env.get("PYTHONPATH")) if p)
        fds = [to_r, ready_w, self._fd] + ([self._sys_fd] if self._sys_fd is not None else [])
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "kdvfs_plugins.watchdog", str(to_r), str(ready_w), self.uuid,
                 str(self.state_path), str(os.getpid())],
                # It holds the GPU's locks until it has restored; its own session keeps a terminal's
                # Ctrl-C from reaching it.
                pass_fds=fds, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, env=env,
                start_new_session=True,
            )
        except OSError as exc:
            os.close(to_w)
            os.close(ready_r)
            logger.warning("could not start the clock watchdog (%s); after a SIGKILL run `kdvfs reset`", exc)
            return
        finally:
            os.close(to_r)
            os.close(ready_w)
        self._watch = _Watch(proc, to_w, ready_r)

    def _await_watchdog(self, timeout_s: float = 10.0) -> None:
        """Before the first write: the watchdog must be able to restore it."""
        w = self._watch
        if w is None or w.ready:
            return
        ok = False
        if select.select([w.ready_fd], [], [], timeout_s)[0]:
            with contextlib.suppress(OSError):
                ok = os.read(w.ready_fd, 1) == b"R"
        if ok:
            w.ready = True
            return
        logger.warning("the clock watchdog for GPU %s did not start; clocks are still restored on exit and "
                       "on signals, but after a SIGKILL run `kdvfs reset`", self.uuid)
        self._stop_watchdog()

    def _tell(self, msg: bytes) -> None:
        if self._watch is not None:
            with contextlib.suppress(OSError):
                os.write(self._watch.to_fd, msg)

    def _stop_watchdog(self) -> None:
        w, self._watch = self._watch, None
        if w is None:
            return
        with contextlib.suppress(OSError):
            os.write(w.to_fd, b"Q")
        for fd in (w.to_fd, w.ready_fd):
            with contextlib.suppress(OSError):
                os.close(fd)
        with contextlib.suppress(Exception):
            w.proc.wait(timeout=2.0)

    # ------------------------------------------------------------------ restore
    def restore(self) -> None:
        """Put the clocks back (unlocked, or the site's clocks) if kdvfs changed them. Idempotent."""
        with self._lock:
            if self._dirty:
                try:
                    self._put_back()
                except GpuBusyError:
                    pass  # another writer's GPU (kdvfsd refused this session): nothing of ours to undo
                # After a fall back to observe the reset above wrote nothing: keep a record that
                # this run did not create.
                if not self._inherited or self.device.can_write_clocks:
                    self.state_path.unlink(missing_ok=True)
                self._dirty = False
                self._tell(b"U")

    def release(self) -> None:
        """Restore, stop writing, and give up ownership of the GPU."""
        with self._lock:
            if self._closed:
                return
            try:
                self.restore()
            finally:
                self._closed = True
                self._stop_watchdog()
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

    def _forget_after_fork(self) -> None:
        """In a forked child (a data loader worker): this copy owns nothing and must not keep the
        watchdog's pipe open (its EOF is how the watchdog learns of the writer's death)."""
        w, self._watch = self._watch, None
        if w is not None:
            for fd in (w.to_fd, w.ready_fd):
                with contextlib.suppress(OSError):
                    os.close(fd)
        for fd in (self._fd, self._sys_fd):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)  # closing (not unlocking) leaves the parent's lock in place
        self._fd = self._sys_fd = None
        self._closed = True
        self._lock = threading.RLock()


def _after_fork_in_child() -> None:
    for g in list(_guards):
        g._forget_after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


#: How long a new writer waits for a dead writer's watchdog, which holds the locks until it has
#: restored the clocks (milliseconds, as a rule).
_WATCHDOG_GRACE_S = 3.0


def _pid_gone(pid: Optional[int]) -> bool:
    if not pid:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (OSError, IndexError):
        return True


def _flock_unless_alive(fd: int, owner: Callable[[], Optional[int]]) -> bool:
    """Lock ``fd``; while the owner is dead (its watchdog restoring), wait a moment for it."""
    deadline = time.monotonic() + _WATCHDOG_GRACE_S
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if not _pid_gone(owner()) or time.monotonic() > deadline:
                return False
            time.sleep(0.005)


def _retry_while_restoring(take):
    deadline = time.monotonic() + _WATCHDOG_GRACE_S
    while True:
        try:
            return take()
        except GpuLockedElsewhere as exc:
            if not _pid_gone(exc.owner_pid) or time.monotonic() > deadline:
                raise
            time.sleep(0.005)


def _read_pid(fd: int) -> Optional[int]:
    with contextlib.suppress(Exception):
        os.lseek(fd, 0, os.SEEK_SET)
        return int(os.read(fd, 32).decode().strip() or 0) or None
    return None


def _read_json(path: Path) -> dict:
    """A state file's record: {} when unreadable or not a JSON object (never follows a link)."""
    return read_json(path) or {}


def all_states(state_dir: str | os.PathLike) -> list[dict]:
    """Every state file, each with ``alive``: whether its writer still holds the GPU's lock."""
    out = []
    d = Path(state_dir)
    if not d.is_dir():
        return out
    for state in sorted(d.glob("gpu-*.json")):
        lock = state.with_suffix(".lock")
        rec = dict(_read_json(state))
        rec["state_file"] = str(state)
        try:
            fd = open_lock_file(lock)
        except OSError as exc:
            rec.update(alive=False, error=f"cannot check its lock {lock}: {_why(exc)}")
            out.append(rec)
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
            alive, owner = False, None
        except BlockingIOError:
            alive, owner = True, _read_pid(fd)
        finally:
            os.close(fd)
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
    guard.restore_to = site_restore_clocks()
    guard._take_lock()
    try:
        rec = guard._restore_stale(quiet=True)
        if rec is None and force:
            guard._put_back()
        return rec
    finally:
        guard._drop_lock()
