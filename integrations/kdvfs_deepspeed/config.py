"""Read the top-level ``"kernel_dvfs"`` block of a DeepSpeed config into a :class:`KdvfsConfig`.

DeepSpeed accepts unknown top-level keys silently, so the block rides along in the user's own
config file; keys inside DeepSpeed's own sections would be rejected by its pydantic models.
The block is validated here, before ``deepspeed.initialize`` builds the engine, so a typo
costs seconds, not a model load.
"""
from __future__ import annotations

import base64
import difflib
import os
import re
from typing import Any, Mapping, Optional

from kdvfs_plugins.config import KdvfsConfig
from kdvfs_plugins.errors import ConfigError

#: The top-level key of the DeepSpeed config that holds the kdvfs settings.
BLOCK_KEY = "kernel_dvfs"
SOURCE = "DeepSpeed 'kernel_dvfs' block"
#: How alike (difflib ratio, after dropping case and separators) a top-level key must be to
#: ``kernel_dvfs`` to count as a misspelling of it. DeepSpeed's own keys score below 0.5.
NEAR_MISS_RATIO = 0.8


def _squashed(key: str) -> str:
    return re.sub(r"[^a-z0-9]", "", key.lower())


def near_miss_keys(ds_config: Mapping[str, Any]) -> list[str]:
    """Top-level keys that look like a misspelt ``kernel_dvfs`` (``kernel_dvfs_``, ``kernelDVFS``,
    ``kernel-dvfs``, ``kernel_dvsf``, ``kdvfs``...).

    DeepSpeed accepts unknown top-level keys silently, so without this check a misspelt block
    would be ignored and kdvfs would run with its defaults (mode auto: clocks change where
    writes are permitted).
    """
    target = _squashed(BLOCK_KEY)
    out = []
    for key in ds_config:
        if not isinstance(key, str) or key == BLOCK_KEY:
            continue
        squashed = _squashed(key)
        if squashed in (target, "kdvfs") or difflib.SequenceMatcher(None, squashed, target).ratio() >= NEAR_MISS_RATIO:
            out.append(key)
    return out


def _check_block_name(ds_config: Mapping[str, Any]) -> None:
    """Raise the did-you-mean error a misspelt key inside the block gets, for the block's own name."""
    for key in near_miss_keys(ds_config):
        raise ConfigError(key, ds_config[key], f"unknown top-level key; did you mean '{BLOCK_KEY}'? (DeepSpeed "
                          "ignores unknown top-level keys: kdvfs would not read this block)",
                          "DeepSpeed config")


def load_deepspeed_config(config: Any) -> Optional[dict]:
    """The DeepSpeed config as a dict, from what ``deepspeed.initialize`` accepts.

    A dict is returned as is; a path to a JSON/HJSON file is read; a base64 string is decoded.
    Returns None when ``config`` is none of these, leaving DeepSpeed to report the problem.
    """
    if config is None:
        return None
    if isinstance(config, Mapping):
        return dict(config)
    import hjson  # a DeepSpeed dependency; it reads plain JSON as well

    if isinstance(config, (str, os.PathLike)) and os.path.exists(config):
        with open(config, "r") as f:
            return dict(hjson.load(f))
    if isinstance(config, str):
        try:
            return dict(hjson.loads(base64.urlsafe_b64decode(config).decode("utf-8")))
        except (ValueError, UnicodeDecodeError, TypeError):
            return None
    return None


def config_from_deepspeed(ds_config: Optional[Mapping[str, Any]]) -> KdvfsConfig:
    """Validate the ``kernel_dvfs`` block of a DeepSpeed config dict (defaults if it has none).

    Raises :class:`ConfigError` naming the key, the value and what is allowed, also for a
    top-level key that looks like a misspelt ``kernel_dvfs`` (see :func:`near_miss_keys`).
    """
    ds_config = ds_config or {}
    _check_block_name(ds_config)
    block = ds_config.get(BLOCK_KEY)
    if block is None:
        return KdvfsConfig.from_dict({}, source=SOURCE)
    if not isinstance(block, Mapping):
        raise ConfigError(BLOCK_KEY, block, 'allowed: a JSON object, e.g. "kernel_dvfs": {"mode": "observe"}',
                          "DeepSpeed config")
    cfg = KdvfsConfig.from_dict(block, source=SOURCE)
    cfg.check_plan_file(SOURCE)  # before DeepSpeed builds the engine
    return cfg


def as_kdvfs_config(config: Any) -> KdvfsConfig:
    """A :class:`KdvfsConfig` from a KdvfsConfig, a ``kernel_dvfs`` block dict, or a whole
    DeepSpeed config (dict or path) that contains one."""
    if isinstance(config, KdvfsConfig):
        return config
    if isinstance(config, Mapping) and BLOCK_KEY not in config and not near_miss_keys(config):
        return KdvfsConfig.from_dict(config, source=SOURCE)
    loaded = load_deepspeed_config(config)
    if loaded is None:
        raise ConfigError("config", config, "allowed: a KdvfsConfig, a 'kernel_dvfs' block (dict), or a DeepSpeed "
                          "config dict or JSON path", "kdvfs_deepspeed.attach")
    return config_from_deepspeed(loaded)
