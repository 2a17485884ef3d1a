"""Every test runs with its own kdvfs state directory and without third-party plugins."""
import logging

import pytest


def pytest_collection_modifyitems(items):
    """The modules with slow tests (marked ``slow``) run first, each module's tests together and in
    their order: with ``-n 2`` the workers then end on short tests instead of one waiting for a long
    test that started last."""
    slow_modules = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_modules)  # stable: the order is kept otherwise


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


@pytest.fixture(scope="session")
def pipeline_cluster():
    """A small virtual pipeline: the shipped GPT stage traces as 2 stages, 3 microbatches."""
    from kdvfs_plugins.sim.cluster import VirtualCluster
    from kdvfs_plugins.studies.pipeline import stage_workloads

    workloads, _ = stage_workloads(2)
    return VirtualCluster(workloads, 3)


@pytest.fixture(scope="session")
def pipeline_explored(pipeline_cluster):
    """One seed of exploration across its stages through an engine per rank (read, never changed)."""
    from kdvfs_plugins.studies.pipeline_explore import explore_seed_engines

    return explore_seed_engines(pipeline_cluster, 0, max_steps=400)
