"""Every test runs with its own kdvfs state directory and without third-party plugins."""
import logging

import pytest


@pytest.fixture(autouse=True)
def _isolated_kdvfs(tmp_path, monkeypatch):
    monkeypatch.setenv("KDVFS_STATE_DIR", str(tmp_path / "kdvfs-state"))
    monkeypatch.setenv("KDVFS_DISABLE_ENTRYPOINTS", "1")


class _ListHandler(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append(record)


@pytest.fixture
def kdvfs_log():
    """Records of the ``kdvfs`` logger (it does not propagate, so caplog misses them)."""
    handler = _ListHandler()
    log = logging.getLogger("kdvfs")
    log.addHandler(handler)
    try:
        yield handler.records
    finally:
        log.removeHandler(handler)
