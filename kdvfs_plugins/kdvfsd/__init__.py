"""kdvfsd: a small clock service that lets users without root set GPU clocks.

It runs as root, owns the clocks of the GPUs it is given, and hands each job exactly the GPUs
its user or group is allowed: one writing session per GPU, restored the moment the session's
connection closes or its process dies (see ``docs/kdvfsd.md``).

- :mod:`.protocol`: newline-delimited JSON messages, kept tiny.
- :mod:`.config`: the service's configuration file (TOML or JSON).
- :mod:`.server`: the daemon (stdlib only, plus ``pynvml``); console script ``kdvfsd``.
- :mod:`.client`: :class:`KdvfsdClient`, one persistent connection per client.
- :mod:`.errors`: typed errors the client raises (subclasses of :mod:`kdvfs_plugins.errors`).
"""
from .client import KdvfsdClient, ServiceHello
from .errors import RateLimitedError, ServiceError, ServiceGpuBusyError, ServiceNotAllowedError, ServiceNotRunningError

__all__ = [
    "KdvfsdClient", "ServiceHello", "ServiceError", "ServiceNotAllowedError", "ServiceGpuBusyError",
    "ServiceNotRunningError", "RateLimitedError",
]
