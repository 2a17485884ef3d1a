"""The service's configuration file (TOML, or JSON when the name ends in ``.json``).

::

    socket_path = "/run/kdvfsd.sock"
    socket_mode = "0660"          # octal string or integer
    socket_group = "kdvfs"        # group that owns the socket (optional)
    audit_log = "/var/log/kdvfsd/audit.log"
    state_dir = "/run/kdvfsd"     # claim records: survive a crash of the daemon itself

    [rate_limit]
    requests_per_s = 1000
    burst = 2000

    [limits]
    connections_per_user = 64     # open connections per listed uid (unlisted uids: 2)
    connections = 1000            # open connections in all (also bounded by the file limit)

    [restore_clocks]              # GPU -> [SM, memory] MHz to restore to instead of unlocking
    "*" = [1410, 1593]            # (a site that keeps its GPUs locked; NVML cannot read a lock back)

    [users]                       # user name or uid -> GPUs (index, UUID, or "*")
    alice = ["*"]
    "1001" = [0, 1]

    [groups]                      # group name or gid -> GPUs
    mlteam = ["GPU-8f6c1a3e-..."]

Nobody is allowed implicitly, not even root: a uid is served only if it, or one of its groups,
is listed.
"""
from __future__ import annotations

import grp
import json
import pwd
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Union

from .protocol import DEFAULT_SOCKET_PATH

GpuSelector = Union[int, str]  # an NVML index, a UUID (or its prefix), or "*"
ALL_GPUS = "*"

DEFAULT_CONFIG_PATH = "/etc/kdvfsd.toml"
_KEYS = {"socket_path", "socket_mode", "socket_group", "audit_log", "state_dir", "rate_limit", "limits",
         "restore_clocks", "users", "groups"}


class ServiceConfigError(ValueError):
    """The service's configuration file is wrong; the message names the key and what is allowed."""

    def __init__(self, source: str, key: str, problem: str):
        super().__init__(f"{source}: {key}: {problem}")


@dataclass(frozen=True)
class RateLimit:
    """A token bucket per client connection: ``burst`` requests at once, ``requests_per_s`` sustained."""

    requests_per_s: float = 1000.0
    burst: int = 2000


@dataclass(frozen=True)
class Limits:
    """How many connections the service keeps open: per listed uid, and in all."""

    connections_per_user: int = 64
    connections: int = 1000


#: An unlisted uid only needs to learn that it is not listed.
UNLISTED_CONNECTIONS_PER_USER = 2


@dataclass(frozen=True)
class ServiceConfig:
    socket_path: str = DEFAULT_SOCKET_PATH
    socket_mode: int = 0o660
    socket_group: str | None = None
    audit_log: str | None = "/var/log/kdvfsd/audit.log"
    state_dir: str | None = "/run/kdvfsd"
    rate_limit: RateLimit = RateLimit()
    limits: Limits = Limits()
    #: GPU selector -> (SM, memory) MHz a restore locks instead of unlocking
    restore_clocks: Mapping[GpuSelector, tuple[int, int]] = field(default_factory=dict)
    #: uid -> GPU selectors
    users: Mapping[int, tuple[GpuSelector, ...]] = field(default_factory=dict)
    #: gid -> GPU selectors
    groups: Mapping[int, tuple[GpuSelector, ...]] = field(default_factory=dict)
    source: str = "<defaults>"


def _is_number(name) -> bool:
    return str(name).isascii() and str(name).isdigit()


def _uid(name: str, source: str) -> int:
    if _is_number(name):
        return int(name)
    try:
        return pwd.getpwnam(name).pw_uid
    except (KeyError, ValueError):  # ValueError: a name no account can have (a NUL in it)
        raise ServiceConfigError(source, f"users.{name}", "no such user on this machine; use a user name or a uid") from None


def _gid(name: str, source: str) -> int:
    if _is_number(name):
        return int(name)
    try:
        return grp.getgrnam(name).gr_gid
    except (KeyError, ValueError):  # ValueError: a name no account can have (a NUL in it)
        raise ServiceConfigError(source, f"groups.{name}", "no such group on this machine; use a group name or a gid") from None


def _selectors(value, key: str, source: str) -> tuple[GpuSelector, ...]:
    if isinstance(value, (str, int)):
        value = [value]
    if not isinstance(value, list) or not value:
        raise ServiceConfigError(source, key, 'a list of GPUs: NVML indices, UUIDs, or "*" for all')
    out = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, (int, str)) or (isinstance(v, int) and v < 0):
            raise ServiceConfigError(source, key, f'{v!r} is not a GPU: use an NVML index, a UUID, or "*"')
        out.append(v)
    return tuple(out)


