"""``kdvfs reset``: unlock the clocks that a crashed run left locked.

A run that dies by SIGKILL (or a lost node) cannot restore its GPU; its state file in the state
directory says which GPU it had locked. This command resets each such GPU, found by UUID, while
holding the GPU's lock so that it never races a run that is starting, and removes the file.
``--all`` also resets GPUs without a state file (clocks locked by hand or by another tool).
"""
from __future__ import annotations

import json
from typing import Optional

from ..config import default_state_dir
from ..devices import nvml as nvml_backend
from ..errors import GpuBusyError, KdvfsError, NoPermissionError
from ..guard import all_states, reclaim


def add_arguments(parser) -> None:
    parser.add_argument("--state-dir", default=None,
                        help="where runs keep their state files (default: $KDVFS_STATE_DIR or ~/.local/state/kdvfs)")
    parser.add_argument("--all", action="store_true",
                        help="reset the locked clocks of every GPU, with or without a state file (needs permission)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def reset(state_dir: Optional[str] = None, *, all_gpus: bool = False, nvml=None) -> dict:
    """Reset what crashed runs left locked; returns what was done.

    Raises NoPermissionError (saying how to get permission) when a reset is refused, and
    DeviceUnavailableError when there is something to reset but no NVIDIA driver.
    """
    state_dir = state_dir or default_state_dir()
    out: dict = {"state_dir": str(state_dir), "restored": [], "reset": [], "busy": [], "errors": []}
    states = all_states(state_dir)
    for rec in states:
        if rec["alive"]:
            out["busy"].append({"uuid": rec.get("uuid"), "owner_pid": rec.get("owner_pid"),
                                "state_file": rec["state_file"]})
    stale = [rec for rec in states if not rec["alive"]]
    if not stale and not all_gpus:
        return out
    nvml = nvml if nvml is not None else nvml_backend.import_nvml()
    nvml_backend.nvml_init(nvml)
    try:
        done: set[str] = set()
        for rec in stale:
            uuid = rec.get("uuid")
            if not uuid:
                out["errors"].append({"state_file": rec["state_file"],
                                      "error": "unreadable state file: check the GPU with `kdvfs info`, then delete it"})
                continue
            _reset_one(out, nvml, uuid, state_dir, force=False, by_uuid=True)
            done.add(uuid)
        if all_gpus:
            for i in range(nvml_backend.nvml_gpu_count(nvml)):
                _reset_one(out, nvml, i, state_dir, force=True, by_uuid=False, skip=done)
    finally:
        nvml_backend.nvml_shutdown(nvml)
    return out


def _reset_one(out: dict, nvml, which, state_dir, *, force: bool, by_uuid: bool, skip=frozenset()) -> None:
    try:
        dev = (nvml_backend.NvmlDevice.open_by_uuid(which, nvml=nvml) if by_uuid
               else nvml_backend.NvmlDevice(nvml=nvml, nvml_index=which))
    except NoPermissionError:
        raise
    except KdvfsError as exc:
        out["errors"].append({"gpu": which, "error": str(exc)})
        return
    try:
        uuid = dev.info().uuid
        if uuid in skip:
            return
        try:
            rec = reclaim(dev, state_dir, force=force)
        except GpuBusyError as exc:
            # A live run owns it and restores it itself; resetting under it would undo its plan.
            if not any(b.get("uuid") == uuid for b in out["busy"]):
                out["busy"].append({"uuid": uuid, "owner_pid": exc.owner_pid, "state_file": None})
            return
        entry = {"uuid": uuid, "index": dev.nvml_index}
        if rec is not None:
            entry.update(pid=rec.get("pid"), state_file=rec.get("state_file"), since=rec.get("since"))
            out["restored"].append(entry)
        elif force:
            out["reset"].append(entry)
        # else: its writer's file vanished meanwhile (a new run on that GPU restored it)
    finally:
        dev.close()


def format_text(res: dict) -> str:
    lines = []
    for r in res["restored"]:
        lines.append(f"restored GPU {r['uuid']}: unlocked the SM and memory clocks left locked by process "
                     f"{r.get('pid', '?')}; removed {r.get('state_file')}")
    for r in res["reset"]:
        lines.append(f"reset GPU {r['uuid']}: unlocked the SM and memory clocks")
    for b in res["busy"]:
        lines.append(f"left GPU {b['uuid']} alone: process {b.get('owner_pid') or '?'} is running kdvfs on it "
                     "and will restore it when it ends")
    for e in res["errors"]:
        where = e.get("state_file") or f"GPU {e.get('gpu')}"
        lines.append(f"could not reset {where}: {e['error']}")
    if not lines:
        lines.append(f"nothing to reset: no state files left by crashed runs in {res['state_dir']} "
                     "(use --all to reset every GPU's locked clocks)")
    return "\n".join(lines)


def run(args, nvml: Optional[object] = None) -> int:
    res = reset(args.state_dir, all_gpus=args.all, nvml=nvml)
    print(json.dumps(res, indent=1) if args.json else format_text(res))
    return 1 if res["errors"] else 0
