"""Measured H100 data shipped with kdvfs (copied unchanged from the project's measurements)."""
from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from pathlib import Path

DEFAULT_CLOCKS_JSON = "h100-default-clocks.json"
GPT1B_TRACE_CSV = "h100-gpt1b-step-kernels.csv"


def path(name: str) -> Path:
    """Filesystem path of a shipped data file."""
    return Path(str(resources.files(__name__).joinpath(name)))


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
