"""Every test runs with its own kdvfs state directory and without third-party plugins."""
import logging

import pytest


@pytest.fixture(autouse=True)
def _isolated_kdvfs(tmp_path, monkeypatch):
    monkeypatch.setenv("KDVFS_STATE_DIR", str(tmp_path / "kdvfs-state"))
    # The GPUs' system-wide locks too: fake GPUs of concurrent test runs share UUIDs.
    monkeypatch.setenv("KDVFS_LOCK_DIR", str(tmp_path / "kdvfs-locks"))
    monkeypatch.setenv("KDVFS_DISABLE_ENTRYPOINTS", "1")


class _ListHandler(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append(record)


@pytest.fixture
def kdvfs_log():
    """Records of the ``kdvfs`` logger, INFO and DEBUG included (the library sets no level of its
    own, so without this only WARNING and above would reach a handler)."""
    handler = _ListHandler()
    log = logging.getLogger("kdvfs")
    level = log.level
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    try:
        yield handler.records
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
