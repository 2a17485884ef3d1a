"""Subcommands of the ``kdvfs`` command, one module each."""
