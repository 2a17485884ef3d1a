"""The one configuration schema shared by the Lightning, DeepSpeed and Megatron adapters.

Each adapter turns its own input (keyword arguments, a JSON block, command-line flags) into a
plain dict and calls :meth:`KdvfsConfig.from_dict`; the defaults, the checks and the error
messages are therefore the same everywhere.
"""
from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, Optional

from .clocks import ClockPair
from .errors import ConfigError

MODES = ("observe", "explore", "apply", "auto")
DEVICES = ("auto", "nvml", "observe", "simulated")
GRANULARITIES = ("kernel", "pass", "iteration")
POWER_READINGS = ("background", "step_end")
OBJECTIVES = ("strict", "relaxed", "edp")


def default_state_dir() -> str:
    """Where the guard keeps its per-GPU state files (shared by every run of one user)."""
    env = os.environ.get("KDVFS_STATE_DIR")
    if env:
        return env
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "kdvfs")


@dataclass(frozen=True)
class KdvfsConfig:
    """Validated kdvfs settings. Build with :meth:`from_dict`; every field has a sensible default."""

    enabled: bool = True
    #: observe: measure only; explore: measure clock responses; apply: use a stored plan;
    #: auto: explore, plan, validate, then apply.
    mode: str = "auto"
    #: auto picks nvml where clock writes are permitted, observe where NVML is present, else simulated.
    device: str = "auto"
    #: Plan file to read (apply) and write (auto/explore). Default: ``<run_dir>/plan.json``.
    plan_path: Optional[str] = None
    #: Allowed slowdown of the step, as a fraction (0.0 = strict waste reduction).
    max_slowdown: float = 0.0
    #: strict | relaxed | edp; None derives it: strict when max_slowdown is 0, else relaxed.
    objective: Optional[str] = None
    granularity: str = "kernel"
    run_dir: str = "kdvfs_runs"
    #: Fixed clocks for the whole step (both or neither), for a manual run without a plan.
    sm_mhz: Optional[int] = None
    mem_mhz: Optional[int] = None
    #: Manual per-region clocks: {"forward": {"sm_mhz": 1500, "mem_mhz": 2619}, ...}.
    region_clocks: Mapping[str, ClockPair] = field(default_factory=dict)
    #: Module depth for kernel-group regions: "auto" (the blocks of repeated layers) or an int.
    module_depth: Any = "auto"
    #: Floor on the GPU time between two clock changes.
    min_switch_interval_ms: float = 1.0
    #: Clock switch latency the planner assumes; None uses the device's measured or default figure.
    switch_latency_ms: Optional[float] = None
    #: Write each change one switch latency before its boundary, predicted from the previous steps'
    #: marker times (at the boundary where no stable prediction exists); plans assume it.
    issue_ahead: bool = True
    warmup_steps: int = 3
    #: Record every region boundary on one step in N (1: every step). Other steps mark only the
    #: boundaries where clocks change, which keeps the CPU cost per step small.
    profile_every_n_steps: int = 25
    window_steps: int = 10
    #: How often power is read (about 2 µs a read; it refreshes every 100 ms); 0: no energy.
    energy_sample_period_ms: float = 100.0
    #: How often it reads the energy counter to anchor the integrated power (a read stalls CUDA
    #: calls for about 4 ms on an H100); 0: power only.
    energy_counter_period_ms: float = 5000.0
    #: Where power is read: on the background thread, or at step ends on the training thread
    #: (a loop that holds the GIL then hands it to no sampler; the thread keeps the counter reads).
    power_readings: str = "background"
    #: Slowdown that exploration may cost, averaged over the exploration phase.
    explore_max_slowdown: float = 0.02
    explore_max_steps: int = 1500
    #: Data-parallel ranks explore together: each runs other clocks and all share the
    #: measurements, so exploration ends about N times sooner on N replicas (same plan on all).
    explore_across_ranks: bool = True
    log_every_n_steps: int = 1
    progress: Any = "auto"
    state_dir: str = field(default_factory=default_state_dir)
    #: Unix socket of a kdvfsd clock service (default: $KDVFSD_SOCKET); clock writes go through it.
    kdvfsd_socket: Optional[str] = None
    #: Simulated device: seeded noise and switch latency (None: the model's default).
    sim_noise: bool = True
    sim_seed: int = 0
    sim_switch_latency_ms: Optional[float] = None

    # ------------------------------------------------------------------ building
    @classmethod
    def from_dict(cls, raw: Mapping[str, Any] | None, source: str = "kdvfs config") -> "KdvfsConfig":
        """Validate ``raw`` (unknown keys, types and ranges) and build the config.

        ``source`` names where the values came from ("DeepSpeed 'kernel_dvfs' block",
        "KernelDVFS(...)", "--kernel-dvfs-* flags") so errors point at the right place.
        """
        raw = dict(raw or {})
        names = [f.name for f in fields(cls)]
        for key in raw:
            if key not in names:
                close = difflib.get_close_matches(str(key), names, n=1)
                hint = f"did you mean '{close[0]}'? " if close else ""
                raise ConfigError(key, raw[key], f"unknown key; {hint}known keys: {', '.join(names)}", source)
        values: dict[str, Any] = {}
        for key, value in raw.items():
            values[key] = _CHECKS[key](key, value, source)
        cfg = cls(**values)
        cfg._check_together(source)
        return cfg

    def replace(self, **changes: Any) -> "KdvfsConfig":
        merged = {f.name: getattr(self, f.name) for f in fields(self)}
        merged.update(changes)
        return KdvfsConfig.from_dict(merged)

    def _check_together(self, source: str) -> None:
        if (self.sm_mhz is None) != (self.mem_mhz is None):
            key = "mem_mhz" if self.mem_mhz is None else "sm_mhz"
            raise ConfigError(key, None, "sm_mhz and mem_mhz are set together or not at all", source)
        if self.objective == "strict" and self.max_slowdown > 0:
            raise ConfigError(
                "objective", "strict", f"strict allows no slowdown; use 'relaxed' with max_slowdown={self.max_slowdown}", source
            )

    # ------------------------------------------------------------------ derived
    @property
    def effective_objective(self) -> str:
        if self.objective:
            return self.objective
        return "relaxed" if self.max_slowdown > 0 else "strict"

    @property
    def fixed_clocks(self) -> Optional[ClockPair]:
        if self.sm_mhz is None:
            return None
        return ClockPair(self.sm_mhz, self.mem_mhz)

    def resolved_plan_path(self) -> Path:
        return Path(self.plan_path) if self.plan_path else Path(self.run_dir) / "plan.json"

    def check_plan_file(self, source: str = "kdvfs config") -> None:
        """Mode ``apply`` without fixed or per-region clocks reads a stored plan: a missing file is
        a ConfigError now, where the config is made, not when training starts.

        For adapters whose every rank reads the plan file itself (Lightning, DeepSpeed); not for
        Megatron, where one rank of a tensor-parallel group reads it for the others.
        """
        if not self.enabled or self.mode != "apply" or self.fixed_clocks or self.region_clocks:
            return
        path = self.resolved_plan_path()
        if not path.is_file():
            where = "" if self.plan_path else " (the default: <run_dir>/plan.json)"
            raise ConfigError("plan_path", self.plan_path, f"no plan file at {path}{where}; mode 'apply' reads a "
                              "stored plan: give the plan_path a run with mode='auto' wrote, or use mode='auto' "
                              "to explore and write one", source)

    def to_dict(self) -> dict:
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "region_clocks":
                v = {k: c.to_dict() for k, c in v.items()}
            out[f.name] = v
        return out


