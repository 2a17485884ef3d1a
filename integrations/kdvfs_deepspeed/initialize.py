"""``kdvfs_deepspeed.initialize``: ``deepspeed.initialize`` with the ``kernel_dvfs`` block honoured."""
from __future__ import annotations

import inspect
from typing import Any, Iterable

from kdvfs_plugins.log import logger

from .adapter import attach
from .config import config_from_deepspeed, load_deepspeed_config


def _config_argument(bound: inspect.BoundArguments) -> Any:
    """The DeepSpeed config the call passes, in DeepSpeed's order of precedence."""
    a = bound.arguments
    args = a.get("args")
    from_args = getattr(args, "deepspeed_config", None) or getattr(args, "deepscale_config", None)
    return from_args or a.get("config") or a.get("config_params")


def initialize(*args: Any, plugins: Iterable[object] = (), **kwargs: Any):
    """Same arguments and return value as ``deepspeed.initialize``; also starts kdvfs.

    The ``kernel_dvfs`` block is read from ``config``/``config_params`` (dict, JSON/HJSON path or
    base64 string) or ``args.deepspeed_config`` and validated *before* DeepSpeed builds the
    engine: a bad key or value raises :class:`kdvfs_plugins.ConfigError` naming it.
    ``plugins`` (kdvfs only, not passed to DeepSpeed): extra kdvfs plugin objects.
    Returns ``(engine, optimizer, training_dataloader, lr_scheduler)``.
    """
    import deepspeed

    bound = inspect.signature(deepspeed.initialize).bind_partial(*args, **kwargs)
    ds_config = load_deepspeed_config(_config_argument(bound))
    cfg = config_from_deepspeed(ds_config) if ds_config is not None else None
    result = deepspeed.initialize(*args, **kwargs)
    engine = result[0]
    if cfg is None:
        # The config was something we could not read ahead (DeepSpeed took it anyway): read
        # the block from the engine's parsed config instead, now that it exists.
        logger.debug("reading the 'kernel_dvfs' block from the initialised engine")
    try:
        attach(engine, cfg, plugins=plugins)
    except BaseException:
        # DeepSpeed is up but kdvfs is not: leave no half-attached engine behind.
        from .adapter import close

        close(engine)
        raise
    return result
