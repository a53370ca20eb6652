"""Deprecated import path: the transformers adapter lives in :mod:`monitor.runtime`.

``from monitor.wrapper import Monitor, wrap`` keeps working for one release, with a
``DeprecationWarning``; import from :mod:`monitor` (``monitor.Monitor``, ``monitor.wrap``)
instead.
"""

from __future__ import annotations

import warnings
from typing import Any

_MOVED = {
    "Monitor": "monitor.runtime.hf",
    "MonitoredPipeline": "monitor.runtime.wrap",
    "wrap": "monitor.runtime.wrap",
    "from_default": "monitor.runtime.wrap",
    "Report": "monitor.report",
    "BlockInfo": "monitor.report",
    "Outcome": "monitor.report",
    "Blocked": "monitor.errors",
    "MonitorUnavailable": "monitor.errors",
    "shipped_policies_dir": "monitor.shipped",
    "SHIPPED_CATALOG": "monitor.shipped",
    "REPO_POLICIES": "monitor.shipped",
    "INSTALLED_POLICIES": "monitor.shipped",
}


def __getattr__(name: str) -> Any:
    module = _MOVED.get(name)
    if module is None:
        raise AttributeError(f"module 'monitor.wrapper' has no attribute {name!r}")
    warnings.warn(f"monitor.wrapper.{name} moved to {module}.{name}; monitor.wrapper goes away in the "
                  "next release", DeprecationWarning, stacklevel=2)
    import importlib

    return getattr(importlib.import_module(module), name)