# ---------------------------------------------------------------------- value checks
def _choice(options):
    def check(key, value, source):
        if value not in options:
            raise ConfigError(key, value, f"allowed: {' | '.join(options)}", source)
        return value
    check.json_schema = {"enum": list(options)}  # read by kdvfs_plugins/schema.py
    return check


def _bool(key, value, source):
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.lower() in ("true", "1", "yes")
    raise ConfigError(key, value, "allowed: true | false", source)


def _number(lo, hi, integer=False, optional=False):
    def check(key, value, source):
        if value is None and optional:
            return None
        kind = "an integer" if integer else "a number"
        try:
            if isinstance(value, bool):
                raise TypeError
            num = int(value) if integer else float(value)
            if integer and float(value) != num:
                raise ValueError
        except (TypeError, ValueError, OverflowError):  # OverflowError: inf, 1e400
            raise ConfigError(key, value, f"allowed: {kind} in [{lo}, {hi}]", source) from None
        if not lo <= num <= hi:
            raise ConfigError(key, value, f"allowed: {kind} in [{lo}, {hi}]", source)
        return num
    # what the check accepts, as JSON Schema (kdvfs_plugins/schema.py builds the block's schema from it)
    number = {"type": "integer" if integer else "number", "minimum": lo, "maximum": hi}
    check.json_schema = {"anyOf": [number, {"type": "null"}]} if optional else number
    return check


