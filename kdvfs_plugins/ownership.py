"""Who owns a GPU's clocks machine-wide, and the files that record it (standard library only).

Shared by the guard (runs that write clocks through NVML themselves) and by kdvfsd, so that
both agree on one writer per GPU whatever their users, home directories or state directories:

- :func:`lock_gpu`: an exclusive ``flock`` on ``<lock dir>/gpu-<uuid>.lock`` in one system-wide
  directory (``$KDVFS_LOCK_DIR``, default ``/run/lock/kdvfs``). The kernel drops it when the
  last holder dies, SIGKILL included; the holder's pid comes from ``/proc/locks``, which no
  process can forge.
- :func:`write_json` / :func:`read_json`: state files that are never written through a planted
  symlink or hard link (``O_NOFOLLOW``, ``O_EXCL`` for the temporary file, an atomic rename).
- :func:`check_private_dir`: a state directory that another user can write is refused: that
  user could plant the files a root run then writes.
- :func:`boot_id`: recorded in state files, so that a record from an earlier boot (clocks went
  back to the default at the reboot) is forgotten instead of resetting whatever is locked now.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import secrets
import stat
from pathlib import Path
from typing import Optional

LOCK_DIR_ENV = "KDVFS_LOCK_DIR"
#: /run/lock is tmpfs (emptied at boot) and writable by every user on common distributions.
DEFAULT_LOCK_DIR = "/run/lock/kdvfs"
_BOOT_ID = "/proc/sys/kernel/random/boot_id"


class UnsafePathError(OSError):
    """A state or lock path that must not be used (symlink, another user's file or directory)."""


class GpuLockedElsewhere(Exception):
    """Another process holds the GPU's system-wide lock."""

    def __init__(self, uuid: str, owner_pid: Optional[int], lock_path: str):
        self.uuid, self.owner_pid, self.lock_path = uuid, owner_pid, lock_path
        super().__init__(f"GPU {uuid} is locked by process {owner_pid or '?'} ({lock_path})")


def safe_name(uuid: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in uuid)


def system_lock_dir() -> str:
    return os.environ.get(LOCK_DIR_ENV) or DEFAULT_LOCK_DIR


def boot_id() -> Optional[str]:
    try:
        with open(_BOOT_ID) as f:
            return f.read().strip() or None
    except OSError:
        return None


# ---------------------------------------------------------------------- directories
def check_private_dir(path: str | os.PathLike, *, create: bool = True) -> Path:
    """``path`` as a directory that only this user can write; created (0700) if missing.

    Raises :class:`UnsafePathError` (an OSError) saying what is wrong: not a directory, a
    symlink, owned by another user, or writable by group or others.
    """
    p = Path(path)
    if create:
        try:
            p.mkdir(parents=True, exist_ok=True, mode=0o700)
        except FileExistsError:
            pass  # a file or a dangling link: reported below
    st = os.lstat(p)
    if stat.S_ISLNK(st.st_mode):
        raise UnsafePathError(errno.ELOOP, "it is a symbolic link; name the real directory")
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafePathError(errno.ENOTDIR, "it is not a directory")
    euid = os.geteuid()
    if st.st_uid != euid:
        raise UnsafePathError(errno.EPERM, f"it belongs to uid {st.st_uid}, not to this user (uid {euid}): "
                                           "that user could plant files this run would write")
    if st.st_mode & 0o022 == 0o020 and _private_group(st.st_gid, euid):
        return p  # group-writable, but the group is this user's own (a umask of 002 on such systems)
    if st.st_mode & 0o022:
        raise UnsafePathError(errno.EPERM, f"it is writable by {'others' if st.st_mode & 0o002 else 'its group'} "
                                           f"(mode {stat.S_IMODE(st.st_mode):04o}): they could plant files this "
                                           "run would write")
    return p


def _private_group(gid: int, uid: int) -> bool:
    """Whether ``gid`` is ``uid``'s own group (user private groups): its name is the user's and
    no one else is listed in it."""
    import grp
    import pwd

    try:
        user = pwd.getpwuid(uid).pw_name
        group = grp.getgrgid(gid)
    except KeyError:
        return False
    return group.gr_name == user and set(group.gr_mem) <= {user}


def _own_regular_file(fd: int, path) -> None:
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or st.st_uid != os.geteuid():
        raise UnsafePathError(errno.EPERM, f"{path} is not a plain file of this user (a hard link, or "
                                           "planted by another user); remove it")


def open_lock_file(path: str | os.PathLike, *, private: bool = True) -> int:
    """Open (create) a lock file without following a symlink. ``private``: it must also be this
    user's own plain file, since its content (the owner's pid) is written."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600 if private else 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafePathError(errno.ELOOP, f"{path} is a symbolic link; remove it") from None
        raise
    if private:
        try:
            _own_regular_file(fd, path)
        except BaseException:
            os.close(fd)
            raise
    return fd


# ---------------------------------------------------------------------- state files
def write_json(path: str | os.PathLike, obj, *, mode: int = 0o600, indent: Optional[int] = None) -> None:
    """Write ``obj`` to ``path`` atomically; never through a planted link (fsynced)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(obj, indent=indent))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # replaces a planted link itself, never its target
    except BaseException:
        with _suppress():
            os.unlink(tmp)
        raise


