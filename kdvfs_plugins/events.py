"""The small frozen records that cross hook boundaries. Fields may be added, never removed."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Optional

from .clocks import ClockPair


@dataclass(frozen=True)
class SessionInfo:
    """One engine on one rank, driving one GPU."""

    framework: str
    rank: int
    local_rank: int
    world_size: int
    device_kind: str
    device_name: str
    device_index: int
    mode: str
    run_dir: str


@dataclass(frozen=True)
class RegionEvent:
    """A region boundary as the CPU enqueued it."""

    region: str
    step: int
    enter: bool
    host_time_s: float


@dataclass(frozen=True)
class ClockChange:
    """A clock change the actuator applied (or, on the observe device, would have applied)."""

    region: str
    step: int
    clocks: Optional[ClockPair]
    previous: Optional[ClockPair]
    #: Host time when the GPU reached the boundary, and when the device call returned.
    reached_s: float
    applied_s: float
    written: bool


@dataclass(frozen=True)
class StepRecord:
    """What the meter knows of one finished step."""

    step: int
    gpu_time_ms: float
    region_time_ms: Mapping[str, float]
    clock_changes: int
    #: From the energy counter between the step's boundaries; None until known. The counter
    #: refreshes every 100 ms, so single-step figures are coarse: windows are what to trust.
    energy_j: Optional[float] = None

    @property
    def avg_power_w(self) -> Optional[float]:
        if self.energy_j is None or self.gpu_time_ms <= 0:
            return None
        return self.energy_j / (self.gpu_time_ms / 1e3)


@dataclass(frozen=True)
class WindowRecord:
    """Energy over a window of consecutive steps, from the device's energy counter."""

    first_step: int
    last_step: int
    energy_j: float
    duration_s: float
    gpu_time_ms_per_step: float
    #: The clocks each region had during the window (explorer bookkeeping).
    clocks: Mapping[str, Optional[ClockPair]] = field(default_factory=dict)

    @property
    def steps(self) -> int:
        return self.last_step - self.first_step + 1

    @property
    def avg_power_w(self) -> float:
        return self.energy_j / self.duration_s if self.duration_s > 0 else 0.0
