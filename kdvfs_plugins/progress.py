"""A one-line progress display while exploring, and the final summary.

The line is redrawn in place on a terminal only (``progress="auto"``); elsewhere (log files, CI)
nothing is drawn and the summary goes to the log once.
"""
from __future__ import annotations

import sys
from typing import Optional, TextIO


def wants_progress(setting, stream: Optional[TextIO] = None) -> bool:
    """``progress`` config value: True, False, or "auto" (only when the stream is a terminal)."""
    if setting == "auto":
        stream = stream or sys.stderr
        try:
            return bool(stream.isatty())
        except (AttributeError, ValueError):
            return False
    return bool(setting)


class ProgressLine:
    """Redraws one status line; silent when disabled."""

    def __init__(self, enabled: bool, stream: Optional[TextIO] = None):
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self._width = 0

    def update(self, text: str) -> None:
        if not self.enabled:
            return
        pad = max(0, self._width - len(text))
        self.stream.write("\r" + text + " " * pad)
        self.stream.flush()
        self._width = len(text)

    def close(self) -> None:
        if self.enabled and self._width:
            self.stream.write("\n")
            self.stream.flush()
            self._width = 0


def explore_status(explorer) -> str:
    """``kdvfs explore: block 12 (explore), step 340/1500, exploration slowdown +1.2% (budget 2.0%)``."""
    s = explorer.s
    b = explorer.blocks[-1] if explorer.blocks else None
    used = (b.last_step + 1 - s.start_step) if b else 0
    slow = explorer.exploration_time_change
    return (f"kdvfs explore: {explorer.phase}, block {len(explorer.blocks)} ({b.kind if b else '-'}), "
            f"step {used}/{s.explore_max_steps}, exploration slowdown {slow:+.2%} "
            f"(budget {s.explore_max_slowdown:.1%})")


def format_summary(result, simulated: bool = False) -> str:
    """The final table of an exploration: outcome, predicted and validated figures."""
    lines = []
    if simulated:
        lines.append("(model prediction: simulated H100)")
    lines.append(f"kdvfs exploration {result.status} after {result.steps} steps: {result.message}")
    lines.append(f"  knobs: {', '.join(result.knobs) or '-'}")
    lines.append(f"  exploration slowdown: {result.exploration_time_change:+.2%}")
    p, v = result.predicted, result.validated
    if p:
        lines.append(f"  predicted: energy {p.get('energy_change', 0):+.2%}, time {p.get('time_change', 0):+.2%}")
    if v:
        lines.append(f"  validated ({int(v.get('pairs', 0))} pairs vs default): energy {v['energy_change']:+.2%} "
                     f"[{v['energy_change_min']:+.2%}, {v['energy_change_max']:+.2%}], time {v['time_change']:+.2%} "
                     f"[{v['time_change_min']:+.2%}, {v['time_change_max']:+.2%}]")
    for name, clocks in sorted(result.clocks_by_name.items()):
        lines.append(f"  {name:<40} {clocks if clocks is not None else 'default'}")
    return "\n".join(lines)
