"""The plan file: which clocks each region gets, for which GPU, and what was predicted.

JSON, schema-versioned. A plan names the GPU model and its clock lists; loading it for another
GPU, or with a clock that GPU does not support, is a :class:`~kdvfs_plugins.errors.PlanError`.
"""
from __future__ import annotations

import difflib
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional

from .clocks import ClockPair, ClockTable
from .config import GRANULARITIES
from .errors import InvalidClockError, PlanError
from .ownership import write_json
from .regions import STEP, Region, fold_microbatch, lookup

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
        # A fresh temporary file and a rename: a link planted in a shared run directory is
        # replaced, never written through (a root run would otherwise overwrite its target).
        write_json(path, self.to_dict(), mode=0o644, indent=1)
        return path

    @classmethod
    def from_dict(cls, d: Mapping, where: str = "plan") -> "Plan":
        """Validate every field by type before use: a malformed plan is a PlanError naming the
        field, never an AttributeError, an OverflowError or a silently truncated clock."""
        if not isinstance(d, Mapping):
            raise PlanError(f"{where} is malformed: its top level is {_kind(d)}, not a JSON object; "
                            "see docs/plans.md for the format")
        version = d.get("schema_version")
        if type(version) is not int or version != SCHEMA_VERSION:
            raise PlanError(f"{where}: schema_version {version!r} is not {SCHEMA_VERSION}; re-create the plan")
        granularity = d.get("granularity", "kernel")
        if not isinstance(granularity, str) or granularity not in GRANULARITIES:
            raise PlanError(f"{where}: granularity {granularity!r} is not one of {', '.join(GRANULARITIES)}")
        device = _field_obj(d, "device", where)
        name = device.get("name")
        if not isinstance(name, str):
            raise _malformed(where, "device.name", "the GPU model's name as a string", name)
        clocks = _field_obj(device, "clocks", where, "device.")
        regions = {}
        for region, c in _field_obj(d, "regions", where).items():
            try:
                Region.parse(region)
            except (ValueError, AttributeError, TypeError):
                raise _malformed(where, f"regions[{region!r}]", "a region name, 'phase' or 'phase/group'", region) from None
            regions[region] = None if c is None else _clock_pair(c, f"regions[{region!r}]", where)
        return cls(
            device_name=name,
            clock_table=_clock_table(clocks, where),
            regions=regions,
            granularity=granularity,
            objective=_field_str(d, "objective", "strict", where),
            max_slowdown=_field_number(d, "max_slowdown", 0.0, where, 0.0, 1.0),
            key={str(k): v for k, v in _field_obj(d, "key", where, default={}).items()},
            predicted={str(k): v for k, v in _field_obj(d, "predicted", where, default={}).items()},
            source=_field_str(d, "source", "manual", where),
            created_s=_field_number(d, "created_s", 0.0, where, 0.0, 1e12),
        )

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Plan":
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise PlanError(f"plan file {path} does not exist; run with mode='auto' first, or fix plan_path") from None
        except OSError as exc:
            raise PlanError(f"plan file {path} cannot be read ({exc.strerror or exc}); fix plan_path") from None
        except (ValueError, RecursionError) as exc:
            raise PlanError(f"plan file {path} is not valid JSON: {type(exc).__name__}: {str(exc)[:200]}") from None
        return cls.from_dict(raw, where=f"plan file {path}")


# ---------------------------------------------------------------------- field checks
def _kind(value) -> str:
    return {list: "a list", type(None): "null", str: "a string", bool: "a boolean", int: "a number",
            float: "a number"}.get(type(value), type(value).__name__)


def _malformed(where: str, field: str, want: str, value) -> PlanError:
    shown = repr(value)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return PlanError(f"{where} is malformed: {field} must be {want}, not {shown}; see docs/plans.md for the format")


_MISSING = object()


def _field_obj(d: Mapping, name: str, where: str, prefix: str = "", default=_MISSING) -> Mapping:
    value = d.get(name, default)
    if value is _MISSING:
        raise PlanError(f"{where} is malformed: {prefix}{name} is missing; see docs/plans.md for the format")
    if not isinstance(value, Mapping):
        raise _malformed(where, prefix + name, "a JSON object", value)
    return value


def _field_str(d: Mapping, name: str, default: str, where: str) -> str:
    value = d.get(name, default)
    if not isinstance(value, str):
        raise _malformed(where, name, "a string", value)
    return value


