"""``--kernel-dvfs`` and ``--kernel-dvfs-*`` flags for Megatron's ``extra_args_provider``.

One flag per field of :class:`~kdvfs_plugins.config.KdvfsConfig`, generated from the dataclass, so
a new schema field gets its flag without touching this file. ``--kernel-dvfs`` itself is the
``enabled`` field; ``--kernel-dvfs-plan`` is a short alias of ``--kernel-dvfs-plan-path``;
``--kernel-dvfs-config FILE.json`` reads any subset of the keys from a file (flags win).

Split of the checks: argparse converts each value to the field's type (so ``args`` holds ints,
floats and bools, and a non-number fails at parse time as Megatron's own flags do); ranges,
choices and cross-field rules are checked once, by :meth:`KdvfsConfig.from_dict`, in
:func:`config_from_args`, so the messages are the same as the Lightning and DeepSpeed ones.
Choices are shown in ``--help`` but not enforced by argparse for that reason.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

from kdvfs_plugins import config as _config
from kdvfs_plugins.config import KdvfsConfig
from kdvfs_plugins.errors import ConfigError
from kdvfs_plugins.log import logger

ENABLE_FLAG = "--kernel-dvfs"
CONFIG_FILE_FLAG = "--kernel-dvfs-config"
FLAG_PREFIX = "--kernel-dvfs-"
DEST_PREFIX = "kernel_dvfs_"
FLAGS_SOURCE = "--kernel-dvfs-* flags"

#: Fields without a flag of their own: ``enabled`` is ``--kernel-dvfs``.
_NO_FLAG = frozenset({"enabled"})
#: Extra, shorter spellings (the first spelling is the one shown in messages).
_ALIASES = {"plan_path": ("--kernel-dvfs-plan",)}
#: Choice lists the core exports as constants; shown in --help, checked by the core.
_CHOICES = {
    "mode": _config.MODES,
    "device": _config.DEVICES,
    "granularity": _config.GRANULARITIES,
    "objective": _config.OBJECTIVES,
    "power_readings": _config.POWER_READINGS,
}
#: Value names of the fields typed ``Any`` ("auto" or a number or a bool), for --help and the docs.
_LOOSE_METAVARS = {"module_depth": "{auto,INT}", "progress": "{auto,true,false}"}
#: Help for the flags users reach for first; the others get a generated line.
_HELP = {
    "mode": "observe: measure only; explore: measure clock responses; apply: use a stored plan; "
            "auto: explore, plan, validate, then apply",
    "plan_path": "plan file to read (apply) and write (auto/explore); default <run-dir>/plan.json. "
                 "Give every rank of a tensor-parallel group the same file",
    "max_slowdown": "allowed step slowdown as a fraction (0 = strict waste reduction)",
    "region_clocks": "manual per-region clocks as JSON, e.g. "
                     "'{\"optimizer\": {\"sm_mhz\": 1200, \"mem_mhz\": 2619}}'",
    "device": "auto | nvml (sets clocks) | observe (reads only) | simulated (virtual H100)",
}


def flag_name(field_name: str) -> str:
    """The command-line flag of a config field: ``max_slowdown`` -> ``--kernel-dvfs-max-slowdown``."""
    return FLAG_PREFIX + field_name.replace("_", "-")


def dest_name(field_name: str) -> str:
    """The ``args`` attribute of a config field: ``max_slowdown`` -> ``kernel_dvfs_max_slowdown``."""
    return DEST_PREFIX + field_name


# ---------------------------------------------------------------------- value converters
def _to_bool(text: str) -> bool:
    low = str(text).strip().lower()
    if low in ("true", "1", "yes", "on"):
        return True
    if low in ("false", "0", "no", "off"):
        return False
    raise ValueError(text)


_to_bool.__name__ = "bool (true|false)"  # argparse names the converter in its error message


def _to_json_object(text: str) -> dict:
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError(text)
    return value


_to_json_object.__name__ = "JSON object"


def _to_loose(text: str) -> Any:
    """For fields typed ``Any`` (``"auto"`` or a number or a bool): the closest plain value."""
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    try:
        return int(text)
    except ValueError:
        return text


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    args = typing.get_args(tp)
    if typing.get_origin(tp) is typing.Union and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else Any), True
    return tp, False


def _flag_spec(f: dataclasses.Field, tp: Any) -> dict:
    """argparse keyword arguments for one config field, derived from its type, name and default."""
    base, optional = _unwrap_optional(tp)
    origin = typing.get_origin(base) or base
    choices = _CHOICES.get(f.name)
    kw: dict[str, Any] = {"default": None, "dest": dest_name(f.name)}
    if base is bool:
        # A bare flag means true; ``--kernel-dvfs-sim-noise false`` turns it off.
        kw.update(type=_to_bool, nargs="?", const=True, metavar="{true,false}")
    elif base is int:
        kw.update(type=int, metavar=_unit_metavar(f.name, "INT"))
    elif base is float:
        kw.update(type=float, metavar=_unit_metavar(f.name, "FLOAT"))
    elif isinstance(origin, type) and issubclass(origin, Mapping):
        kw.update(type=_to_json_object, metavar="JSON")
    elif base is str:
        kw.update(type=str, metavar="{" + ",".join(choices) + "}" if choices else _unit_metavar(f.name, "STR"))
    else:
        kw.update(type=_to_loose, metavar=_LOOSE_METAVARS.get(f.name, "VALUE"))
    default = f.default if f.default is not dataclasses.MISSING else None
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        default = "per-user state directory" if f.name == "state_dir" else f.default_factory()  # type: ignore[misc]
    text = _HELP.get(f.name, f"kdvfs config key '{f.name}'")
    shown = "none" if default is None else json.dumps(default) if isinstance(default, (dict, bool)) else default
    kw["help"] = f"{text} (default: {shown})"
    return kw


def _unit_metavar(name: str, fallback: str) -> str:
    for suffix, metavar in (("_mhz", "MHZ"), ("_ms", "MS"), ("_steps", "STEPS"), ("_path", "PATH"), ("_dir", "DIR"),
                            ("_socket", "PATH")):
        if name.endswith(suffix):
            return metavar
    return fallback


def _config_fields() -> list[tuple[dataclasses.Field, Any]]:
    hints = typing.get_type_hints(KdvfsConfig, vars(_config))
    return [(f, hints[f.name]) for f in dataclasses.fields(KdvfsConfig) if f.name not in _NO_FLAG]


# ---------------------------------------------------------------------- provider
def add_kernel_dvfs_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Megatron ``extra_args_provider``: adds the kdvfs flags and returns the parser.

    ``pretrain(..., extra_args_provider=add_kernel_dvfs_args)`` (Megatron-core <= 0.17) or
    ``parse_and_validate_args(extra_args_provider=add_kernel_dvfs_args)`` (>= 0.18).
    """
    group = parser.add_argument_group("kernel-dvfs", "kdvfs: per-region GPU clock control (see docs/megatron.md)")
    group.add_argument(ENABLE_FLAG, action="store_true", default=False, dest="kernel_dvfs",
                       help="enable kdvfs; without it every --kernel-dvfs-* flag is ignored")
    group.add_argument(CONFIG_FILE_FLAG, default=None, dest=dest_name("config"), metavar="FILE.json",
                       help="JSON object of kdvfs config keys (as in the DeepSpeed 'kernel_dvfs' block); "
                            "--kernel-dvfs-* flags override it")
    for f, tp in _config_fields():
        # A short alias goes first so that usage lines and messages show it.
        group.add_argument(*_ALIASES.get(f.name, ()), flag_name(f.name), **_flag_spec(f, tp))
    return parser


