"""kdvfs: kernel-level GPU clock control (DVFS) for training frameworks.

The core imports no training framework; adapters live in ``kdvfs_lightning``,
``kdvfs_deepspeed`` and ``kdvfs_megatron``.
"""
from .clocks import ClockPair, ClockTable
from .config import KdvfsConfig
from .errors import (
    ConfigError,
    DeviceError,
    GpuBusyError,
    InvalidClockError,
    KdvfsError,
    NoPermissionError,
    NotSupportedError,
    PlanError,
)
from .hookspecs import hookimpl

__version__ = "0.1.0"

__all__ = [
    "ClockPair", "ClockTable", "KdvfsConfig", "hookimpl", "KdvfsError", "ConfigError", "DeviceError",
    "GpuBusyError", "InvalidClockError", "NoPermissionError", "NotSupportedError", "PlanError",
]
