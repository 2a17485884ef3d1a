"""Progress of long work, drawn on terminals only: the one home for it in kdvfs.

Long work (the demo, ``kdvfs simulate --compare/--sweep/--latency-sweep/--explore``, exploration
during training) shows a tqdm bar on a terminal and nothing at all elsewhere (a log file, CI, a
pipe), so that captured output holds results only::

    from kdvfs_plugins.progress import progress

    with progress(total=5, desc="exploring", unit="seed") as bar:
        for seed in range(5):
            run_seed(seed)
            bar.update(1)                            # one unit done
            bar.set_status(f"seed {seed}: applied")  # optional text after the bar

- ``total``: units of work (None: unknown; the bar counts without a percentage).
- ``enabled``: None (default) draws only when ``stream`` is a terminal; True or False force it
  (the config key ``progress`` -- "auto", true, false -- maps onto it through :func:`wants_progress`).
- ``stream``: where to draw (default ``sys.stderr``, leaving stdout to results).

Off a terminal ``progress`` yields a bar whose methods do nothing, so callers never test for a
terminal themselves. A bar is closed when the ``with`` block ends, also on an exception.

Also here: :class:`ProgressLine` (one status line the engine redraws while exploring),
:func:`engine_status` (kdvfs's state in a few words -- "exploring 340/1500", "validating",
"applied -6.7% energy" -- which each adapter puts where its framework shows progress), and the
exploration summary.
"""
from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Iterator, Optional, TextIO


def wants_progress(setting, stream: Optional[TextIO] = None) -> bool:
    """``progress`` config value: True, False, or "auto" (only when the stream is a terminal)."""
    if setting == "auto" or setting is None:
        stream = stream or sys.stderr
        try:
            return bool(stream.isatty())
        except (AttributeError, ValueError):
            return False
    return bool(setting)


def _width_kwargs(stream: TextIO) -> dict:
    """tqdm follows the terminal's width; a terminal that reports 0 columns (some pseudo
    terminals) would get an empty bar, so it gets 80."""
    import os

    try:
        columns = os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError):
        columns = 0
    return {"dynamic_ncols": True} if columns > 0 else {"ncols": 80}


class Bar:
    """What :func:`progress` yields: a tqdm bar, or nothing at all when disabled."""

    def __init__(self, total: Optional[int], desc: str, unit: str, stream: Optional[TextIO], enabled: bool):
        self._bar = None
        if enabled:
            from tqdm import tqdm  # imported only when a bar is drawn

            stream = stream or sys.stderr
            self._bar = tqdm(total=total, desc=desc, unit=unit, file=stream, leave=False, **_width_kwargs(stream))

    @property
    def enabled(self) -> bool:
        return self._bar is not None

    def update(self, n: int = 1) -> None:
        """``n`` more units done."""
        if self._bar is not None:
            self._bar.update(n)

    def set_status(self, text: str) -> None:
        """Text shown after the bar (the current item, an interim result)."""
        if self._bar is not None:
            self._bar.set_postfix_str(text, refresh=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


@contextmanager
def progress(total: Optional[int], desc: str, *, unit: str = "it", enabled: Optional[bool] = None,
             stream: Optional[TextIO] = None) -> Iterator[Bar]:
    """A progress bar for a ``with`` block: drawn on a terminal, a no-op elsewhere (module doc)."""
    bar = Bar(total, desc, unit, stream, wants_progress("auto" if enabled is None else enabled, stream))
    try:
        yield bar
    finally:
        bar.close()


class ProgressLine:
    """One status line, redrawn in place on a terminal (tqdm); silent when disabled."""

    def __init__(self, enabled: bool, stream: Optional[TextIO] = None):
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self._bar = None

    def update(self, text: str) -> None:
        if not self.enabled:
            return
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(total=None, bar_format="{desc}", file=self.stream, leave=True,
                             **_width_kwargs(self.stream))
        self._bar.set_description_str(text, refresh=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def engine_status(engine) -> Optional[str]:
    """kdvfs's state in a few words, for a framework's progress display or log line.

    "exploring 340/1500" (steps of exploration used, of the budget), "validating 1420/1500",
    "applied -6.7% energy" (the validated change; "model prediction" on the simulated GPU),
    "rejected: default clocks", "plan from plan.json", "observing". None before the engine starts.
    Reads the engine's public attributes only (``explorer``, ``explore_result``, ``plan``).
    """
    if engine is None or getattr(engine, "device", None) is None:
        return None
    simulated = getattr(engine.device, "kind", None) == "simulated"
    explorer = getattr(engine, "explorer", None)
    if explorer is not None and not explorer.done:
        s = explorer.s
        last = explorer.blocks[-1].last_step + 1 if explorer.blocks else s.start_step
        used = max(0, min(last, engine.step + 1) - s.start_step)
        doing = {"baseline": "measuring the default clocks", "validate": "validating"}.get(explorer.phase, "exploring")
        return f"{doing} {used}/{s.explore_max_steps}"
    result = getattr(engine, "explore_result", None)
    if result is not None:
        if result.status == "applied":
            change = (result.validated or {}).get("energy_change", (result.predicted or {}).get("energy_change"))
            figure = "" if change is None else f" {change:+.1%} energy"
            return f"applied{figure}" + (" (model prediction)" if simulated and figure else "")
        if result.status == "rejected":
            return "rejected: default clocks"
        return result.status
    plan = getattr(engine, "plan", None)
    if plan is not None:
        return "fixed clocks" if getattr(plan, "source", None) == "config" else "plan applied"
    return "observing" if engine.config.mode == "observe" else None


def state_line(engine, step: Optional[int], every: Optional[int]) -> Optional[str]:
    """``kdvfs: exploring 340/1500`` on the steps a framework prints its own log line (``step`` a
    multiple of ``every``, its log interval), for the DeepSpeed and Megatron adapters; None on
    other steps, without an interval, or before the engine has a state."""
    if not every or step is None or step % every:
        return None
    state = engine_status(engine)
    return None if state is None else f"kdvfs: {state}"


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
    if result.clocks_by_name:
        from .tables import Table

        rows = [[name, str(clocks) if clocks is not None else "default"]
                for name, clocks in sorted(result.clocks_by_name.items())]
        lines.append(Table(["region", "clocks"], rows, align="ll").text())
    return "\n".join(lines)
