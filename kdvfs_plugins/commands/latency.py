"""``kdvfs latency``: measure a device's clock switch latency and store it for the planner.

    kdvfs latency                       # the simulated H100 (measures its configured latency back)
    kdvfs latency --device nvml --json  # a real GPU; needs clock writes (never runs on observe)

The result is stored in the kdvfs state directory, keyed by GPU name and driver; planning uses it
from then on (:func:`kdvfs_plugins.latency.switch_latency_for`; config ``switch_latency_ms``
overrides it).
"""
from __future__ import annotations

import argparse
import json

from ..errors import ConfigError, NoPermissionError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="simulated", choices=("simulated", "nvml", "observe"),
                   help="simulated (default) or nvml (a real GPU whose clocks this process may set)")
    p.add_argument("--index", type=int, default=0, help="GPU index (default 0)")
    p.add_argument("--repeats", type=int, default=5, help="changes per clock pair and direction (default 5)")
    p.add_argument("--sim-switch-latency-ms", type=float, default=None,
                   help="the simulated GPU's configured latency (default: the model's, 6 ms)")
    p.add_argument("--state-dir", default=None, help="where to store the result (default: kdvfs state dir)")
    p.add_argument("--no-store", action="store_true", help="measure and print only")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    from .. import latency

    if args.repeats < 1:
        raise ConfigError("--repeats", args.repeats, "at least 1", source="kdvfs latency")
    if args.device == "simulated":
        from ..sim.gpu import VirtualGPU

        result = latency.measure_simulated(VirtualGPU(switch_latency_ms=args.sim_switch_latency_ms, noise=False),
                                           repeats=args.repeats)
    elif args.device == "observe":
        raise NoPermissionError("kdvfs latency changes clocks; the observe device only reads. It")
    else:
        from ..devices import open_device

        from ..config import default_state_dir
        from ..guard import ClockGuard

        device = open_device("nvml", args.index)
        # the guard owns the GPU for the measurement: one writer per GPU, and the clocks are
        # restored on any fatal signal or a crash, as in a training run
        guard = ClockGuard(device, args.state_dir or default_state_dir())
        try:
            guard.acquire()
            result = latency.measure_nvml(device, repeats=args.repeats, write=guard.write)
        finally:
            guard.release()
            device.close()
    out = result.to_dict()
    if not args.no_store:
        out["stored_at"] = str(latency.store(result, args.state_dir))
    if args.json:
        print(json.dumps(out, indent=1))
    else:
        label = " (model prediction: simulated H100)" if result.model_prediction else ""
        print(f"kdvfs latency: {result.device_name}, driver {result.driver}{label}")
        print(f"  switch latency      {result.switch_latency_ms:.3f} ms (median of {len(result.samples_ms)})")
        print(f"  transition latency  {result.transition_latency_ms:.3f} ms")
        if "stored_at" in out:
            print(f"  stored: {out['stored_at']}")
    return 0
