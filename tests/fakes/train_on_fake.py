"""A training loop for the crash tests, run as a child process with the fake ``pynvml`` shim.

Usage: train_on_fake.py SM_MHZ MEM_MHZ [holdonly]. Locks the clocks through an Engine on the
nvml device, prints LOCKED, then keeps stepping until a signal ends it. With ``holdonly`` it
only takes the GPU's lock (a ClockGuard) and waits, without writing any clock.
"""
import sys
import time

from kdvfs_plugins import KdvfsConfig
from kdvfs_plugins.config import default_state_dir
from kdvfs_plugins.devices import NvmlDevice
from kdvfs_plugins.devices.base import HostMarker
from kdvfs_plugins.engine import Engine
from kdvfs_plugins.guard import ClockGuard


def main() -> None:
    sm_mhz, mem_mhz = int(sys.argv[1]), int(sys.argv[2])
    # Host markers: no torch import, so the child starts fast.
    device = NvmlDevice(0, marker_factory=HostMarker)
    if sys.argv[3:] == ["holdonly"]:
        ClockGuard(device, default_state_dir()).acquire()
        print("HOLDING", flush=True)
        time.sleep(60)
        return
    cfg = KdvfsConfig.from_dict({"mode": "apply", "device": "nvml", "sm_mhz": sm_mhz, "mem_mhz": mem_mhz,
                                 "run_dir": "unused"})
    engine = Engine(cfg, device=device).start()
    step = 0
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        engine.step_begin(step)
        engine.region_enter("forward")
        engine.region_exit("forward")
        engine.step_end()
        if step == 0:
            print("LOCKED", flush=True)
        step += 1
        time.sleep(0.002)
    engine.close()


if __name__ == "__main__":
    main()
