"""The built-in clock policy: the plan's answer (or the config's fixed clocks) for each region.

Registered with ``trylast`` so that any plugin answering ``kdvfs_choose_clocks`` replaces it.
"""
from __future__ import annotations

from typing import Optional

from .clocks import ClockPair
from .hookspecs import hookimpl
from .plan import Plan


class _DefaultClocks:
    """Answer meaning "the driver's default clocks" (``None`` would mean "no answer")."""

    _instance = None

    def __new__(cls):
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "DEFAULT_CLOCKS"


DEFAULT_CLOCKS = _DefaultClocks()


class PlanPolicy:
    def __init__(self) -> None:
        self.plan: Optional[Plan] = None

    @hookimpl(trylast=True)
    def kdvfs_choose_clocks(self, region, step):
        if self.plan is None:
            return DEFAULT_CLOCKS
        found, clocks = self.plan.clocks_for(region)
        return clocks if (found and clocks is not None) else DEFAULT_CLOCKS

    @hookimpl
    def kdvfs_plan_ready(self, plan):
        self.plan = plan


def as_clocks(answer) -> Optional[ClockPair]:
    """Normalise a hook answer: a ClockPair, or None for the default clocks."""
    if answer is None or answer is DEFAULT_CLOCKS:
        return None
    if isinstance(answer, ClockPair):
        return answer
    return ClockPair.from_obj(answer)
