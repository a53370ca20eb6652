"""sae-monitor: safety monitoring for language models with sparse autoencoders.

Data flows one way: model hook (:mod:`monitor.capture`) -> SAE encode (:mod:`monitor.sae`)
-> policy engine (:mod:`monitor.policy`) -> actions (metrics, logs, audit, block, steer).

The public names below are imported on first use (PEP 562 ``__getattr__``), so ``import
monitor`` (and ``sae-monitor --version`` or ``policy check``) does not pay for torch.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from typing import TYPE_CHECKING, Any

from monitor.version import __version__

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    "HookPoint": "monitor.capture",
    "capture": "monitor.capture",
    "find_blocks": "monitor.capture",
    "residual_hook": "monitor.capture",
    "MonitorError": "monitor.errors",
    "CatalogError": "monitor.errors",
    "DataError": "monitor.errors",
    "ModelLoadError": "monitor.errors",
    "PolicyError": "monitor.errors",
    "SAEFormatError": "monitor.errors",
    "SAEMismatchError": "monitor.errors",
    "UnsupportedModelError": "monitor.errors",
    "load_default_model": "monitor.models",
    "load_model": "monitor.models",
    "SAE": "monitor.sae",
    "SAEConfig": "monitor.sae",
    "check_fit": "monitor.sae",
    "load_sae": "monitor.sae",
    "Catalog": "monitor.catalog",
    "load_catalog": "monitor.catalog",
    "CompiledPolicy": "monitor.policy",
    "PolicyStore": "monitor.policy",
    "compile_policies": "monitor.policy",
    "load_policies": "monitor.policy",
    "Blocked": "monitor.wrapper",
    "Monitor": "monitor.wrapper",
    "MonitoredPipeline": "monitor.wrapper",
    "MonitorUnavailable": "monitor.wrapper",
    "Report": "monitor.wrapper",
    "from_default": "monitor.wrapper",
    "wrap": "monitor.wrapper",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is not None:
        value = getattr(importlib.import_module(module), name)
        globals()[name] = value  # later lookups skip __getattr__
        return value
    # A submodule: ``import monitor; monitor.wrapper.X`` worked while this file imported them.
    if not name.startswith("__") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'monitor' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


class _Package(types.ModuleType):
    """Keeps ``monitor.capture`` the function, as the eager imports did: loading the submodule
    ``monitor.capture`` would otherwise bind the package attribute to the module."""

    @property
    def capture(self) -> Any:
        return importlib.import_module("monitor.capture").capture

    @capture.setter
    def capture(self, value: Any) -> None:
        pass  # the import system binding the submodule; the function keeps the name


sys.modules[__name__].__class__ = _Package

if TYPE_CHECKING:  # static type checkers and IDEs see the eager imports
    from monitor.capture import HookPoint, capture, find_blocks, residual_hook
    from monitor.catalog import Catalog, load_catalog
    from monitor.errors import (CatalogError, DataError, ModelLoadError, MonitorError, PolicyError,
                                SAEFormatError, SAEMismatchError, UnsupportedModelError)
    from monitor.models import load_default_model, load_model
    from monitor.policy import CompiledPolicy, PolicyStore, compile_policies, load_policies
    from monitor.sae import SAE, SAEConfig, check_fit, load_sae
    from monitor.wrapper import (Blocked, Monitor, MonitoredPipeline, MonitorUnavailable, Report,
                                 from_default, wrap)
