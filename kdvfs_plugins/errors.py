"""Typed errors. Every message says what went wrong and what to do about it."""
from __future__ import annotations


class KdvfsError(Exception):
    """Base class of every error kdvfs raises on purpose."""


class ConfigError(KdvfsError, ValueError):
    """A configuration key or value is not allowed.

    Raised before training starts, naming the key, the value and what is allowed.
    """

    def __init__(self, key: str, value: object, allowed: str, source: str = "kdvfs config"):
        self.key = key
        self.value = value
        self.allowed = allowed
        self.source = source
        super().__init__(f"{source}: {key}={value!r} is not allowed; {allowed}")


class DeviceError(KdvfsError):
    """A device operation failed."""


class NoPermissionError(DeviceError):
    """Clock writes are not permitted for this process."""

    HOW_TO = (
        "Setting GPU clocks needs root, or the SYS_ADMIN capability in a container "
        "(docker run --cap-add SYS_ADMIN), or a running kdvfsd clock service. "
        "Without it, use device='observe', which only reads."
    )

    def __init__(self, what: str):
        super().__init__(f"{what}: no permission. {self.HOW_TO}")


class NotSupportedError(DeviceError):
    """The device does not support the operation (for example memory clock locks before Ampere)."""


class InvalidClockError(DeviceError, ValueError):
    """A clock that the device does not support was asked for."""


class DeviceUnavailableError(DeviceError):
    """No device of the requested kind can be opened here (no driver, no GPU, bad index)."""


class GpuBusyError(DeviceError):
    """Another process already drives this GPU's clocks."""

    def __init__(self, gpu: str, owner_pid: int | None, state_file: str):
        self.owner_pid = owner_pid
        who = f"process {owner_pid}" if owner_pid else "another process"
        super().__init__(
            f"GPU {gpu} is already driven by {who} (lock {state_file}). One writer per GPU: "
            "stop that process, or run this one with device='observe'."
        )


class StateDirError(DeviceError):
    """The state directory (or a file in it) cannot be used safely, so clocks are not written.

    The run falls back to ``observe``; the message names the path, what is wrong with it, and
    where to point ``KDVFS_STATE_DIR`` (``state_dir``) instead.
    """

    HINT = ("Clock writes need a state directory that only this user can write: set KDVFS_STATE_DIR "
            "(or state_dir) to one, e.g. a directory of your own with mode 0700 (for root: /root/.local/state/kdvfs)")

    def __init__(self, path: str, problem: str, hint: str | None = None):
        self.path = path
        super().__init__(f"kdvfs state directory {path}: {problem}. {hint or self.HINT}")


class PlanError(KdvfsError, ValueError):
    """A plan file is malformed, made for another GPU or region set, or names an unsupported clock."""
