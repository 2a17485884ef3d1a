"""What NVML lets a program read of a (virtual) H100's energy, as the real card gives it.

Measured on an H100 (``data/h100-power-step.json``, read only):

- the energy counter (integer mJ) refreshes every 100 ms; a read costs about 2.9 ms;
- the ``NVML_FI_DEV_POWER_INSTANT`` field is the average power over the last 100 ms refresh; it
  follows a step in power within ~0.11 s; a read costs about 2.5 µs;
- ``nvmlDeviceGetPowerUsage`` is a ~1 s running average, refreshed every 100 ms: after a step in
  power it crosses 50% in 0.5–0.6 s and 90% in 0.8–1.0 s; a read costs about 0.9 µs.

:class:`Readings` keeps the energy at each 100 ms refresh of a virtual timeline and answers each
reading *at any past instant* still held, so that a sampler on the virtual timeline reads what a
thread polling a real card at those instants would have read. Everything is a model prediction.
"""
from __future__ import annotations

import bisect
from collections import deque
from typing import Optional

from ..data import power_step

#: NVML's refresh period for the counter and both power readings (measured, 100 ms).
REFRESH_S = 0.1
#: Length of the power-usage running average (measured: ~1 s on the H100).
USAGE_WINDOW_S = 1.0
#: Refreshes kept: readings further back than this are no longer answered (60 s of timeline).
KEPT_REFRESHES = 600


def read_costs_s() -> dict[str, float]:
    """Measured cost of one read of each reading, in seconds (``counter``, ``instant``, ``usage``)."""
    c = power_step()["read_cost_us"]
    return {"counter": c["energy_counter_us"] / 1e6, "instant": c["power_instant_field_us"] / 1e6,
            "usage": c["power_usage_us"] / 1e6}


class Readings:
    """The counter and the two power readings of a virtual card, from its energy at each refresh.

    Feed it with :meth:`advance` as the timeline moves: ``(t0, e0_j)`` to ``(t1, e1_j)`` at constant
    power in between (the refreshes inside see the energy at their own instant).
    """

    def __init__(self, idle_power_w: float):
        self.idle_power_w = float(idle_power_w)
        self._t: deque[float] = deque([0.0], maxlen=KEPT_REFRESHES)
        self._e: deque[float] = deque([0.0], maxlen=KEPT_REFRESHES)
        self._next_s = REFRESH_S

    def advance(self, t0_s: float, e0_j: float, t1_s: float, e1_j: float) -> None:
        while self._next_s <= t1_s + 1e-12:
            r = self._next_s
            frac = 1.0 if t1_s <= t0_s else (r - t0_s) / (t1_s - t0_s)
            self._t.append(r)
            self._e.append(e0_j + (e1_j - e0_j) * min(max(frac, 0.0), 1.0))
            self._next_s = r + REFRESH_S

    def _last(self, t_s: Optional[float]) -> int:
        """Index of the last refresh at or before ``t_s`` (the latest one when None)."""
        if t_s is None:
            return len(self._t) - 1
        return max(0, bisect.bisect_right(self._t, t_s + 1e-12) - 1)

    def counter_mj(self, t_s: Optional[float] = None) -> int:
        """The energy counter as of the last refresh at or before ``t_s`` (integer mJ)."""
        return int(self._e[self._last(t_s)] * 1e3)

    def _average_w(self, t_s: Optional[float], window_s: float) -> float:
        k = self._last(t_s)
        back = max(1, int(round(window_s / REFRESH_S)))
        j = k - back
        if j < 0:
            # before the timeline began the card idled (a fresh process sees an idle card)
            span = self._t[k] - self._t[0]
            e = self._e[k] - self._e[0] + self.idle_power_w * (window_s - span)
            return e / window_s
        return (self._e[k] - self._e[j]) / (self._t[k] - self._t[j])

    def instant_w(self, t_s: Optional[float] = None) -> float:
        """``POWER_INSTANT``: average power over the last 100 ms refresh at or before ``t_s``."""
        return self._average_w(t_s, REFRESH_S)

    def usage_w(self, t_s: Optional[float] = None) -> float:
        """``nvmlDeviceGetPowerUsage``: the ~1 s running average, refreshed every 100 ms."""
        return self._average_w(t_s, USAGE_WINDOW_S)

    def history(self) -> list[tuple[float, int]]:
        """(time, counter mJ) at every refresh still held, oldest first."""
        return [(t, int(e * 1e3)) for t, e in zip(self._t, self._e) if t > 0]

    def last_refresh_s(self) -> float:
        return self._t[-1]
