"""Read the top-level ``"kernel_dvfs"`` block of a DeepSpeed config into a :class:`KdvfsConfig`.

DeepSpeed accepts unknown top-level keys silently, so the block rides along in the user's own
config file; keys inside DeepSpeed's own sections would be rejected by its pydantic models.
The block is validated here, before ``deepspeed.initialize`` builds the engine, so a typo
costs seconds, not a model load.
"""
from __future__ import annotations

import base64
import os
from typing import Any, Mapping, Optional

from kdvfs_plugins.config import KdvfsConfig
from kdvfs_plugins.errors import ConfigError

#: The top-level key of the DeepSpeed config that holds the kdvfs settings.
BLOCK_KEY = "kernel_dvfs"
SOURCE = "DeepSpeed 'kernel_dvfs' block"


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

    Raises :class:`ConfigError` naming the key, the value and what is allowed.
    """
    block = (ds_config or {}).get(BLOCK_KEY)
    if block is None:
        return KdvfsConfig.from_dict({}, source=SOURCE)
    if not isinstance(block, Mapping):
        raise ConfigError(BLOCK_KEY, block, 'allowed: a JSON object, e.g. "kernel_dvfs": {"mode": "observe"}',
                          "DeepSpeed config")
    return KdvfsConfig.from_dict(block, source=SOURCE)


def as_kdvfs_config(config: Any) -> KdvfsConfig:
    """A :class:`KdvfsConfig` from a KdvfsConfig, a ``kernel_dvfs`` block dict, or a whole
    DeepSpeed config (dict or path) that contains one."""
    if isinstance(config, KdvfsConfig):
        return config
    if isinstance(config, Mapping) and BLOCK_KEY not in config:
        return KdvfsConfig.from_dict(config, source=SOURCE)
    loaded = load_deepspeed_config(config)
    if loaded is None:
        raise ConfigError("config", config, "allowed: a KdvfsConfig, a 'kernel_dvfs' block (dict), or a DeepSpeed "
                          "config dict or JSON path", "kdvfs_deepspeed.attach")
    return config_from_deepspeed(loaded)
