"""sae-monitor: safety monitoring for language models with sparse autoencoders.

Data flows one way: engine hook (:mod:`monitor.capture`, :mod:`monitor.runtime`) -> SAE and
probe encode (:mod:`monitor.runtime.encoder`) -> pure policy engine (:mod:`monitor.policy`) ->
decisions (:mod:`monitor.report`) -> actions (:mod:`monitor.audit`, :mod:`monitor.metrics`,
:mod:`monitor.logs`, block, steer).

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
    "check_fit": "monitor.runtime.fit",
    "load_sae": "monitor.sae",
    "Catalog": "monitor.catalog",
    "load_catalog": "monitor.catalog",
    "CompiledPolicy": "monitor.policy",
    "PolicyStore": "monitor.policy",
    "compile_policies": "monitor.policy",
    "load_policies": "monitor.policy",
    "Blocked": "monitor.errors",
    "MonitorUnavailable": "monitor.errors",
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

if TYPE_CHECKING:  # static type checkers and IDEs see the eager imports (``X as X``: re-exported)
    from monitor.capture import (
        HookPoint as HookPoint, capture as capture, find_blocks as find_blocks,
        residual_hook as residual_hook)
    from monitor.catalog import Catalog as Catalog, load_catalog as load_catalog
    from monitor.errors import (
        Blocked as Blocked, CatalogError as CatalogError, DataError as DataError,
        ModelLoadError as ModelLoadError, MonitorError as MonitorError,
        MonitorUnavailable as MonitorUnavailable, PolicyError as PolicyError,
        SAEFormatError as SAEFormatError, SAEMismatchError as SAEMismatchError,
        UnsupportedModelError as UnsupportedModelError)
    from monitor.models import load_default_model as load_default_model, load_model as load_model
    from monitor.policy import (
        CompiledPolicy as CompiledPolicy, PolicyStore as PolicyStore,
        compile_policies as compile_policies, load_policies as load_policies)
    from monitor.report import BlockInfo as BlockInfo, Report as Report
    from monitor.runtime.encoder import FeatureEncoder as FeatureEncoder
    from monitor.runtime.fit import check_fit as check_fit
    from monitor.runtime.hf import Monitor as Monitor
    from monitor.runtime.scan import ScanItem as ScanItem
    from monitor.runtime.session import Session as Session
    from monitor.runtime.wrap import (
        MonitoredPipeline as MonitoredPipeline, from_default as from_default, wrap as wrap)
    from monitor.sae import SAE as SAE, SAEConfig as SAEConfig, load_sae as load_sae