def flags_table():
    """The flags as the parser defines them, one row each: the flag (and its aliases), its value,
    its default and the schema key. docs/megatron.md shows this table (``python
    scripts/megatron_flags.py`` prints it; ``scripts/build_docs.py`` checks that it matches)."""
    from kdvfs_plugins.tables import Table

    group = next(g for g in add_kernel_dvfs_args(argparse.ArgumentParser()).\
                 _action_groups if g.title == "kernel-dvfs")  # noqa: SLF001 - argparse keeps groups there
    rows = []
    for action in group._group_actions:  # noqa: SLF001
        flags = sorted(action.option_strings, key=lambda f: (f != flag_name(action.dest[len(DEST_PREFIX):]), f))
        shown = f"`{flags[0]}`" + (f" (also {', '.join(f'`{f}`' for f in flags[1:])})" if flags[1:] else "")
        if action.dest == "kernel_dvfs":
            value, key, default = "(switch)", "`enabled`", "off"
        elif action.dest == dest_name("config"):
            value, key, default = "FILE.json", "any subset of the keys (a JSON object, or a DeepSpeed config with a " \
                                               "`kernel_dvfs` block); flags override the file", "none"
        else:
            name = action.dest[len(DEST_PREFIX):]
            metavar = str(action.metavar or "")
            value = ", ".join(metavar.strip("{}").split(",")) if metavar.startswith("{") else metavar
            if action.nargs == "?":
                value += " (bare flag: true)"
            key = f"`{name}`"
            default = str(action.help).rpartition("(default: ")[2].rstrip(")")
        rows.append([shown, value, default, key])
    return Table(["Flag", "Value", "Default", "Schema key"], rows, align="llll")


