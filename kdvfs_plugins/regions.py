"""Region names: a phase of the step, optionally narrowed to a kernel group inside it.

A region name is ``phase`` or ``phase/group``, e.g. ``forward`` or ``backward/layers.*.mlp``.
Group names come from module paths with layer indices folded, so that every
``layers.N.mlp`` shares one region and a plan carries across identical layers.

Pipeline instructions are regions too, with the microbatch where the schedule has one:
``forward/pipe.mb3``, ``communication/recv_activation.mb3``. Their indices are kept (each
microbatch of a stage can take its own clocks), and a plan names every microbatch of an
instruction at once with ``.*``: ``communication/recv_activation.*``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

FORWARD = "forward"
BACKWARD = "backward"
OPTIMIZER = "optimizer"
COMMUNICATION = "communication"
#: Work outside any phase (data loading, logging) and the step's own level.
STEP = "step"
PHASES = (FORWARD, BACKWARD, COMMUNICATION, OPTIMIZER)

_INDEX = re.compile(r"(?<=\.)\d+(?=\.|$)|^\d+(?=\.|$)")
#: The group of a pipeline instruction's own compute (``forward/pipe.mb3``).
PIPE = "pipe"
_MICROBATCH = re.compile(r"\.mb\d+$")


def fold_module_path(path: str) -> str:
    """``layers.12.mlp.fc1`` -> ``layers.*.mlp.fc1``: layer indices become ``*``."""
    return _INDEX.sub("*", path)


def instruction_region(phase: str, instruction: str, microbatch: Optional[int] = None) -> str:
    """One pipeline instruction as a region: ``instruction_region("communication",
    "recv_activation", 3)`` -> ``communication/recv_activation.mb3``; without a microbatch
    (``reduce_grads``) the instruction alone."""
    return f"{phase}/{instruction}" if microbatch is None else f"{phase}/{instruction}.mb{microbatch}"


def fold_microbatch(name: str) -> str:
    """``communication/recv_activation.mb3`` -> ``communication/recv_activation.*``: the plan key
    for every microbatch of one instruction. Other names come back unchanged."""
    return _MICROBATCH.sub(".*", name) if "/" in name else name


@dataclass(frozen=True)
class Region:
    """One named stretch of a training step that can get its own clocks."""

    phase: str
    group: Optional[str] = None

    @property
    def name(self) -> str:
        return self.phase if self.group is None else f"{self.phase}/{self.group}"

    @property
    def parent(self) -> Optional["Region"]:
        """The phase region for a kernel group; the step for a phase; None for the step."""
        if self.group is not None:
            return Region(self.phase)
        if self.phase != STEP:
            return Region(STEP)
        return None

    @classmethod
    def parse(cls, name: str) -> "Region":
        phase, _, group = name.partition("/")
        if not phase:
            raise ValueError(f"region name {name!r} has no phase; write 'phase' or 'phase/group'")
        return cls(phase, group or None)

    def __str__(self) -> str:
        return self.name


def lookup(by_region, name: str) -> tuple[bool, object]:
    """(found, value) for region ``name`` in a mapping keyed by region names, phases or ``step``:
    the name itself, then its instruction over all microbatches (``.mb3`` -> ``.*``), then its
    phase, then the step."""
    if name in by_region:
        return True, by_region[name]
    folded = fold_microbatch(name)
    if folded != name and folded in by_region:
        return True, by_region[folded]
    r: Optional[Region] = Region.parse(name)
    while r is not None:
        if r.name in by_region:
            return True, by_region[r.name]
        r = r.parent
    return False, None


def coarsen(name: str, granularity: str) -> str:
    """The region that carries ``name``'s clocks at a granularity (kernel, pass, iteration)."""
    if granularity == "kernel":
        return name
    if granularity == "pass":
        return Region.parse(name).phase
    return STEP
