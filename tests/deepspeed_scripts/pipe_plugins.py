"""For the pipeline runs (DeepSpeed and Megatron): a recorder of region boundaries and clock
changes, a fake GPU per rank whose clock writes can be refused, and the per-rank result file."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from kdvfs_plugins import hookimpl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fakes.fake_nvml import FakeNvml  # noqa: E402
from helpers import RegionRecorder  # noqa: E402

#: Every region boundary and every clock change, in program order.
Recorder = RegionRecorder


class FakeGpus:
    """Each rank drives its own fake GPU (one writer per GPU); ``privileged`` False refuses writes."""

    def __init__(self, rank: int, gpus: int, privileged: bool):
        self.fake = FakeNvml(gpus=gpus, privileged=privileged)
        self.rank = rank

    @hookimpl(tryfirst=True)
    def kdvfs_make_device(self, config, index):
        from kdvfs_plugins.devices import NvmlDevice

        return NvmlDevice(self.rank, nvml=self.fake)


def _pair(clocks):
    return None if clocks is None else [clocks.sm_mhz, clocks.mem_mhz]


def write_result(out: Path, rank: int, recorder: RegionRecorder, device, fake, **extra) -> None:
    """OUT/rank<N>.json: region events, clock changes, the device kind, and the clock requests
    (simulated device) or the fake GPU's writes and whether its clocks are back at default."""
    result = {"rank": rank, "events": [list(e) for e in recorder.events], "device": device.kind,
              "changes": [[c.region, _pair(c.clocks)] for c in recorder.changes], **extra}
    if hasattr(device, "requests"):
        result["requests"] = [_pair(c) for _, c in device.requests]
    if fake is not None:
        gpu = fake.fake.gpu_state(rank)
        result["writes"] = gpu["writes"]
        result["restored"] = gpu["sm_locked"] is None and gpu["mem_locked"] is None
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank}.json").write_text(json.dumps(result))


def parse_args(microbatches_flag: str, *int_flags: str) -> argparse.Namespace:
    """OUT_DIR, ``microbatches_flag`` (the framework's name for it), --steps, --block, --refuse,
    and ``int_flags`` (integers, default 1)."""
    p = argparse.ArgumentParser()
    for flag in int_flags:
        p.add_argument(flag, type=int, default=1)
    p.add_argument("out", type=Path)
    p.add_argument(microbatches_flag, dest="microbatches", type=int, default=4)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--block", type=json.loads, default={}, help="JSON merged into the kdvfs config")
    p.add_argument("--refuse", type=int, default=None, help="this rank's fake GPU refuses clock writes")
    return p.parse_args()


def base_config(out: Path, rank: int, block: dict) -> dict:
    """Simulated GPU, a plan applied, region names at kernel level; ``block`` on top."""
    return {"device": "simulated", "mode": "apply", "granularity": "kernel", "sim_noise": False,
            "run_dir": str(out / "run"), "state_dir": str(out / f"state{rank}"), **block}


def plugins_for(rank: int, world: int, refuse):
    """(recorder, fake GPUs or None, plugin list): a fake GPU per rank when ``refuse`` names a rank."""
    recorder = Recorder()
    fake = None if refuse is None else FakeGpus(rank, world, privileged=rank != refuse)
    return recorder, fake, [recorder] + ([fake] if fake is not None else [])
