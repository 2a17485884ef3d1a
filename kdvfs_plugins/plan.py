"""The plan file: which clocks each region gets, for which GPU, and what was predicted.

JSON, schema-versioned. A plan names the GPU model and its clock lists; loading it for another
GPU, or with a clock that GPU does not support, is a :class:`~kdvfs_plugins.errors.PlanError`.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional

from .clocks import ClockPair, ClockTable
from .config import GRANULARITIES
from .errors import InvalidClockError, PlanError
from .regions import STEP, Region, lookup

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class Plan:
    device_name: str
    clock_table: ClockTable
    #: region name -> clocks (None: the driver's default clocks)
    regions: Mapping[str, Optional[ClockPair]]
    granularity: str = "kernel"
    objective: str = "strict"
    max_slowdown: float = 0.0
    #: what the plan was made for: GPU model, driver, region set, parallel layout
    key: Mapping[str, str] = field(default_factory=dict)
    #: the planner's or validation's figures (fractions of the default-clock step)
    predicted: Mapping[str, float] = field(default_factory=dict)
    source: str = "manual"
    created_s: float = field(default_factory=time.time)

    def clocks_for(self, region: str) -> tuple[bool, Optional[ClockPair]]:
        """(found, clocks) for ``region``, falling back to its phase and then to the step."""
        return lookup(self.regions, region)

    # ------------------------------------------------------------------ checks
    def check_device(self, device_name: str, table: ClockTable, where: str = "plan") -> None:
        if device_name != self.device_name:
            raise PlanError(
                f"{where} was made for {self.device_name!r} but this GPU is {device_name!r}; "
                "clocks differ between GPU models: explore again (mode='auto') or pass the right plan_path"
            )
        for region, clocks in self.regions.items():
            if clocks is not None:
                try:
                    table.check(clocks, where=f"{where}, region {region!r}")
                except InvalidClockError as exc:
                    raise PlanError(str(exc)) from None

    def check_key(self, expected: Mapping[str, str], where: str = "plan") -> None:
        """Raise PlanError naming every field of the key that differs from ``expected``.

        Only fields present on both sides are compared: a hand-written plan without a key, or a
        key field this run cannot know (the region set before the first step), passes.
        """
        changed = [(k, self.key[k], v) for k, v in expected.items() if k in self.key and str(self.key[k]) != str(v)]
        if not changed:
            return
        what = "; ".join(f"{KEY_LABELS.get(k, k)} was {old!r}, now {new!r}" for k, old, new in changed)
        raise PlanError(
            f"{where} no longer fits this run: {what}. Its clocks were measured for the old setting; "
            "explore again (mode='auto' re-explores and overwrites it) or pass another plan_path"
        )

    # ------------------------------------------------------------------ file
    def to_dict(self) -> dict:
        return {
            "schema_version": SCHEMA_VERSION,
            "device": {"name": self.device_name, "clocks": self.clock_table.to_dict()},
            "granularity": self.granularity,
            "objective": self.objective,
            "max_slowdown": self.max_slowdown,
            "key": dict(self.key),
            "predicted": dict(self.predicted),
            "source": self.source,
            "created_s": self.created_s,
            "regions": {k: (None if v is None else v.to_dict()) for k, v in self.regions.items()},
        }

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1))
        os.replace(tmp, path)
        return path

    @classmethod
    def from_dict(cls, d: Mapping, where: str = "plan") -> "Plan":
        try:
            version = d.get("schema_version")
            if version != SCHEMA_VERSION:
                raise PlanError(f"{where}: schema_version {version!r} is not {SCHEMA_VERSION}; re-create the plan")
            granularity = d.get("granularity", "kernel")
            if granularity not in GRANULARITIES:
                raise PlanError(f"{where}: granularity {granularity!r} is not one of {', '.join(GRANULARITIES)}")
            regions = {}
            for name, c in d["regions"].items():
                Region.parse(name)
                regions[name] = None if c is None else ClockPair.from_obj(c)
            return cls(
                device_name=d["device"]["name"],
                clock_table=ClockTable.from_dict(d["device"]["clocks"]),
                regions=regions,
                granularity=granularity,
                objective=d.get("objective", "strict"),
                max_slowdown=float(d.get("max_slowdown", 0.0)),
                key=dict(d.get("key", {})),
                predicted=dict(d.get("predicted", {})),
                source=d.get("source", "manual"),
                created_s=float(d.get("created_s", 0.0)),
            )
        except PlanError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise PlanError(f"{where} is malformed ({type(exc).__name__}: {exc}); see docs/plans.md for the format") from None

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Plan":
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise PlanError(f"plan file {path} does not exist; run with mode='auto' first, or fix plan_path") from None
        except ValueError as exc:
            raise PlanError(f"plan file {path} is not valid JSON: {exc}") from None
        return cls.from_dict(raw, where=f"plan file {path}")


#: Human names of the plan key's fields, for error messages.
KEY_LABELS = {
    "gpu": "the GPU model", "driver": "the driver", "regions": "the model's region set (hash)",
    "region_count": "the number of regions", "world_size": "the world size", "parallel": "the parallel layout",
}


def region_set_hash(regions) -> str:
    """A short, order-free hash of region names (the model's structure as kdvfs sees it)."""
    names = sorted({str(r) for r in regions})
    return hashlib.sha256("\n".join(names).encode()).hexdigest()[:16]


def plan_key(device_name: str, driver: str, world_size: int = 1, parallel: Optional[Mapping[str, int]] = None,
             regions=None) -> dict:
    """What a plan is valid for: GPU model, driver, parallel layout and (once known) region set."""
    key = {"gpu": device_name, "driver": driver, "world_size": str(world_size)}
    if parallel:
        key["parallel"] = ",".join(f"{k}={parallel[k]}" for k in sorted(parallel))
    if regions is not None:
        key["regions"] = region_set_hash(regions)
        key["region_count"] = str(len(set(regions)))
    return key


def uniform_plan(device_name: str, table: ClockTable, clocks: Optional[ClockPair], source: str = "config") -> Plan:
    """One clock pair for the whole step (the config's sm_mhz/mem_mhz)."""
    return Plan(device_name, table, {STEP: clocks}, granularity="iteration", source=source)