def chain_providers(*providers: Optional[Callable]) -> Callable[[argparse.ArgumentParser], argparse.ArgumentParser]:
    """One ``extra_args_provider`` calling several in order (None entries are skipped).

    Megatron takes a single provider; ``pretrain_gpt.py`` already passes ``add_modelopt_args``:
    ``extra_args_provider=chain_providers(add_modelopt_args, add_kernel_dvfs_args)``.
    """
    chosen = [p for p in providers if p is not None]

    def provider(parser):
        for p in chosen:
            result = p(parser)
            parser = parser if result is None else result  # Megatron's providers return the parser
        return parser

    provider.__name__ = "chain_providers(" + ", ".join(getattr(p, "__name__", repr(p)) for p in chosen) + ")"
    return provider


# ---------------------------------------------------------------------- args -> config
def config_from_args(args: Any) -> Optional[KdvfsConfig]:
    """The validated config from parsed flags, or None when ``--kernel-dvfs`` is absent.

    Raises :class:`~kdvfs_plugins.errors.ConfigError` (source ``--kernel-dvfs-* flags``, or the
    config file) naming the flag, the value and what is allowed.
    """
    flag_values = {f.name: getattr(args, dest_name(f.name), None) for f, _ in _config_fields()}
    given = {k: v for k, v in flag_values.items() if v is not None}
    if not getattr(args, "kernel_dvfs", False):
        if given or getattr(args, dest_name("config"), None):
            logger.warning("--kernel-dvfs-* flags given without --kernel-dvfs: kdvfs stays off. "
                           "Add --kernel-dvfs to enable it.")
        return None
    path = getattr(args, dest_name("config"), None)
    from_file = _read_config_file(path) if path else {}
    raw: dict[str, Any] = {**from_file, **given}
    raw.setdefault("enabled", True)
    _check_clock_pair(raw, given, path)
    try:
        return KdvfsConfig.from_dict(raw, source=FLAGS_SOURCE)
    except ConfigError as exc:
        root = exc.key.partition("[")[0]
        if root in from_file and root not in given:
            raise ConfigError(exc.key, exc.value, exc.allowed, f"{CONFIG_FILE_FLAG} {path}") from None
        if root in flag_values:  # name the flag the user types, not the schema key
            raise ConfigError(flag_name(root) + exc.key[len(root):], exc.value, exc.allowed, FLAGS_SOURCE) from None
        raise


def _check_clock_pair(raw: Mapping[str, Any], given: Mapping[str, Any], path: Optional[str]) -> None:
    """Fixed clocks need both flags: say so in flag terms (the schema's own message speaks of keys)."""
    set_keys = [k for k in ("sm_mhz", "mem_mhz") if raw.get(k) is not None]
    if len(set_keys) != 1:
        return
    key = set_keys[0]
    source = FLAGS_SOURCE if key in given else f"{CONFIG_FILE_FLAG} {path}"
    raise ConfigError(flag_name(key) if key in given else key, raw[key],
                      f"give both {flag_name('sm_mhz')} and {flag_name('mem_mhz')} (fixed clocks for the whole "
                      "step), or neither", source)


def _read_config_file(path: str) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(CONFIG_FILE_FLAG, path, f"the file cannot be read ({exc.strerror}); give an existing JSON file",
                          FLAGS_SOURCE) from None
    except json.JSONDecodeError as exc:
        raise ConfigError(CONFIG_FILE_FLAG, path, f"the file is not valid JSON ({exc}); fix it", FLAGS_SOURCE) from None
    # A DeepSpeed config file carries the same keys in its top-level "kernel_dvfs" block.
    if isinstance(data, dict) and isinstance(data.get("kernel_dvfs"), dict):
        data = data["kernel_dvfs"]
    if not isinstance(data, dict):
        raise ConfigError(CONFIG_FILE_FLAG, path, "the file must hold a JSON object of kdvfs config keys", FLAGS_SOURCE)
    return data
