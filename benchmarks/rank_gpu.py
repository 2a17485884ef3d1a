"""Which GPU a benchmark rank's kdvfs read, for the per-rank reports of the benchmarks."""
from __future__ import annotations

import os
import socket

import torch


def gpu_identity(engine) -> dict:
    """Which GPU this rank's kdvfs read: NVML's UUID names the physical card whatever
    CUDA_VISIBLE_DEVICES renumbers; torch's UUID of the current device cross-checks it."""
    dev, session = engine.device, engine.session
    ident = {"kind": getattr(dev, "kind", None), "name": getattr(session, "device_name", None),
             "cuda_index": getattr(session, "device_index", None), "nvml_index": getattr(dev, "nvml_index", None),
             "uuid": None, "torch_uuid": None, "host": socket.gethostname(),
             "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}
    try:
        info = dev.info()  # read (and cached) when the engine started, so still there after it closed
        ident.update(name=info.name, uuid=info.uuid)
    except Exception as exc:
        ident["uuid_error"] = str(exc)
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        if getattr(props, "uuid", None) is not None:
            ident["torch_uuid"] = f"GPU-{props.uuid}"
    return ident


def describe_gpu(g: dict) -> str:
    where = f"CUDA index {g['cuda_index']}" + ("" if g["nvml_index"] is None else f", NVML index {g['nvml_index']}")
    check = ""
    if g["uuid"] and g["torch_uuid"]:
        check = ("; torch's current device is the same GPU" if g["uuid"] == g["torch_uuid"]
                 else f"; torch's current device is {g['torch_uuid']}, another GPU")
    return f"{g['kind']} device on {g['name']} ({where}, UUID {g['uuid']}){check}"
