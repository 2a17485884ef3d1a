"""Megatron adapter: ``--kernel-dvfs`` flags and a Timers proxy that reports the step's regions.

::

    from kdvfs_megatron import add_kernel_dvfs_args
    import kdvfs_megatron

    args = parse_and_validate_args(extra_args_provider=add_kernel_dvfs_args)   # Megatron >= 0.18
    kdvfs_megatron.install(args)                                               # None without --kernel-dvfs
    pretrain(...)

See ``docs/megatron.md`` for Megatron-core <= 0.17 and for custom megatron-core loops.
"""
from .args import add_kernel_dvfs_args, chain_providers, config_from_args, flag_name
from .install import (
    MegatronKdvfs,
    MegatronSetupError,
    close,
    current,
    detect_ranks,
    install,
    region,
    step_begin,
    step_end,
    uninstall,
)
from .timers import (
    GRADS_REGION, PARAMS_REGION, PIPE_INSTRUCTION_OF_TIMER, PIPELINE_REGION, REGION_OF_TIMER, KdvfsTimers,
)

__all__ = [
    "add_kernel_dvfs_args", "chain_providers", "config_from_args", "flag_name",
    "install", "uninstall", "close", "current", "step_begin", "step_end", "region", "detect_ranks",
    "MegatronKdvfs", "MegatronSetupError", "KdvfsTimers", "REGION_OF_TIMER",
    "PIPELINE_REGION", "GRADS_REGION", "PARAMS_REGION", "PIPE_INSTRUCTION_OF_TIMER",
]