def read_json(path: str | os.PathLike) -> Optional[dict]:
    """The JSON object in ``path``; {} when it is unreadable, not JSON or not an object; None
    when it does not exist. Never follows a symlink."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError:
        return {}
    try:
        with os.fdopen(fd, "rb") as f:
            data = f.read(1 << 16)
        obj = json.loads(data)
    except (OSError, ValueError, RecursionError):
        return {}
    return obj if isinstance(obj, dict) else {}


class _suppress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return exc[0] is not None and issubclass(exc[0], OSError)


# ---------------------------------------------------------------------- the system-wide lock
def gpu_lock_path(uuid: str, lock_dir: Optional[str] = None) -> Path:
    return Path(lock_dir or system_lock_dir()) / f"gpu-{safe_name(uuid)}.lock"


def _ensure_lock_dir(d: Path) -> None:
    if not d.exists():
        old = os.umask(0)
        try:
            # Sticky and open to all, as /tmp: each writer creates its own lock file, none can
            # remove or replace another's.
            d.mkdir(parents=True, exist_ok=True, mode=0o1777)
        finally:
            os.umask(old)
    st = os.lstat(d)
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafePathError(errno.ENOTDIR, f"{d} is not a directory (a link, or a file)")
    if st.st_mode & 0o002 and not st.st_mode & stat.S_ISVTX:
        # Without the sticky bit anyone could delete a held lock file and make a second one.
        raise UnsafePathError(errno.EPERM, f"{d} is writable by all but not sticky (chmod +t it)")


def lock_gpu(uuid: str, lock_dir: Optional[str] = None) -> int:
    """Take the GPU's system-wide lock; returns its fd (close it, or die, to release).

    Raises :class:`GpuLockedElsewhere` naming the holder's pid, or OSError when the lock
    directory cannot be used.
    """
    path = gpu_lock_path(uuid, lock_dir)
    _ensure_lock_dir(path.parent)
    try:
        # Read-only is enough for flock, so a lock file made by another user serves everyone.
        fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafePathError(errno.ELOOP, f"{path} is a symbolic link; remove it") from None
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UnsafePathError(errno.EPERM, f"{path} is not a plain file; remove it")
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        owner = lock_holder(fd)
        os.close(fd)
        raise GpuLockedElsewhere(uuid, owner, str(path)) from None
    except BaseException:
        os.close(fd)
        raise
    return fd


def lock_holder(fd: int) -> Optional[int]:
    """The pid holding a ``flock`` on the file open at ``fd``, from ``/proc/locks``."""
    try:
        st = os.fstat(fd)
        want = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
        with open("/proc/locks") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 6 and parts[1] == "FLOCK" and parts[5] == want:
                    return int(parts[4]) or None
    except (OSError, ValueError):
        pass
    return None


# ---------------------------------------------------------------------- what "restore" means
RESTORE_ENV = "KDVFS_RESTORE_CLOCKS"


def restore_clocks_from_env() -> Optional[tuple[int, int]]:
    """The site's clocks to restore to, ``KDVFS_RESTORE_CLOCKS="SM/MEM"`` in MHz, or None.

    NVML cannot read back locked clocks, so kdvfs cannot see an administrator's lock before it
    writes; by default a restore unlocks (the driver's default). A site that keeps its GPUs
    locked names those clocks here. ValueError when the value is malformed.
    """
    raw = os.environ.get(RESTORE_ENV, "").strip()
    if not raw:
        return None
    parts = raw.replace(",", "/").split("/")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"{RESTORE_ENV}={raw!r} is not SM/MEM in whole MHz, e.g. \"1410/1593\"; "
                         "unset it to restore the driver's default clocks")
    sm_mhz, mem_mhz = (int(p) for p in parts)
    if not (0 < sm_mhz < 100_000 and 0 < mem_mhz < 100_000):
        raise ValueError(f"{RESTORE_ENV}={raw!r}: clocks must be between 1 and 99999 MHz")
    return sm_mhz, mem_mhz
