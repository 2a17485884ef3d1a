"""The plugin manager: specs, then the built-ins, then third-party entry points, then a check.

Third-party plugins register under the entry-point group ``kdvfs``. ``KDVFS_DISABLE_ENTRYPOINTS=1``
skips them (tests, debugging); ``KDVFS_TRACE_PLUGINS=1`` prints every hook call.
"""
from __future__ import annotations

import os
from typing import Iterable

import pluggy

from . import hookspecs
from .hookspecs import PROJECT


def make_plugin_manager(builtins: Iterable[object] = (), extra: Iterable[object] = (),
                        load_entrypoints: bool | None = None) -> pluggy.PluginManager:
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(hookspecs)
    for plugin in builtins:
        pm.register(plugin, name=f"builtin:{type(plugin).__name__}")
    if load_entrypoints is None:
        load_entrypoints = os.environ.get("KDVFS_DISABLE_ENTRYPOINTS", "") not in ("1", "true")
    if load_entrypoints:
        pm.load_setuptools_entrypoints(PROJECT)
    for plugin in extra:
        pm.register(plugin)
    pm.check_pending()
    if os.environ.get("KDVFS_TRACE_PLUGINS"):
        pm.trace.root.setwriter(print)
        pm.enable_tracing()
    return pm
