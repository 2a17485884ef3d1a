"""Hook specifications of the ``kdvfs`` pluggy project.

All arguments are frozen records from :mod:`kdvfs_plugins.events` (or the config, plan and
device objects), so a spec can grow fields without breaking an implementation. Call hooks with
keyword arguments only, as pluggy requires.
"""
from __future__ import annotations

import pluggy

PROJECT = "kdvfs"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec(historic=True)
def kdvfs_configure(config):
    """Called once with the validated :class:`~kdvfs_plugins.config.KdvfsConfig`."""


@hookspec(firstresult=True)
def kdvfs_make_device(config, index):
    """Return the device for GPU ``index`` (a local index), or None to let the next plugin decide."""


@hookspec
def kdvfs_session_start(session):
    """An engine started: ``session`` is a :class:`~kdvfs_plugins.events.SessionInfo`."""


@hookspec
def kdvfs_region_enter(event):
    """A region began (CPU enqueue time): ``event`` is a :class:`~kdvfs_plugins.events.RegionEvent`."""


@hookspec
def kdvfs_region_exit(event):
    """A region ended (CPU enqueue time)."""


@hookspec(firstresult=True)
def kdvfs_choose_clocks(region, step):
    """Return the :class:`~kdvfs_plugins.clocks.ClockPair` for ``region`` (a name) in ``step``.

    Return ``None`` to pass to the next implementation. The built-in fallback (``trylast``)
    answers from the plan, so a plugin that answers replaces the policy. To ask explicitly for
    the driver's default clocks, return :data:`kdvfs_plugins.policy.DEFAULT_CLOCKS`.
    """


@hookspec
def kdvfs_clocks_applied(change):
    """The actuator applied a change: ``change`` is a :class:`~kdvfs_plugins.events.ClockChange`."""


@hookspec
def kdvfs_step_measured(record):
    """A step's GPU times are known: :class:`~kdvfs_plugins.events.StepRecord`."""


@hookspec
def kdvfs_window_measured(window):
    """A window's energy is known: :class:`~kdvfs_plugins.events.WindowRecord`."""


@hookspec(historic=True)
def kdvfs_plan_ready(plan):
    """A plan (:class:`~kdvfs_plugins.plan.Plan`) is in force."""


@hookspec
def kdvfs_session_end(session, error):
    """The engine closed; ``error`` is the exception that ended training, or None."""
