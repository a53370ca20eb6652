"""``python -m monitor.demo``: kept until the Makefile's ``demo`` target calls ``sae-monitor
demo`` (:mod:`monitor.cli.demo`); delete this file then."""

from __future__ import annotations

import sys

from monitor.cli import main

if __name__ == "__main__":
    sys.exit(main(["demo"]))
