"""Clock pairs and the clock table a device supports."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

from .errors import InvalidClockError


@dataclass(frozen=True, order=True)
class ClockPair:
    """An SM clock and a memory clock, both in MHz, to be locked together."""

    sm_mhz: int
    mem_mhz: int

    def __str__(self) -> str:
        return f"{self.sm_mhz}/{self.mem_mhz} MHz"

    def to_dict(self) -> dict:
        return {"sm_mhz": self.sm_mhz, "mem_mhz": self.mem_mhz}

    @classmethod
    def from_obj(cls, obj) -> "ClockPair":
        """Accept ``{"sm_mhz": .., "mem_mhz": ..}``, ``[sm, mem]`` or a ClockPair."""
        if isinstance(obj, ClockPair):
            return obj
        if isinstance(obj, Mapping) and set(obj) == {"sm_mhz", "mem_mhz"}:
            return cls(int(obj["sm_mhz"]), int(obj["mem_mhz"]))
        if isinstance(obj, (list, tuple)) and len(obj) == 2:
            return cls(int(obj[0]), int(obj[1]))
        raise ValueError(f"{obj!r} is not a clock pair; write {{'sm_mhz': N, 'mem_mhz': M}} or [N, M]")


#: ``None`` where a clock is expected means "the driver's default": no lock.
Clocks = Optional[ClockPair]


@dataclass(frozen=True)
class ClockTable:
    """The clocks a device accepts: memory clocks, and the SM clocks allowed with each."""

    mem_mhz: tuple[int, ...]
    sm_mhz_by_mem: Mapping[int, tuple[int, ...]]
    default: ClockPair

    @classmethod
    def from_lists(cls, mem_mhz: Sequence[int], sm_mhz: Sequence[int], default: ClockPair | None = None) -> "ClockTable":
        mem = tuple(sorted((int(m) for m in mem_mhz), reverse=True))
        sm = tuple(sorted((int(s) for s in sm_mhz), reverse=True))
        return cls(mem, {m: sm for m in mem}, default or ClockPair(sm[0], mem[0]))

    @property
    def sm_mhz(self) -> tuple[int, ...]:
        """All SM clocks, highest first (the union over memory clocks)."""
        return tuple(sorted({s for v in self.sm_mhz_by_mem.values() for s in v}, reverse=True))

    def pairs(self) -> list[ClockPair]:
        return [ClockPair(s, m) for m in self.mem_mhz for s in self.sm_mhz_by_mem[m]]

    def check(self, clocks: ClockPair, where: str = "") -> ClockPair:
        """Return ``clocks`` if supported, else raise InvalidClockError naming the nearest allowed values."""
        prefix = f"{where}: " if where else ""
        if clocks.mem_mhz not in self.sm_mhz_by_mem:
            raise InvalidClockError(
                f"{prefix}memory clock {clocks.mem_mhz} MHz is not supported; supported: "
                f"{', '.join(map(str, self.mem_mhz))} MHz"
            )
        allowed = self.sm_mhz_by_mem[clocks.mem_mhz]
        if clocks.sm_mhz not in allowed:
            nearest = min(allowed, key=lambda s: abs(s - clocks.sm_mhz))
            raise InvalidClockError(
                f"{prefix}SM clock {clocks.sm_mhz} MHz is not supported with memory at {clocks.mem_mhz} MHz; "
                f"supported: {allowed[-1]}..{allowed[0]} MHz ({len(allowed)} values), nearest {nearest} MHz"
            )
        return clocks

    def to_dict(self) -> dict:
        return {
            "mem_mhz": list(self.mem_mhz),
            "sm_mhz_by_mem": {str(m): list(v) for m, v in self.sm_mhz_by_mem.items()},
            "default": self.default.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> "ClockTable":
        return cls(
            tuple(int(m) for m in d["mem_mhz"]),
            {int(m): tuple(int(s) for s in v) for m, v in d["sm_mhz_by_mem"].items()},
            ClockPair.from_obj(d["default"]),
        )