def config_from_dict(d: Mapping, source: str = "<dict>") -> ServiceConfig:
    if not isinstance(d, Mapping):
        raise ServiceConfigError(source, "file", "the top level must be a table of keys (see examples/kdvfsd.toml)")
    unknown = set(d) - _KEYS
    if unknown:
        raise ServiceConfigError(source, ", ".join(sorted(unknown)), f"unknown key; allowed: {', '.join(sorted(_KEYS))}")
    mode = d.get("socket_mode", 0o660)
    if isinstance(mode, str):
        try:
            mode = int(mode, 8)
        except ValueError:
            raise ServiceConfigError(source, "socket_mode", f"{mode!r} is not an octal mode such as \"0660\"") from None
    if not isinstance(mode, int) or not 0 <= mode <= 0o777:
        raise ServiceConfigError(source, "socket_mode", "an octal permission such as \"0660\"")
    if mode & 0o002:
        # Anyone could connect; the allow lists would still hold, but say so loudly.
        raise ServiceConfigError(source, "socket_mode", "must not be writable by others; use 0660 with socket_group")
    rl = d.get("rate_limit", {})
    if not isinstance(rl, Mapping) or set(rl) - {"requests_per_s", "burst"}:
        raise ServiceConfigError(source, "rate_limit", "a table with requests_per_s and burst")
    rate = RateLimit(float(_num(rl, "requests_per_s", RateLimit.requests_per_s, source, "rate_limit", 1e-3, 1e9)),
                     int(_num(rl, "burst", RateLimit.burst, source, "rate_limit", 1, 1e9, integer=True)))
    lim = d.get("limits", {})
    if not isinstance(lim, Mapping) or set(lim) - {"connections_per_user", "connections"}:
        raise ServiceConfigError(source, "limits", "a table with connections_per_user and connections")
    limits = Limits(int(_num(lim, "connections_per_user", Limits.connections_per_user, source, "limits", 1, 1e6, integer=True)),
                    int(_num(lim, "connections", Limits.connections, source, "limits", 1, 1e6, integer=True)))
    restore_in = d.get("restore_clocks", {})
    if not isinstance(restore_in, Mapping):
        raise ServiceConfigError(source, "restore_clocks", 'a table of GPU -> [SM MHz, memory MHz], e.g. "*" = [1410, 1593]')
    restore = {}
    for k, v in restore_in.items():
        key = f"restore_clocks.{k}"
        sel = _selectors(int(k) if _is_number(k) else k, key, source)[0]
        if (not isinstance(v, list) or len(v) != 2
                or not all(type(x) is int and 0 < x < 100_000 for x in v)):
            raise ServiceConfigError(source, key, f"{v!r} is not [SM MHz, memory MHz] in whole MHz, e.g. [1410, 1593]")
        restore[sel] = (v[0], v[1])
    for key in ("socket_path", "audit_log", "state_dir", "socket_group"):
        v = d.get(key)
        if v is not None and (not isinstance(v, (str, int)) or isinstance(v, bool) or str(v) == ""):
            raise ServiceConfigError(source, key, f"{v!r} is not a {'group' if key == 'socket_group' else 'path'}")
    users_in, groups_in = d.get("users", {}), d.get("groups", {})
    if not isinstance(users_in, Mapping) or not isinstance(groups_in, Mapping):
        raise ServiceConfigError(source, "users/groups", "tables of name -> list of GPUs")
    users = {_uid(str(k), source): _selectors(v, f"users.{k}", source) for k, v in users_in.items()}
    groups = {_gid(str(k), source): _selectors(v, f"groups.{k}", source) for k, v in groups_in.items()}
    group = d.get("socket_group")
    if group is not None:
        _gid(str(group), source)
    return ServiceConfig(
        socket_path=str(d.get("socket_path", DEFAULT_SOCKET_PATH)), socket_mode=mode,
        socket_group=None if group is None else str(group),
        audit_log=d.get("audit_log", ServiceConfig.audit_log), state_dir=d.get("state_dir", ServiceConfig.state_dir),
        rate_limit=rate, limits=limits, restore_clocks=restore, users=users, groups=groups, source=source,
    )


def _num(table: Mapping, name: str, default, source: str, where: str, lo: float, hi: float, *, integer: bool = False):
    v = table.get(name, default)
    ok = (not isinstance(v, bool) and isinstance(v, (int, float)) and lo <= v <= hi
          and (not integer or float(v).is_integer()))
    if not ok:
        kind = "a whole number" if integer else "a number"
        raise ServiceConfigError(source, f"{where}.{name}", f"{v!r} is not {kind} from {lo:g} to {hi:g}")
    return v


def load_config(path: str | Path) -> ServiceConfig:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ServiceConfigError(str(path), "file", f"cannot read it ({exc}); see examples/kdvfsd.toml") from None
    try:
        if path.suffix == ".json":
            data = json.loads(text)
        else:
            try:
                import tomllib
            except ImportError:  # Python 3.10
                raise ServiceConfigError(str(path), "file", "TOML needs Python 3.11; write the config as .json") from None
            data = tomllib.loads(text)
    except (ValueError, RecursionError) as exc:  # RecursionError: nested too deep for either parser
        raise ServiceConfigError(str(path), "syntax", f"{type(exc).__name__}: {str(exc)[:200]}") from None
    return config_from_dict(data, str(path))
