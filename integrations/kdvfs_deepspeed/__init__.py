"""DeepSpeed adapter: a top-level ``"kernel_dvfs": {...}`` block in the DeepSpeed config, and

    engine, optimizer, loader, scheduler = kdvfs_deepspeed.initialize(model=..., config=ds_config)
    ...
    kdvfs_deepspeed.close(engine)   # restores the clocks; also done at interpreter exit

or ``kdvfs_deepspeed.attach(engine)`` after your own ``deepspeed.initialize``.
"""
from .adapter import DeepSpeedAdapter, PIPE_GROUPS, PIPE_PHASES, adapter_of, attach, close, detach
from .config import BLOCK_KEY, config_from_deepspeed, load_deepspeed_config
from .initialize import initialize

__all__ = [
    "BLOCK_KEY", "DeepSpeedAdapter", "PIPE_GROUPS", "PIPE_PHASES", "adapter_of", "attach", "close",
    "config_from_deepspeed", "detach", "initialize", "load_deepspeed_config",
]
