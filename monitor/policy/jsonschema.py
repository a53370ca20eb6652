"""The JSON Schema of policy files, generated from :mod:`monitor.policy.schema` for editors.

``policies/schema.json`` is this output; regenerate it after changing the models (a test
compares the committed bytes).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from monitor.policy.schema import PolicyFile


def _drop_null(node: Any) -> Any:
    """Remove ``null`` from optional fields: YAML authors omit a key rather than write null.

    The models type "one of several keys" fields as ``X | None`` (so validation errors come
    from ``X`` alone), which pydantic renders as ``anyOf: [X, null]`` with ``default: null``.
    """
    if isinstance(node, list):
        return [_drop_null(n) for n in node]
    if not isinstance(node, dict):
        return node
    node = {k: _drop_null(v) for k, v in node.items()}
    any_of = node.get("anyOf")
    if isinstance(any_of, list) and {"type": "null"} in any_of:
        rest = [a for a in any_of if a != {"type": "null"}]
        node.pop("anyOf")
        if node.get("default", 0) is None:
            node.pop("default")
        node = {**rest[0], **node} if len(rest) == 1 else {"anyOf": rest, **node}
    return node


def policy_json_schema() -> dict[str, Any]:
    """The JSON Schema of a policy file (draft 2020-12), as committed in policies/schema.json."""
    schema = _drop_null(PolicyFile.model_json_schema(by_alias=True))
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}


def write_json_schema(path: str | Path) -> None:
    """Write :func:`policy_json_schema` to ``path`` (2-space indent, trailing newline).

    Regenerate the committed copy after changing the models::

        python -c "from monitor.policy import write_json_schema as w; w('policies/schema.json')"
    """
    text = json.dumps(policy_json_schema(), indent=2, ensure_ascii=False) + "\n"
    Path(path).write_text(text, encoding="utf-8")

