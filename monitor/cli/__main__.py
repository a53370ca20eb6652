"""``python -m monitor.cli``: the same as the ``sae-monitor`` console script."""

from __future__ import annotations

import sys

from monitor.cli.app import main

sys.exit(main())
