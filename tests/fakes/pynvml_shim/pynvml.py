"""Stands in for ``pynvml`` in a child process: put this folder first on PYTHONPATH.

The fake GPU's state lives in the JSON file named by FAKE_NVML_STATE, so the test process and
its children (a run killed by SIGKILL, then ``kdvfs reset``) all see the same GPU. A fresh file
is made with FAKE_NVML_GPUS GPUs (default 1) and FAKE_NVML_PRIVILEGED (default 1).
"""
import importlib.util
import os
from pathlib import Path

_spec = importlib.util.spec_from_file_location("_kdvfs_fake_nvml", Path(__file__).resolve().parents[1] / "fake_nvml.py")
_mod = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_mod)

_fake = _mod.FakeNvml(
    gpus=int(os.environ.get("FAKE_NVML_GPUS", "1")),
    privileged=os.environ.get("FAKE_NVML_PRIVILEGED", "1") == "1",
    state_path=os.environ["FAKE_NVML_STATE"],
)


def __getattr__(name):
    return getattr(_fake, name)
