"""The ``kdvfs`` command. Each subcommand lives in :mod:`kdvfs_plugins.commands` as a module with
``add_arguments(parser)`` and ``run(args) -> int``; it is imported only when used, so
``kdvfs info`` stays fast and needs no training framework."""
from __future__ import annotations

import argparse
import importlib
import re
import sys
from typing import Sequence

from .errors import KdvfsError

#: name -> (module, one-line help)
COMMANDS = {
    "info": ("kdvfs_plugins.commands.info", "GPUs, driver, supported clocks and clock-write permission"),
    "reset": ("kdvfs_plugins.commands.reset", "restore clocks that a crashed run left locked"),
    "demo": ("kdvfs_plugins.commands.demo", "plan and compare clocks on the shipped GPT trace (simulated GPU)"),
    "simulate": ("kdvfs_plugins.commands.simulate", "run a kernel trace on the virtual GPU"),
    "trace": ("kdvfs_plugins.commands.trace", "record a training step's kernels, tagged by region, to CSV"),
    "latency": ("kdvfs_plugins.commands.latency", "measure the clock switch latency of a device"),
    "report": ("kdvfs_plugins.commands.report", "write an HTML report of a run directory"),
}


#: A message that names a kdvfs command itself ("kdvfs report: ...", "kdvfs trace: ..."): the line
#: names the command that ran, once.
_OWN_PREFIX = re.compile(r"^kdvfs(?: [a-z-]+)?: ")


def error_line(command: str, exc: BaseException) -> str:
    """``kdvfs <command>: <message>``, with the program named once (an error raised with a
    ``kdvfs ...`` source, by this command or by a part it borrows, loses that source)."""
    return f"kdvfs {command}: {_OWN_PREFIX.sub('', str(exc), count=1)}"


def _available() -> dict:
    out = {}
    for name, (module, help_text) in COMMANDS.items():
        if importlib.util.find_spec(module) is not None:
            out[name] = (module, help_text)
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kdvfs", description="Kernel-level GPU clock control for training.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (module, help_text) in _available().items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # The command owns its process: it, and not the library, decides where kdvfs's log lines go.
    from .log import setup_cli_logging

    setup_cli_logging()
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except KdvfsError as exc:
        print(error_line(args.command, exc), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
