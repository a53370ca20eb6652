"""Pydantic validation errors on YAML data, as messages located at ``file:line:column``.

The second half of reading a YAML file people wrote (the first is :mod:`monitor.yaml_source`):
:func:`validation_messages` turns a pydantic ``ValidationError`` raised on the data of a
:class:`~monitor.yaml_source.YamlSource` into one message per problem,
``policies/pii.yaml:14:9: rules[2] (id: pii.email).when.above: Input should be a valid number``,
with did-you-mean suggestions for unknown keys and enum values;
:func:`duplicate_key_messages` reports keys written twice; :func:`located` formats a problem found
after validation the same way.
"""

from __future__ import annotations

import difflib
import re
import types
import typing
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ValidationError

if TYPE_CHECKING:  # only types: this module needs nothing of the loader at run time
    from monitor.yaml_source import Loc, Position, YamlSource


def suggest(word: str, choices: Sequence[str], n: int = 1) -> list[str]:
    """Close matches of ``word`` among ``choices`` (difflib, cutoff 0.6)."""
    return difflib.get_close_matches(word, list(choices), n=n, cutoff=0.6)


def did_you_mean(word: str, choices: Sequence[str]) -> str:
    """``"; did you mean 'x'?"`` or the empty string."""
    close = suggest(word, choices)
    return f"; did you mean '{close[0]}'?" if close else ""


def _unwrap(tp: Any) -> Any:
    while typing.get_origin(tp) is typing.Annotated:
        tp = typing.get_args(tp)[0]
    return tp


def _tags(tp: Any) -> dict[str, Any]:
    """For a tagged union member list, ``{tag: member}``."""
    out: dict[str, Any] = {}
    for member in typing.get_args(tp):
        if typing.get_origin(member) is typing.Annotated:
            for meta in typing.get_args(member)[1:]:
                tag = getattr(meta, "tag", None)
                if isinstance(tag, str):
                    out[tag] = typing.get_args(member)[0]
    return out


def _field_by_key(model: type[BaseModel], key: str) -> Any:
    for name, info in model.model_fields.items():
        if key in (name, info.alias):
            return info.annotation
    return None


def _step(tp: Any, part: str | int) -> Any:
    """The type found at ``part`` inside a value of type ``tp`` (None if unknown)."""
    tp = _unwrap(tp)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        tags = _tags(tp)
        if isinstance(part, str) and part in tags:
            return tags[part]  # a discriminator tag: the loc names the union member
        members = [m for m in typing.get_args(tp) if m is not type(None)]
        for m in members:
            found = _step(m, part)
            if found is not None:
                return found
        return None
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return _field_by_key(tp, part) if isinstance(part, str) else None
    if origin in (list, tuple, Sequence) and isinstance(part, int):
        return typing.get_args(tp)[0]
    if origin is dict:
        return typing.get_args(tp)[1]
    return None


