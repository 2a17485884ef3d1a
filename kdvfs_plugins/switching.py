"""Clock switching, in one place: the switch model, the default latency, its resolution, and what a
switch costs.

A clock change takes milliseconds to land (published: about 6 ms on an H200; ``kdvfs latency``
measures a GPU's own). Everything that plans or judges clock changes -- the engine's actuator, the
planner, the explorer, the oracle of the studies and the CLI -- takes the latency from
:func:`resolve_switch_latency_ms` and the cost of a switch from :func:`switch_model`, so that an
explorer is never judged against an oracle that prices switches differently.

API
---
``DEFAULT_SWITCH_LATENCY_MS``: used when nothing is configured or measured.
``resolve_switch_latency_ms(config=None, device=None, state_dir=None) -> ResolvedLatency``: the
config's ``switch_latency_ms``, else the device's own (a simulated GPU knows its model's), else the
``kdvfs latency`` measurement stored for the GPU and driver, else the default; with where it came from.
``switch_model(latency_ms, *, issue_ahead=True, min_interval_ms=0.0) -> SwitchModel``: what a switch
costs as the actuator executes it.
``SwitchModel``: the planner's model of one change (see its docstring).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from .errors import ConfigError

#: Used when nothing is measured or configured: published for an H200 (cited by the reference paper).
DEFAULT_SWITCH_LATENCY_MS = 6.0
#: Changes issued ahead rely on the previous step's timing; packed closer than this they feed each
#: other's prediction errors, so an issue-ahead plan keeps at least this floor between them.
ISSUE_AHEAD_MIN_INTERVAL_MS = 1.0


@dataclass(frozen=True)
class SwitchModel:
    """What one clock change costs. See the module docstring for the three modes."""

    latency_s: float = 0.006
    energy_j_per_switch: Optional[float] = None
    min_interval_s: float = 0.0
    hide_latency: bool = False
    lands_late: bool = False
    # A GPU held up by a clock change idles near its idle power at a high clock (72 W measured at
    # the idle clock on an H100); 100 W prices the stall without pretending to precision.
    stall_power_w: float = 100.0

    def __post_init__(self) -> None:
        for key in ("latency_s", "min_interval_s", "stall_power_w"):
            v = getattr(self, key)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ConfigError(key, v, "use a finite number >= 0", source="SwitchModel")
        e = self.energy_j_per_switch
        if e is not None and not (isinstance(e, (int, float)) and math.isfinite(e) and e >= 0):
            raise ConfigError("energy_j_per_switch", e, "use a finite number of joules >= 0, or None",
                              source="SwitchModel")
        if self.hide_latency and self.lands_late:
            raise ConfigError("lands_late", True, "a hidden switch lands on time: set only one of "
                              "hide_latency and lands_late", source="SwitchModel")

    @property
    def mode(self) -> str:
        """``stall``, ``late`` or ``hidden``."""
        if self.hide_latency:
            return "hidden"
        return "late" if self.lands_late else "stall"

    @property
    def time_s_per_switch(self) -> float:
        """Time a switch adds to the step (only a stall adds time directly)."""
        return self.latency_s if self.mode == "stall" else 0.0

    @property
    def effective_min_interval_s(self) -> float:
        """The floor between switches the planner enforces. A late-landing change cannot be
        followed by another before it has landed, so there the floor is at least ``latency_s``."""
        if self.mode == "late":
            return max(self.min_interval_s, self.latency_s)
        return self.min_interval_s

    @property
    def energy_j(self) -> float:
        """Energy charged per switch, on top of what the regions use."""
        if self.energy_j_per_switch is not None:
            return float(self.energy_j_per_switch)
        return 0.0 if self.mode == "late" else self.latency_s * self.stall_power_w


@dataclass(frozen=True)
class ResolvedLatency:
    """A switch latency and where it came from (``config``, ``device``, ``measured``, ``default``)."""

    ms: float
    source: str


def check_latency_ms(value, name: str = "switch_latency_ms", source: str = "kdvfs") -> float:
    """A latency in ms >= 0 (ConfigError otherwise)."""
    try:
        ms = float(value)
    except (TypeError, ValueError):
        ms = float("nan")
    if not (math.isfinite(ms) and ms >= 0):
        raise ConfigError(name, value, "a latency in ms >= 0, e.g. 6", source=source)
    return ms


def resolve_switch_latency_ms(config=None, device=None, state_dir=None, *, device_name: Optional[str] = None,
                              driver: Optional[str] = None) -> ResolvedLatency:
    """The switch latency to plan with: config, else the device's own, else measured, else default."""
    configured = getattr(config, "switch_latency_ms", None) if config is not None else None
    if configured is not None:
        return ResolvedLatency(check_latency_ms(configured), "config")
    own = getattr(device, "switch_latency_ms", None) if device is not None else None
    if own is not None:
        return ResolvedLatency(float(own), "device")
    if device is not None and (device_name is None or driver is None):
        info = device.info()
        device_name, driver = info.name, info.driver
    if device_name is not None and driver is not None:
        from .latency import load

        if state_dir is None and config is not None:
            state_dir = getattr(config, "state_dir", None)
        stored = load(device_name, driver, state_dir)
        if stored is not None:
            return ResolvedLatency(float(stored.switch_latency_ms), "measured")
    return ResolvedLatency(DEFAULT_SWITCH_LATENCY_MS, "default")


def switch_model(latency_ms: float, *, issue_ahead: bool = True, min_interval_ms: float = 0.0) -> SwitchModel:
    """What a switch costs as the actuator executes it, for planner, explorer and oracle alike.

    - Issued ahead (``issue_ahead`` and a latency > 0): the change lands on time.
    - Otherwise the change lands one latency late (then changes are at least a latency apart).
    - Changes at least ``min_interval_ms`` apart: the actuator's floor (a live run's plans add
      :data:`ISSUE_AHEAD_MIN_INTERVAL_MS` when issuing ahead).
    - No stall, and no energy beyond what the regions draw: the transition happens while work
      runs, so its energy is already in the regions it overlaps (as the virtual GPU models it and a
      measurement of those regions would see it).
    """
    lat_s = check_latency_ms(latency_ms) / 1e3
    floor_s = check_latency_ms(min_interval_ms, "min_interval_ms") / 1e3
    if lat_s == 0:
        return SwitchModel(latency_s=0.0, energy_j_per_switch=0.0, min_interval_s=floor_s)
    if issue_ahead:
        return SwitchModel(latency_s=lat_s, energy_j_per_switch=0.0, hide_latency=True,
                           min_interval_s=floor_s)
    return SwitchModel(latency_s=lat_s, energy_j_per_switch=0.0, lands_late=True, min_interval_s=floor_s)
