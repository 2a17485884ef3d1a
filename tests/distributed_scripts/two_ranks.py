"""Two gloo ranks with one engine each: plan agreement, and a rank whose writes are refused."""
import json
import os
import sys

import torch.distributed as dist

from kdvfs_plugins import ClockPair, KdvfsConfig
from kdvfs_plugins.devices import NvmlDevice
from kdvfs_plugins.distributed import WORLD
from kdvfs_plugins.engine import Engine

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from fakes.fake_nvml import FakeNvml  # noqa: E402

out_dir, scenario = sys.argv[1], sys.argv[2]
dist.init_process_group("gloo")
rank = dist.get_rank()
result = {"rank": rank}
try:
    if scenario == "plan":
        # Only rank 0 can read the plan file; the group still ends up with one plan.
        plan_path = os.path.join(out_dir, "plan.json" if rank == 0 else f"missing-{rank}.json")
        cfg = KdvfsConfig.from_dict({"mode": "apply", "plan_path": plan_path, "run_dir": out_dir,
                                     "state_dir": os.path.join(out_dir, f"state{rank}")})
        eng = Engine(cfg, rank=rank, device=NvmlDevice(rank, nvml=FakeNvml(gpus=2)), plan_group=WORLD).start()
        result["plan"] = {k: v.to_dict() for k, v in eng.plan.regions.items()}
        eng.close()
    elif scenario == "refused":
        # Rank 1 may not set clocks: it falls back to observe; rank 0 goes on writing. No collective
        # waits on a clock write, so neither rank stalls.
        fake = FakeNvml(gpus=2, privileged=(rank == 0))  # one GPU per rank, as one writer per GPU requires
        cfg = KdvfsConfig.from_dict({"mode": "apply", "region_clocks": {"backward": [1500, 2619]},
                                     "run_dir": out_dir, "state_dir": os.path.join(out_dir, f"state{rank}")})
        eng = Engine(cfg, rank=rank, device=NvmlDevice(rank, nvml=fake)).start()
        for step in range(5):
            eng.step_begin(step)
            eng.region_enter("backward")
            eng.region_exit("backward")
            eng.step_end()
            dist.barrier()  # the training loop's own collectives keep going
        result["device"] = eng.device.kind
        result["writes"] = fake.gpu_state(0)["writes"]
        eng.close()
        result["restored"] = fake.gpu_state(0)["sm_locked"] is None
except Exception as exc:
    result["error"] = f"{type(exc).__name__}: {exc}"
with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
    json.dump(result, f)
dist.destroy_process_group()
