"""Measured H100 data shipped with kdvfs (copied unchanged from the project's measurements)."""
from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from pathlib import Path

DEFAULT_CLOCKS_JSON = "h100-default-clocks.json"
GPT1B_TRACE_CSV = "h100-gpt1b-step-kernels.csv"
POWER_STEP_JSON = "h100-power-step.json"
WAIT_POWER_JSON = "h100-wait-power.json"

#: Kernel traces shipped as workloads: name -> (CSV file, what it is). ``kdvfs simulate --trace NAME``.
WORKLOAD_TRACES = {
    "gpt1b": (GPT1B_TRACE_CSV, "GPT, 1.0 B parameters, seq 2048, batch 8 (H100, measured)"),
    "llama1b": ("h200-llama1b-step-kernels.csv",
                "Llama-class, 1.1 B parameters, RMSNorm, SwiGLU, rotary, seq 2048, batch 4 (H200, kdvfs trace)"),
    "llama-gqa2b": ("h200-llama-gqa2b-step-kernels.csv",
                    "Llama-3 layout, 2 B parameters, grouped-query attention, 128k vocabulary, seq 4096, batch 2 "
                    "(H200, kdvfs trace)"),
    "vit-l16": ("h200-vit-l16-step-kernels.csv",
                "Vision Transformer ViT-L/16, 0.3 B parameters, 224 px, batch 64 (H200, kdvfs trace)"),
    "mixtral1b": ("h200-mixtral1b-step-kernels.csv",
                  "Mixture of experts, 1.4 B parameters (0.5 B active), top-2 of 8 SwiGLU experts, seq 2048, "
                  "batch 4 (H200, kdvfs trace)"),
    "bert-large": ("h200-bert-large-step-kernels.csv",
                   "BERT-large masked language model, 0.34 B parameters, seq 512, batch 32 (H200, kdvfs trace)"),
    "gpt350m": ("h100-lightning-gpt350m-step-kernels.csv", "the Lightning GPT example, 350 M parameters (H100, kdvfs trace)"),
    **{f"gpt1b-stage{i}-of4": (f"h200-gpt1b-stage{i}-of4-kernels.csv",
                               f"stage {i} of 4 of the 1.0 B GPT, one microbatch of 2 x 2048 (H200, kdvfs trace)")
       for i in range(4)},
}


def path(name: str) -> Path:
    """Filesystem path of a shipped data file."""
    return Path(str(resources.files(__name__).joinpath(name)))


@lru_cache(maxsize=None)
def power_step() -> dict:
    """The parsed ``h100-power-step.json``: how NVML's power readings follow a step in power."""
    return json.loads(path(POWER_STEP_JSON).read_text())


@lru_cache(maxsize=None)
def wait_power() -> dict:
    """The parsed ``h100-wait-power.json``: what an H100 draws while it waits."""
    return json.loads(path(WAIT_POWER_JSON).read_text())


@lru_cache(maxsize=None)
def h100_default_clocks() -> dict:
    """The parsed ``h100-default-clocks.json``."""
    return json.loads(path(DEFAULT_CLOCKS_JSON).read_text())


def h100_clock_lists() -> tuple[list[int], list[int]]:
    """(memory clocks, SM clocks) of the measured H100, highest first, in MHz."""
    dev = h100_default_clocks()["device"]
    sm = dev["supported_sm_clocks_MHz"]
    sm_list = list(range(sm["max"], sm["min"] - 1, -sm["step"]))
    assert len(sm_list) == sm["count"], "clock list in h100-default-clocks.json is inconsistent"
    return list(dev["supported_mem_clocks_MHz"]), sm_list
