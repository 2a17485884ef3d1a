"""Which regions get a clock of their own while exploring: the knobs.

A clock change lands milliseconds after it is asked for, so a region whose stretches are shorter
than the switch allows cannot usefully get its own clock. It is merged into its phase
(``forward``, ``backward``, ...). A region is its own knob only where at least half of its time
lies in stretches of ``OWN_KNOB_LATENCIES`` switch latencies or more; knobs under
``MIN_KNOB_SHARE`` of the step stay at default (they would only take blocks from the others).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

from .regions import STEP, Region

#: A region is its own knob where most of its time lies in stretches this many latencies long.
OWN_KNOB_LATENCIES = 3.0
#: Knobs (merged regions) under this share of the step stay at default.
MIN_KNOB_SHARE = 0.01


@dataclass(frozen=True)
class Occurrence:
    """One stretch of a default-clock step: region and its GPU time."""

    region: str
    time_ms: float


def merge_stretches(layout: Sequence[Occurrence]) -> list[Occurrence]:
    """The layout with consecutive occurrences of one region merged."""
    out: list[Occurrence] = []
    for o in layout:
        if out and out[-1].region == o.region:
            out[-1] = Occurrence(o.region, out[-1].time_ms + o.time_ms)
        else:
            out.append(o)
    return out


@dataclass
class Knobs:
    """The knobs and which region belongs to which (empty until the baseline chose them)."""

    names: tuple[str, ...] = ()
    of_region: dict[str, str] = field(default_factory=dict)
    _cache: dict[str, Optional[str]] = field(default_factory=dict)

    @classmethod
    def choose(cls, region_ms: Mapping[str, float], layout: Sequence[Occurrence],
               switch_latency_ms: float) -> "Knobs":
        """Knobs from the baseline's mean GPU ms per region and the step's stretches in order."""
        total = sum(region_ms.values()) or 1.0
        own: set[str] = set()
        if layout:
            long_ms: dict[str, float] = {}
            all_ms: dict[str, float] = {}
            for o in merge_stretches(layout):
                all_ms[o.region] = all_ms.get(o.region, 0.0) + o.time_ms
                if o.time_ms >= OWN_KNOB_LATENCIES * switch_latency_ms:
                    long_ms[o.region] = long_ms.get(o.region, 0.0) + o.time_ms
            own = {r for r in all_ms
                   if long_ms.get(r, 0.0) >= 0.5 * all_ms[r] and all_ms[r] >= MIN_KNOB_SHARE * total}
        of_region: dict[str, str] = {}
        knob_ms: dict[str, float] = {}
        for r, ms in region_ms.items():
            if r == STEP:
                continue
            name = r if (r in own or "/" not in r) else Region.parse(r).phase
            of_region[r] = name
            knob_ms[name] = knob_ms.get(name, 0.0) + ms
        names = tuple(k for k, ms in sorted(knob_ms.items(), key=lambda kv: -kv[1]) if ms >= MIN_KNOB_SHARE * total)
        return cls(names, {r: k for r, k in of_region.items() if k in names})

    @property
    def module_level(self) -> bool:
        """Whether a module group (``phase/group``) is a knob: its boundaries must then be marked."""
        return any("/" in k for k in self.names)

    def of(self, region: str) -> Optional[str]:
        """The knob that sets ``region``'s clocks, or None (it stays at default)."""
        if region in self.of_region:
            return self.of_region[region]
        if region in self._cache:
            return self._cache[region]
        r = Region.parse(region)
        k = r.name if r.name in self.names else (r.phase if r.phase in self.names else None)
        if self.names:  # asked at every boundary: remember, once the knobs are fixed
            self._cache[region] = k
        return k

    def times_ms(self, region_ms: Mapping[str, Sequence[float]], phase_level: bool) -> dict[str, float]:
        """Mean ms per step of each knob, from per-region lists of ms per step.

        ``phase_level``: steps after the baseline marked phase boundaries only, so the phases
        themselves carry the knobs' times."""
        out: dict[str, float] = {}
        for r, v in region_ms.items():
            k = self.of_region.get(r) or (self.of(r) if phase_level else None)
            if k is not None and v:
                out[k] = out.get(k, 0.0) + sum(v) / len(v)
        return out

    def occurrences(self, layout: Sequence[Occurrence], default_ms: Mapping[str, float]) -> list[tuple[str, float]]:
        """(knob, share of the knob's default time) per stretch in step order, knobs merged.

        Without a layout each knob is one stretch (``default_ms`` gives them)."""
        stretches = merge_stretches(layout) if layout else [Occurrence(k, default_ms[k]) for k in self.names]
        tot: dict[str, float] = {}
        seq: list[tuple[str, float]] = []
        for o in stretches:
            k = self.of(o.region)
            if k is None:
                continue  # not a knob: its time is the same whatever the plan
            seq.append((k, o.time_ms))
            tot[k] = tot.get(k, 0.0) + o.time_ms
        occ: list[list] = []
        for k, ms in seq:
            if occ and occ[-1][0] == k:
                occ[-1][1] += ms
            else:
                occ.append([k, ms])
        return [(k, ms / tot[k]) for k, ms in occ if tot.get(k, 0) > 0]
