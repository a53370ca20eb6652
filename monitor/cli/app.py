"""The ``sae-monitor`` parser, assembled from the command modules, and :func:`main`.

Each command module registers its commands with ``add_parser(subparsers, parents)`` (the
convention is in :mod:`monitor.cli`); :data:`COMMAND_MODULES` lists them, in help order.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import TextIO

from monitor.cli.common import Command, build_parents, check_input_paths
from monitor.errors import MonitorError
from monitor.version import __version__

#: Command modules, in the order ``sae-monitor --help`` lists them. One line per module.
COMMAND_MODULES: tuple[str, ...] = (
    "monitor.cli.info",
    "monitor.cli.demo",
    "monitor.cli.research",
    "monitor.cli.serve",
    "monitor.cli.policy",
    "monitor.cli.backtest",
    "monitor.cli.drift",
)

DESCRIPTION = "Safety monitoring for language models with sparse autoencoders."


def build_parser(modules: Sequence[str] = COMMAND_MODULES) -> argparse.ArgumentParser:
    """The top-level parser with every command of ``modules`` registered."""
    parser = argparse.ArgumentParser(prog="sae-monitor", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"sae-monitor {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    parents = build_parents()
    for name in modules:
        importlib.import_module(name).add_parser(subparsers, parents)
    return parser


def main(argv: Sequence[str] | None = None, *, out: TextIO | None = None,
         err: TextIO | None = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``), run the command, return its exit status.

    A :class:`MonitorError` becomes one line on ``err``, ``sae-monitor: error: ...``, and
    status 2, never a traceback; Ctrl-C is status 130. Usage errors and ``--help`` exit
    through argparse (``SystemExit``) as usual.
    """
    out = out or sys.stdout
    err = err or sys.stderr
    parser = build_parser()
    args = parser.parse_args(argv)
    command: Command | None = getattr(args, "func", None)
    if command is None:
        parser.print_help(out)
        return 0
    try:
        check_input_paths(args)
        return command(args, out, err)
    except MonitorError as exc:
        print(f"sae-monitor: error: {exc}", file=err)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
