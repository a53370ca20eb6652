"""YAML safety policies over SAE features: schema, loader, compiled engine, hot reload.

Flow: ``load_policies`` (files -> validated :class:`PolicySet`, all errors located) ->
``compile_policies`` (bound to a catalog and SAE width -> :class:`CompiledPolicy`) ->
``CompiledPolicy.step`` per chunk of tokens (pure, vectorised) -> :class:`StepResult`.
:class:`PolicyStore` keeps the current compiled policy and swaps in new versions atomically.
The file format is documented in :mod:`monitor.policy.schema`.
"""

from monitor.policy.engine import (CompiledPolicy, CompiledRule, EngineState, FeatureRef, Hit,
                                   SteerDirective, SteerSpec, StepResult, compile_policies)
from monitor.policy.loader import (LoadedFile, PolicySet, SourceRef, is_policy_file,
                                   load_policies)
from monitor.policy.reload import PolicyStore, ReloadResult
from monitor.policy.schema import (Action, AllOf, AnyOf, Condition, Leaf, Not, PolicyFile, Rule,
                                   Steer, policy_json_schema, write_json_schema)

__all__ = [
    "Action", "AllOf", "AnyOf", "CompiledPolicy", "CompiledRule", "Condition", "EngineState",
    "FeatureRef", "Hit", "Leaf", "LoadedFile", "Not", "PolicyFile", "PolicySet", "PolicyStore",
    "ReloadResult", "Rule", "SourceRef", "Steer", "SteerDirective", "SteerSpec", "StepResult",
    "compile_policies", "is_policy_file", "load_policies", "policy_json_schema",
    "write_json_schema",
]
