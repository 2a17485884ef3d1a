"""``kdvfs info``: driver, GPUs, supported clocks, current clocks, and whether clocks may be set.

:func:`collect` gathers everything into a dict (``nvml`` may be any module with pynvml's API);
:func:`run` prints it as text or JSON. Nothing here writes to a GPU.
"""
from __future__ import annotations

import json
import os
from typing import Optional

from ..devices import choose_kind
from ..devices import nvml as nvml_backend
from ..errors import DeviceUnavailableError, KdvfsError, NoPermissionError


def add_arguments(parser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def _permission() -> dict:
    permitted = nvml_backend.writes_permitted()
    root = hasattr(os, "geteuid") and os.geteuid() == 0
    if permitted:
        why = "this process has the SYS_ADMIN capability" + (" (root)" if root else "")
    elif root:
        why = "root, but without the SYS_ADMIN capability (a container started without --cap-add SYS_ADMIN)"
    else:
        why = "not root and no SYS_ADMIN capability"
    return {"permitted": permitted, "why": why, "how_to": None if permitted else NoPermissionError.HOW_TO}


def _sm_summary(sm_mhz: tuple[int, ...]) -> dict:
    steps = {a - b for a, b in zip(sm_mhz, sm_mhz[1:])}
    return {
        "min_mhz": min(sm_mhz), "max_mhz": max(sm_mhz), "count": len(sm_mhz),
        "step_mhz": steps.pop() if len(steps) == 1 else None,
    }


def _gpu(nvml, index: int) -> dict:
    dev = nvml_backend.NvmlDevice(nvml=nvml, nvml_index=index)
    try:
        info = dev.info()
        out = {
            "index": index, "name": info.name, "uuid": info.uuid,
            "memory_clocks_mhz": list(info.clocks.mem_mhz),
            "sm_clocks_by_memory_clock": {
                str(m): _sm_summary(info.clocks.sm_mhz_by_mem[m]) for m in info.clocks.mem_mhz
            },
            "power_limit_w": info.power_limit_w,
            "power_reading": dev.power_source,
        }
        try:
            now = dev.current_clocks()
            out["current_clocks"] = {"sm_mhz": now.sm_mhz, "mem_mhz": now.mem_mhz}
        except KdvfsError as exc:
            out["current_clocks"] = None
            out["current_clocks_error"] = str(exc)
        return out
    finally:
        dev.close()


def collect(nvml=None) -> dict:
    """Everything ``kdvfs info`` shows. ``nvml``: the NVML module to ask (default ``pynvml``)."""
    kind, why = choose_kind("auto", nvml=nvml)
    out: dict = {
        "driver": None, "nvml_available": False, "gpus": [],
        "clock_writes": _permission(),
        "auto_device": {"kind": kind, "why": why},
    }
    try:
        nvml = nvml if nvml is not None else nvml_backend.import_nvml()
        nvml_backend.nvml_init(nvml)
    except (DeviceUnavailableError, KdvfsError) as exc:
        out["error"] = f"{exc}; kdvfs will use the simulated device (a virtual H100)"
        # Without a driver there are no clocks to write, whatever this process's capabilities.
        out["clock_writes"] = {"permitted": False, "why": "no NVIDIA driver, so no GPU clocks to set",
                               "how_to": None, "capability": out["clock_writes"]}
        return out
    try:
        out["nvml_available"] = True
        with nvml_backend._nvml_errors(nvml, "nvmlSystemGetDriverVersion"):
            out["driver"] = nvml_backend._text(nvml.nvmlSystemGetDriverVersion())
        for i in range(nvml_backend.nvml_gpu_count(nvml)):
            try:
                out["gpus"].append(_gpu(nvml, i))
            except KdvfsError as exc:
                out["gpus"].append({"index": i, "error": str(exc)})
    except KdvfsError as exc:
        out["error"] = str(exc)
    finally:
        nvml_backend.nvml_shutdown(nvml)
    return out


def format_text(info: dict) -> str:
    lines = []
    if not info["nvml_available"]:
        lines.append(f"NVIDIA driver: not found. {info.get('error', '')}".rstrip())
    else:
        lines.append(f"NVIDIA driver: {info['driver']}")
        if info.get("error"):
            lines.append(f"  error: {info['error']}")
        if not info["gpus"]:
            lines.append("GPUs: none")
        for g in info["gpus"]:
            if "error" in g:
                lines.append(f"GPU {g['index']}: {g['error']}")
                continue
            lines.append(f"GPU {g['index']}: {g['name']}  {g['uuid']}")
            lines.append(f"  memory clocks (MHz): {', '.join(map(str, g['memory_clocks_mhz']))}")
            for mem, sm in g["sm_clocks_by_memory_clock"].items():
                step = f" in {sm['step_mhz']} MHz steps" if sm["step_mhz"] else ""
                lines.append(f"  SM clocks with memory at {mem} MHz: {sm['count']} from "
                             f"{sm['min_mhz']} to {sm['max_mhz']} MHz{step}")
            cur = g.get("current_clocks")
            lines.append(f"  current clocks: {cur['sm_mhz']}/{cur['mem_mhz']} MHz (SM/memory)" if cur
                         else f"  current clocks: unknown ({g.get('current_clocks_error')})")
            lines.append(f"  power limit: {g['power_limit_w']:.0f} W")
            if g.get("power_reading"):
                lines.append("  power read from: " + ("the instant field (100 ms average)" if g["power_reading"] == "instant"
                                                       else "power usage (a ~1 s running average on the H100)"))
    cw = info["clock_writes"]
    state = "permitted" if cw["permitted"] else "not permitted" if info["nvml_available"] else "none possible"
    lines.append(f"clock writes: {state} ({cw['why']})")
    if cw["how_to"]:
        lines.append(f"  {cw['how_to']}")
    auto = info["auto_device"]
    lines.append(f"device 'auto' picks: {auto['kind']} ({auto['why']})")
    lines.append(restore_note())
    return "\n".join(lines)


def restore_note() -> str:
    """What a restore returns to: NVML cannot read back locked clocks, so an administrator's lock
    set before a run is reset, not restored, unless the site names its clocks."""
    from ..ownership import RESTORE_ENV, restore_clocks_from_env

    try:
        site = restore_clocks_from_env()
    except ValueError as exc:
        return f"restore: {exc}"
    if site is not None:
        return f"restore: kdvfs locks {site[0]}/{site[1]} MHz (SM/memory) when it restores ({RESTORE_ENV})"
    return ("restore: kdvfs unlocks the clocks (driver default); NVML cannot read back locked clocks, so an "
            f"administrator's lock set before a run is not restored: set {RESTORE_ENV}=SM/MEM to restore that instead")


def run(args, nvml: Optional[object] = None) -> int:
    info = collect(nvml)
    print(json.dumps(info, indent=1) if args.json else format_text(info))
    return 0
