"""kdvfs is a library: it adds no logging handler and sets no level at import; the command does."""
import logging
import subprocess
import sys


def test_import_configures_no_logging():
    code = ("import logging, kdvfs_plugins, kdvfs_plugins.engine, kdvfs_lightning, kdvfs_deepspeed, kdvfs_megatron; "
            "log = logging.getLogger('kdvfs'); "
            "print(len(log.handlers), log.level, log.propagate, len(logging.getLogger().handlers))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["0", "0", "True", "0"]


def test_a_users_configuration_captures_and_silences_kdvfs(caplog):
    from kdvfs_plugins.log import logger

    with caplog.at_level(logging.INFO, logger="kdvfs"):
        logger.info("device simulated for GPU 0: no NVIDIA driver")
    assert [r.getMessage() for r in caplog.records] == ["device simulated for GPU 0: no NVIDIA driver"]
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="kdvfs"):
        logger.warning("clock writes refused")
    assert not caplog.records


def test_the_command_sets_up_its_own_handler(capsys):
    from kdvfs_plugins import log

    log_ = logging.getLogger("kdvfs")
    before = (list(log_.handlers), log_.level, log_.propagate)
    try:
        log.setup_cli_logging()
        log.setup_cli_logging()  # once, however often it is called
        assert sum(getattr(h, "_kdvfs_cli", False) for h in log_.handlers) == 1
        log.logger.info("picked simulated")
        assert "kdvfs: picked simulated" in capsys.readouterr().err
    finally:
        for h in list(log_.handlers):
            if h not in before[0]:
                log_.removeHandler(h)
        log_.setLevel(before[1])
        log_.propagate = before[2]