def _field_number(d: Mapping, name: str, default: float, where: str, lo: float, hi: float) -> float:
    value = d.get(name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not lo <= value <= hi:
        raise _malformed(where, name, f"a number from {lo:g} to {hi:g}", value)
    return float(value)


def _mhz(value, field: str, where: str) -> int:
    """A clock in whole MHz: an integer, never a float or a string that would be truncated."""
    if type(value) is not int:
        raise _malformed(where, field, "a whole number of MHz (an integer such as 1410)", value)
    if not 0 < value < 100_000:
        raise _malformed(where, field, "a clock from 1 to 99999 MHz", value)
    return value


def _clock_pair(c, field: str, where: str) -> ClockPair:
    if isinstance(c, Mapping) and set(c) == {"sm_mhz", "mem_mhz"}:
        return ClockPair(_mhz(c["sm_mhz"], f"{field}.sm_mhz", where), _mhz(c["mem_mhz"], f"{field}.mem_mhz", where))
    if isinstance(c, list) and len(c) == 2:
        return ClockPair(_mhz(c[0], f"{field}[0]", where), _mhz(c[1], f"{field}[1]", where))
    raise _malformed(where, field, '{"sm_mhz": N, "mem_mhz": M}, [N, M] or null', c)


def _clock_table(d: Mapping, where: str) -> ClockTable:
    mem = d.get("mem_mhz")
    if not isinstance(mem, list) or not mem:
        raise _malformed(where, "device.clocks.mem_mhz", "a list of memory clocks", mem)
    mem_mhz = tuple(_mhz(m, f"device.clocks.mem_mhz[{i}]", where) for i, m in enumerate(mem))
    by_mem = {}
    for m, sm in _field_obj(d, "sm_mhz_by_mem", where, "device.clocks.").items():
        field = f"device.clocks.sm_mhz_by_mem[{m!r}]"
        if not (isinstance(m, str) and m.isascii() and m.isdigit()) or int(m) not in mem_mhz:
            raise _malformed(where, field, f"keyed by one of the memory clocks {list(mem_mhz)}", m)
        if not isinstance(sm, list) or not sm:
            raise _malformed(where, field, "a list of SM clocks", sm)
        by_mem[int(m)] = tuple(_mhz(c, f"{field}[{i}]", where) for i, c in enumerate(sm))
    missing = [m for m in mem_mhz if m not in by_mem]
    if missing:
        raise PlanError(f"{where} is malformed: device.clocks.sm_mhz_by_mem has no SM clocks for memory at "
                        f"{missing[0]} MHz; see docs/plans.md for the format")
    return ClockTable(mem_mhz, by_mem, _clock_pair(d.get("default"), "device.clocks.default", where))


class UnmatchedRegionKeys:
    """Names the ``region_clocks`` keys that match no region of the run, once the regions are
    known: after a few profiled steps (module hooks arrive with the first), with a did-you-mean.

    A key matches a region of that name, or (a phase, without ``/``) any region of that phase, or
    (``instruction.*``) any microbatch of that pipeline instruction.
    """

    def __init__(self, keys, profiled_steps: int = 3):
        self.left = {k for k in keys if k != STEP}
        self.seen_regions: set = set()
        self.steps_left = profiled_steps
        self.done = not self.left

    def seen(self, regions) -> Optional[str]:
        """Regions of one profiled step; returns the warning once, when it is due."""
        if self.done:
            return None
        names = {str(r) for r in regions}
        self.seen_regions |= names
        names |= {fold_microbatch(n) for n in names}  # "recv_activation.*" matches "recv_activation.mb3"
        phases = {n.partition("/")[0] for n in names}
        self.left = {k for k in self.left if not (k in names or ("/" not in k and k in phases))}
        self.steps_left -= 1
        if self.left and self.steps_left > 0:
            return None
        self.done = True
        if not self.left:
            return None
        known = sorted(self.seen_regions | {n.partition("/")[0] for n in self.seen_regions})
        parts = []
        for k in sorted(self.left):
            close = difflib.get_close_matches(k, known, n=1)
            parts.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        return (f"region_clocks: {', '.join(parts)} match{'es' if len(parts) == 1 else ''} no region of this run, "
                f"so {'it is' if len(parts) == 1 else 'they are'} never used; regions seen: {', '.join(known)}")


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
