"""The ``sae-monitor`` command line (console script ``monitor.cli:main``).

Layout: :mod:`monitor.cli.app` builds the parser and runs a command; :mod:`monitor.cli.common`
holds the shared parent parsers (``--model``, ``--sae``, ``--catalog``, ``--dtype``, ``--json``,
``--batch-size``, ``--ctx``, ``--limit``, ``--seed``), the input-path check and the command
signature; each other module is one command group.

Adding a command group (the convention):

1. Write ``monitor/cli/<group>.py`` exposing ``add_parser(subparsers, parents) -> None``. It
   calls ``subparsers.add_parser(name, parents=[parents.model, ...], help=...)`` for each
   command, taking shared options from ``parents`` (:class:`~monitor.cli.common.Parents`)
   rather than redefining them, and ``set_defaults(func=cmd_x)``.
2. A command is ``cmd_x(args, out, err) -> int``: parsed arguments, stdout and stderr streams,
   the exit status. It writes only to ``out``/``err`` (tests pass ``io.StringIO``), and raises
   :class:`~monitor.errors.MonitorError` for bad input: ``main`` prints it as one line,
   ``sae-monitor: error: ...``, and exits 2. Options named in
   :data:`~monitor.cli.common.INPUT_PATH_ARGS` (``--data``, ``--catalog``, ...) are checked to
   exist before the command runs.
3. Import torch, transformers and model code inside the command function, never at module
   top: every module is imported to build the parser, for ``--version`` too.
4. Add one line, ``"monitor.cli.<group>",``, to :data:`monitor.cli.app.COMMAND_MODULES`.
"""

from __future__ import annotations

from monitor.cli.app import main

__all__ = ["main"]
