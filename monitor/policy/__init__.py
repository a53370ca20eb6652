"""YAML safety policies over SAE features: schema, loader, compiler, engine, hot reload.

Flow: ``load_policies`` (files -> validated :class:`PolicySet`, all errors located) ->
``compile_policies`` (bound to a catalog and SAE width -> :class:`CompiledPolicy`, each rule's
feature tests with resolved thresholds in :attr:`CompiledRule.leaves`) ->
``CompiledPolicy.step`` per chunk of tokens (pure, vectorised) -> :class:`StepResult`.
:class:`PolicyStore` keeps the current compiled policy and swaps in new versions atomically.
The file format is documented in :mod:`monitor.policy.schema`.

Loading and validating (schema, loader, checks, test-case files) never imports torch, so
``sae-monitor policy check`` stays fast in a pre-commit hook: the names that need the engine
(``compile_policies``, ``CompiledPolicy``, ``PolicyStore``, ...) are imported on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from monitor.policy.jsonschema import policy_json_schema, write_json_schema
from monitor.policy.loader import (LoadedFile, PolicySet, SourceRef, is_policy_file,
                                   load_policies)
from monitor.policy.schema import (Action, AllOf, AnyOf, Condition, Leaf, Not, PolicyFile, Rule,
                                   Steer)

if TYPE_CHECKING:
    from monitor.policy.compile import compile_policies
    from monitor.policy.compiled import (CompiledRule, FeatureRef, Hit, ResolvedLeaf,
                                         SteerDirective, SteerSpec, StepResult)
    from monitor.policy.engine import CompiledPolicy, EngineState
    from monitor.policy.reload import PolicyStore, ReloadResult

_LAZY = {
    "compile_policies": "monitor.policy.compile",
    "CompiledRule": "monitor.policy.compiled", "FeatureRef": "monitor.policy.compiled",
    "Hit": "monitor.policy.compiled", "ResolvedLeaf": "monitor.policy.compiled",
    "SteerDirective": "monitor.policy.compiled", "SteerSpec": "monitor.policy.compiled",
    "StepResult": "monitor.policy.compiled",
    "CompiledPolicy": "monitor.policy.engine", "EngineState": "monitor.policy.engine",
    "PolicyStore": "monitor.policy.reload", "ReloadResult": "monitor.policy.reload",
}

__all__ = [
    "Action", "AllOf", "AnyOf", "CompiledPolicy", "CompiledRule", "Condition", "EngineState",
    "FeatureRef", "Hit", "Leaf", "LoadedFile", "Not", "PolicyFile", "PolicySet", "PolicyStore",
    "ReloadResult", "ResolvedLeaf", "Rule", "SourceRef", "Steer", "SteerDirective", "SteerSpec",
    "StepResult", "compile_policies", "is_policy_file", "load_policies", "policy_json_schema",
    "write_json_schema",
]


def __getattr__(name: str) -> Any:
    """Import the engine-side names (which need torch) on first use."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
