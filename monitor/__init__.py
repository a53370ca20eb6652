"""sae-monitor: safety monitoring for language models with sparse autoencoders.

Data flows one way: engine hook (:mod:`monitor.capture`, :mod:`monitor.runtime`) -> SAE and
probe encode (:mod:`monitor.runtime.encoder`) -> pure policy engine (:mod:`monitor.policy`) ->
decisions (:mod:`monitor.report`) -> actions (:mod:`monitor.audit`, :mod:`monitor.metrics`,
:mod:`monitor.logs`, block, steer).

Public names are imported lazily (PEP 562), so ``import monitor`` and tools that need only
policies (``sae-monitor policy check``) do not pay for torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from monitor.errors import (
    Blocked,
    CatalogError,
    DataError,
    ModelLoadError,
    MonitorError,
    MonitorUnavailable,
    PolicyError,
    SAEFormatError,
    SAEMismatchError,
    UnsupportedModelError,
)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sae-monitor")
    except PackageNotFoundError:  # a source checkout that is not installed
        return "0+unknown"


__version__ = _version()

_LAZY = {
    "HookPoint": "monitor.capture",
    "capture": "monitor.capture",
    "find_blocks": "monitor.capture",
    "residual_hook": "monitor.capture",
    "load_default_model": "monitor.models",
    "load_model": "monitor.models",
    "SAE": "monitor.sae",
    "SAEConfig": "monitor.sae",
    "load_sae": "monitor.sae",
    "check_fit": "monitor.runtime.fit",
    "Catalog": "monitor.catalog",
    "load_catalog": "monitor.catalog",
    "CompiledPolicy": "monitor.policy",
    "PolicyStore": "monitor.policy",
    "compile_policies": "monitor.policy",
    "load_policies": "monitor.policy",
    "Report": "monitor.report",
    "BlockInfo": "monitor.report",
    "Session": "monitor.runtime.session",
    "FeatureEncoder": "monitor.runtime.encoder",
    "Monitor": "monitor.runtime.hf",
    "ScanItem": "monitor.runtime.scan",
    "MonitoredPipeline": "monitor.runtime.wrap",
    "from_default": "monitor.runtime.wrap",
    "wrap": "monitor.runtime.wrap",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:  # a submodule, as ``import monitor; monitor.catalog`` used to allow
        try:
            return importlib.import_module(f"monitor.{name}")
        except ModuleNotFoundError:
            raise AttributeError(f"module 'monitor' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


if TYPE_CHECKING:
    from monitor.capture import HookPoint, capture, find_blocks, residual_hook
    from monitor.catalog import Catalog, load_catalog
    from monitor.models import load_default_model, load_model
    from monitor.policy import CompiledPolicy, PolicyStore, compile_policies, load_policies
    from monitor.report import BlockInfo, Report
    from monitor.runtime.encoder import FeatureEncoder
    from monitor.runtime.fit import check_fit
    from monitor.runtime.hf import Monitor
    from monitor.runtime.scan import ScanItem
    from monitor.runtime.session import Session
    from monitor.runtime.wrap import MonitoredPipeline, from_default, wrap
    from monitor.sae import SAE, SAEConfig, load_sae

__all__ = [
    "__version__", "MonitorError", "CatalogError", "DataError", "ModelLoadError", "PolicyError",
    "SAEFormatError", "SAEMismatchError", "UnsupportedModelError", "Blocked", "MonitorUnavailable",
    *_LAZY,
]
