"""Child processes that see the same fake GPU as the test (through the ``pynvml`` shim)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

FAKES = Path(__file__).resolve().parent
ROOT = FAKES.parents[1]


def shim_env(fake_state: Path, **extra: str) -> dict:
    """Environment for a child: the shim first on the path, the fake's state file, no plugins."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(FAKES / "pynvml_shim"), str(ROOT)])
    env["FAKE_NVML_STATE"] = str(fake_state)
    env["KDVFS_DISABLE_ENTRYPOINTS"] = "1"
    env.update(extra)
    return env


def start_training(fake_state: Path, sm_mhz: int, mem_mhz: int, *args: str, ready: str = "LOCKED") -> subprocess.Popen:
    """Start ``train_on_fake.py`` and wait until it prints ``ready``."""
    proc = subprocess.Popen(
        [sys.executable, str(FAKES / "train_on_fake.py"), str(sm_mhz), str(mem_mhz), *args],
        env=shim_env(fake_state), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    line = proc.stdout.readline().strip()
    if line != ready:
        proc.kill()
        _, err = proc.communicate(timeout=10)
        raise AssertionError(f"child did not get ready (printed {line!r}):\n{err}")
    return proc


def kdvfs(fake_state: Path, *argv: str, timeout_s: float = 30) -> subprocess.CompletedProcess:
    """Run the ``kdvfs`` command in a child process on the fake GPU."""
    return subprocess.run([sys.executable, "-m", "kdvfs_plugins.cli", *argv], env=shim_env(fake_state),
                          capture_output=True, text=True, timeout=timeout_s)