def _model_at(root: type[BaseModel], loc: Loc) -> type[BaseModel] | None:
    tp: Any = root
    for part in loc:
        tp = _step(tp, part)
        if tp is None:
            return None
    tp = _unwrap(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        models = [m for m in typing.get_args(tp) if isinstance(_unwrap(m), type)
                  and issubclass(_unwrap(m), BaseModel)]
        tp = _unwrap(models[0]) if len(models) == 1 else None
    return tp if isinstance(tp, type) and issubclass(tp, BaseModel) else None


def valid_keys(model: type[BaseModel]) -> list[str]:
    """The keys a YAML mapping for ``model`` may use (aliases where set)."""
    return [info.alias or name for name, info in model.model_fields.items()]


def data_path(data: Any, loc: Loc) -> Loc:
    """The part of a pydantic ``loc`` that exists in ``data``; union tags are dropped.

    Pydantic inserts the tag of a discriminated-union member into ``loc``
    (``("rules", 0, "when", "leaf", "above")``); this keeps only the steps that walk the data,
    so it can be looked up in a :class:`YamlSource` (a missing key maps to its parent).
    """
    out: list[str | int] = []
    cur = data
    for i, part in enumerate(loc):
        if isinstance(cur, dict) and part in cur:
            cur = cur[part]
            out.append(part)
        elif isinstance(cur, list) and isinstance(part, int) and 0 <= part < len(cur):
            cur = cur[part]
            out.append(part)
    return tuple(out)


def render_path(data: Any, path: Loc) -> str:
    """``rules[2] (id: pii.email).when.any[0].feature``: the path as a reader would write it."""
    text = ""
    cur = data
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
        found = isinstance(cur, (dict, list)) and _has(cur, part)
        cur = cur[part] if found else None
        if isinstance(part, int) and isinstance(cur, dict):
            ident = cur.get("id", cur.get("name"))
            if isinstance(ident, str):
                text += f" (id: {ident})" if "id" in cur else f" (name: {ident})"
    return text or "<top level>"


def _has(cur: dict | list, part: str | int) -> bool:
    if isinstance(cur, dict):
        return part in cur
    return isinstance(part, int) and 0 <= part < len(cur)


_QUOTED = re.compile(r"'([^']*)'")


def _message(err: Any, root: type[BaseModel], src: YamlSource) -> tuple[Loc, str, bool]:
    """(data path, text, point-at-key) for one pydantic error dict."""
    loc: Loc = tuple(err["loc"])
    kind = err["type"]
    path = data_path(src.data, loc)
    inp = err.get("input")
    ctx = err.get("ctx") or {}
    if kind == "extra_forbidden":
        key = str(loc[-1])
        model = _model_at(root, loc[:-1])
        keys = valid_keys(model) if model else []
        hint = did_you_mean(key, keys)
        allowed = f" (valid keys: {', '.join(keys)})" if keys else ""
        return path, f"unknown key '{key}'{hint}{allowed}", True
    if kind == "missing":
        return path, f"missing required key '{loc[-1]}'", False
    if kind == "too_short" and isinstance(inp, (list, tuple)):
        return path, (f"needs at least {ctx.get('min_length', 1)} item(s), got "
                      f"{ctx.get('actual_length', len(inp))}"), False
    if kind == "literal_error" and isinstance(inp, str):
        choices = _QUOTED.findall(str(ctx.get("expected", "")))
        hint = did_you_mean(inp, choices)
        return path, f"'{inp}' is not one of {', '.join(choices)}{hint}", False
    text = str(err["msg"])
    for prefix in ("Value error, ", "Assertion failed, "):
        if text.startswith(prefix):
            text = text[len(prefix):]
    if kind not in ("value_error", "assertion_error") and kind != "union_tag_not_found" \
            and not isinstance(inp, (dict, list)) and "input" in err:
        text += f" (got {inp!r})"
    if kind == "string_type" and isinstance(inp, bool):
        text += "; YAML reads yes/no/on/off/true/false as booleans, put the text in quotes"
    return path, text, False


def validation_messages(exc: ValidationError, root: type[BaseModel], src: YamlSource) -> list[str]:
    """One ``file:line:column: path: problem`` message per error in ``exc``, in file order."""
    rows: list[tuple[Position, str]] = []
    seen: set[str] = set()
    errs = exc.errors(include_url=False)
    # A list whose items failed is also reported "too short after validation": noise.
    errs = [e for e in errs if e["type"] != "too_short" or not any(
        len(o["loc"]) > len(e["loc"]) and tuple(o["loc"][:len(e["loc"])]) == tuple(e["loc"])
        for o in errs)]
    for err in errs:
        path, text, at_key = _message(err, root, src)
        pos = (src.keys.get(path) if at_key else None) or src.position(path)
        msg = f"{src.path}:{pos.line}:{pos.column}: {render_path(src.data, path)}: {text}"
        if msg not in seen:
            seen.add(msg)
            rows.append((pos, msg))
    rows.sort(key=lambda r: (r[0].line, r[0].column))
    return [m for _, m in rows]


def duplicate_key_messages(src: YamlSource) -> list[str]:
    """Errors for keys written twice in one mapping (YAML would keep only the last)."""
    return [f"{src.path}:{pos.line}:{pos.column}: {render_path(src.data, path[:-1])}: "
            f"key '{path[-1]}' appears more than once in this mapping; keep only one"
            for path, pos in src.duplicate_keys]


_WHERE = re.compile(r":(\d+):(\d+): ")


def sort_messages(messages: Sequence[str]) -> list[str]:
    """Located messages ordered by line and column (stable for ties and unlocated ones)."""
    def key(msg: str) -> tuple[int, int]:
        m = _WHERE.search(msg)
        return (int(m.group(1)), int(m.group(2))) if m else (0, 0)
    return sorted(messages, key=key)


def located(src: YamlSource, loc: Loc, text: str, *, key: bool = False) -> str:
    """``file:line:column: path: text`` for a problem found after validation."""
    return f"{src.where(loc, key=key)}: {render_path(src.data, loc)}: {text}"