def _optional_str(key, value, source):
    if value is None or (isinstance(value, (str, os.PathLike)) and str(value)):
        return None if value is None else str(value)
    raise ConfigError(key, value, "allowed: a non-empty path string", source)


def _str(key, value, source):
    if isinstance(value, (str, os.PathLike)) and str(value):
        return str(value)
    raise ConfigError(key, value, "allowed: a non-empty path string", source)


def _region_clocks(key, value, source):
    if not isinstance(value, Mapping):
        raise ConfigError(key, value, "allowed: a mapping region -> {'sm_mhz': N, 'mem_mhz': M}", source)
    out = {}
    for region, clocks in value.items():
        where = f"{key}[{region!r}]"
        if not isinstance(region, str) or not region.partition("/")[0]:
            raise ConfigError(key, region, "region names are 'phase' or 'phase/group', e.g. 'forward'", source)
        if isinstance(clocks, ClockPair):
            sm, mem = clocks.sm_mhz, clocks.mem_mhz
        elif isinstance(clocks, Mapping) and set(clocks) == {"sm_mhz", "mem_mhz"}:
            sm, mem = clocks["sm_mhz"], clocks["mem_mhz"]
        elif isinstance(clocks, (list, tuple)) and len(clocks) == 2:
            sm, mem = clocks
        else:
            raise ConfigError(where, clocks, f"{clocks!r:.60} is not a clock pair; write {{'sm_mhz': N, 'mem_mhz': M}} "
                                             "or [N, M]", source)
        # Whole MHz only: 1500.9 used to become 1500 without a word.
        out[region] = ClockPair(_clock_mhz(where, "sm_mhz", sm, source), _clock_mhz(where, "mem_mhz", mem, source))
    return out


def _clock_mhz(where, name, value, source) -> int:
    try:
        return _number(1, 100000, integer=True)(where, value, source)
    except ConfigError:
        raise ConfigError(where, value, f"{name} {value!r:.40} is not a whole number of MHz (an integer from 1 "
                                        "to 100000, such as 1410)", source) from None


def _module_depth(key, value, source):
    if value == "auto":
        return value
    return _number(1, 64, integer=True)(key, value, source)


def _progress(key, value, source):
    if value == "auto":
        return value
    return _bool(key, value, source)


_CHECKS = {
    "enabled": _bool,
    "mode": _choice(MODES),
    "device": _choice(DEVICES),
    "plan_path": _optional_str,
    "max_slowdown": _number(0.0, 1.0),
    "objective": lambda k, v, s: None if v is None else _choice(OBJECTIVES)(k, v, s),
    "granularity": _choice(GRANULARITIES),
    "run_dir": _str,
    "sm_mhz": _number(1, 10000, integer=True, optional=True),
    "mem_mhz": _number(1, 100000, integer=True, optional=True),
    "region_clocks": _region_clocks,
    "module_depth": _module_depth,
    "min_switch_interval_ms": _number(0.0, 10000.0),
    "switch_latency_ms": _number(0.0, 10000.0, optional=True),
    "warmup_steps": _number(0, 100000, integer=True),
    "profile_every_n_steps": _number(1, 1_000_000, integer=True),
    "window_steps": _number(1, 100000, integer=True),
    "energy_sample_period_ms": _number(0.0, 60000.0),
    "energy_counter_period_ms": _number(0.0, 3_600_000.0),
    "power_readings": _choice(POWER_READINGS),
    "explore_max_slowdown": _number(0.0, 1.0),
    "explore_max_steps": _number(1, 10_000_000, integer=True),
    "explore_across_ranks": _bool,
    "log_every_n_steps": _number(1, 1_000_000, integer=True),
    "progress": _progress,
    "state_dir": _str,
    "kdvfsd_socket": _optional_str,
    "sim_noise": _bool,
    "issue_ahead": _bool,
    "sim_seed": _number(0, 2**31 - 1, integer=True),
    "sim_switch_latency_ms": _number(0.0, 10000.0, optional=True),
}
assert set(_CHECKS) == {f.name for f in fields(KdvfsConfig)}, "every config field needs a check"
