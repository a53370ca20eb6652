"""sae-monitor: safety monitoring for language models with sparse autoencoders.

Data flows one way: model hook (:mod:`monitor.capture`) -> SAE encode (:mod:`monitor.sae`)
-> policy engine (:mod:`monitor.policy`) -> actions (metrics, logs, audit, block, steer).
"""

from __future__ import annotations

__version__ = "0.1.0"

from monitor.capture import HookPoint, capture, find_blocks, residual_hook
from monitor.errors import (
    CatalogError,
    DataError,
    ModelLoadError,
    MonitorError,
    PolicyError,
    SAEFormatError,
    SAEMismatchError,
    UnsupportedModelError,
)
from monitor.models import load_default_model, load_model
from monitor.sae import SAE, SAEConfig, check_fit, load_sae
from monitor.catalog import Catalog, load_catalog
from monitor.policy import CompiledPolicy, PolicyStore, compile_policies, load_policies
from monitor.wrapper import (Blocked, Monitor, MonitoredPipeline, MonitorUnavailable, Report,
                             from_default, wrap)

__all__ = [
    "__version__",
    "HookPoint",
    "capture",
    "find_blocks",
    "residual_hook",
    "MonitorError",
    "CatalogError",
    "DataError",
    "ModelLoadError",
    "PolicyError",
    "SAEFormatError",
    "SAEMismatchError",
    "UnsupportedModelError",
    "load_default_model",
    "load_model",
    "SAE",
    "SAEConfig",
    "check_fit",
    "load_sae",
    "Catalog",
    "load_catalog",
    "CompiledPolicy",
    "PolicyStore",
    "compile_policies",
    "load_policies",
    "Blocked",
    "Monitor",
    "MonitoredPipeline",
    "MonitorUnavailable",
    "Report",
    "from_default",
    "wrap",
]

from monitor import drift  # noqa: E402  (a callable package: monitor.drift(base, [candidate]))
