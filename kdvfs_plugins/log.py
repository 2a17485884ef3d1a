"""The ``kdvfs`` logger: one line per decision a user should know about."""
from __future__ import annotations

import logging
import sys

logger = logging.getLogger("kdvfs")
if not logger.handlers:
    _handler = logging.StreamHandler(sys.stderr)
    _handler.setFormatter(logging.Formatter("kdvfs: %(message)s"))
    logger.addHandler(_handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
