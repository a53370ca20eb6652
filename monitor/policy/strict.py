"""The base of every policy-file model: frozen, strict, and the "exactly one key" helpers.

Shared by :mod:`monitor.policy.schema` and :mod:`monitor.policy.aggregates`.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from monitor.yaml_source import NumbersNotBooleans


class Strict(NumbersNotBooleans):
    """Frozen, unknown keys forbidden, no NaN/inf, no booleans for numbers: policy YAML is never
    silently reinterpreted."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True,
                              allow_inf_nan=False)


def one_of(model: BaseModel, names: tuple[str, ...], what: str) -> str:
    """The single field among ``names`` that is set, or a ValueError explaining the choice."""
    chosen = [n for n in names if getattr(model, n) is not None]
    if len(chosen) != 1:
        options = ", ".join(f"'{n}'" for n in names)
        got = "none" if not chosen else ", ".join(f"'{n}'" for n in chosen)
        raise ValueError(f"{what}: give exactly one of {options} (got {got})")
    return chosen[0]


def shorthand(value: Any, keys: tuple[str, ...]) -> Any:
    """``"log"`` -> ``{"log": {}}`` and ``{"log": None}`` -> ``{"log": {}}`` (option-less keys)."""
    if isinstance(value, str):
        return {value: {}}
    if isinstance(value, dict):
        return {k: ({} if v is None and k in keys else v) for k, v in value.items()}
    return value
