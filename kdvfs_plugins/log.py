"""The ``kdvfs`` logger: one line per decision a user should know about.

kdvfs is a library inside someone else's training script, so it configures nothing here: no
handler, no level, and records propagate to the root logger like any other library's. The
user's logging configuration decides what is shown::

    import logging
    logging.basicConfig(level=logging.INFO)            # every library's INFO lines, kdvfs's among them
    logging.getLogger("kdvfs").setLevel(logging.INFO)  # or kdvfs's only (with a handler on the root)

Without any configuration Python shows WARNING and above (clock writes refused, clocks left
locked by a crashed run) and nothing else. Only the ``kdvfs`` command, which owns its process,
sets up a handler: :func:`setup_cli_logging`.
"""
from __future__ import annotations

import logging
import sys
from typing import Optional, TextIO

logger = logging.getLogger("kdvfs")

#: The ``kdvfs`` command's log line format.
CLI_FORMAT = "kdvfs: %(message)s"


def setup_cli_logging(level: int = logging.INFO, stream: Optional[TextIO] = None) -> logging.Handler:
    """For the ``kdvfs`` command only: INFO and above of the ``kdvfs`` logger to stderr, prefixed
    ``kdvfs:``. Calling it again replaces the handler it added before (returns the handler)."""
    for h in list(logger.handlers):
        if getattr(h, "_kdvfs_cli", False):
            logger.removeHandler(h)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(logging.Formatter(CLI_FORMAT))
    handler._kdvfs_cli = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.setLevel(level)
    return handler
