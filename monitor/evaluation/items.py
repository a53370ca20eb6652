"""Evaluation items: labeled rows cut so that :meth:`Monitor.scan`'s response is what counts.

``scan(transcript, prompt=prompt)`` evaluates an :class:`EvalItem`; the continuous score and the
decisions read only its response scope, so each row is cut so that the response is what the
label is about:

* a dialogue (``messages`` ending with the assistant's turn): ``scan(messages)``, the chat
  template exactly as in deployment; the response is the final assistant turn;
* a row with a ``response`` (and a ``prompt``, or a rendered ``text`` that contains it): the
  text before the response is the prompt;
* code with ``changed_lines``: the prompt is the code before the first changed line, the
  response runs from the first changed line to the end of the last one. The model is causal,
  so dropping the code after the last changed line changes no activation in scope. When the
  changed lines are not contiguous the unchanged lines between them are scored too (counted
  in the notes);
* anything else: the whole text is the response.

Long items are cut to ``context_chars`` of text before the scope and ``scope_chars`` of scope.
:func:`scan_ids` and :func:`scan_window` give the token ids ``scan`` sees, for the readers that
do not run the monitor (the dense baselines).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from monitor.activations import Window, labeled_item
from monitor.data import read_jsonl
from monitor.errors import DataError

# Row fields kept for grouping (``--group-by``) besides ``source`` and ``category``.
GROUP_FIELDS = ("language", "cwe", "subtype", "variant", "kind", "user_view")


@dataclass(frozen=True)
class EvalItem:
    """One labeled item, cut for :meth:`Monitor.scan` (see the module docstring).

    ``code``/``code_lines`` are for line-based baselines (bandit): the code text and the
    1-based lines in scope (empty: all). ``source`` is the row's ``source`` up to the first
    ``:`` (``owner/repo``); ``pair_id`` links the two sides of a minimal pair; ``fields``
    holds the other row fields one may group by.
    """

    label: int
    category: str
    transcript: str | tuple[Mapping[str, str], ...]
    prompt: str | None = None
    id: str = ""
    language: str | None = None
    code: str | None = None
    code_lines: tuple[int, ...] = ()
    truncated: bool = False
    widened: bool = False
    source: str = ""
    pair_id: str | None = None
    fields: Mapping[str, str] = field(default_factory=dict)


GROUP_KEYS = ("source", "category", "label", "id", *GROUP_FIELDS)


def check_group_key(key: str, option: str = "group_by") -> str:
    """``key`` if items can be grouped by it, else a :class:`DataError` listing the fields."""
    if key not in GROUP_KEYS:
        raise DataError(f"{option}: cannot group by {key!r}; choose one of {', '.join(GROUP_KEYS)}")
    return key


def group_of(item: EvalItem, key: str) -> str:
    """``item``'s value of ``key`` (``source``, ``category``, ``label``, ``id`` or a row field
    such as ``language``); "" when the row had none."""
    if key in ("source", "category", "id"):
        return str(getattr(item, key))
    if key == "label":
        return str(item.label)
    return item.fields.get(key, "")


def _line_numbers(text: str, spans: Iterable[tuple[int, int]]) -> tuple[int, ...]:
    lines: set[int] = set()
    for start, end in spans:
        first = text.count("\n", 0, start) + 1
        last = text.count("\n", 0, max(start, end - 1)) + 1
        lines.update(range(first, last + 1))
    return tuple(sorted(lines))


def eval_item(row: Mapping[str, Any], tokenizer: Any = None, *, context_chars: int = 2000,
              scope_chars: int = 4000, source: str = "") -> EvalItem:
    """Build an :class:`EvalItem` from a row of the labeled-data format (``source`` names the
    row in errors, e.g. ``file.jsonl:12``)."""
    if "label" not in row:
        raise DataError(f"{source}: row has no 'label'")
    label = int(row["label"])
    if label not in (0, 1):
        raise DataError(f"{source}: label must be 0 or 1, got {row['label']!r}")
    category = str(row.get("category") or "uncategorised")
    ident = str(row.get("id", source))
    language = row.get("language")
    src = str(row.get("source", "")).split(":")[0]
    pair_id = None if row.get("pair_id") is None else str(row["pair_id"])
    fields = {k: str(row[k]) for k in GROUP_FIELDS if row.get(k) is not None}
    messages = row.get("messages")
    if (isinstance(messages, list) and messages and messages[-1].get("role") == "assistant"
            and not row.get("changed_lines") and getattr(tokenizer, "chat_template", None)):
        return EvalItem(label, category, tuple(dict(m) for m in messages), None, ident, language,
                        source=src, pair_id=pair_id, fields=fields)
    try:
        item = labeled_item(row, tokenizer)
    except DataError as exc:
        raise DataError(f"{source}: {exc}") from None
    text, spans = item.text, sorted(item.spans)
    code = text if language or row.get("changed_lines") else None
    code_lines = _line_numbers(text, spans) if code is not None else ()
    if spans:
        start, end = spans[0][0], max(e for _, e in spans)
        prompt, response = text[:start], text[start:end]
        widened = len(spans) > 1 and any(
            text[a_end:b_start].strip() for (_, a_end), (b_start, _) in zip(spans, spans[1:]))
    else:
        prompt, response, widened = "", text, False
    truncated = len(prompt) > context_chars or len(response) > scope_chars
    prompt, response = prompt[len(prompt) - min(len(prompt), context_chars):], response[:scope_chars]
    return EvalItem(label, category, response, prompt or None, ident, language, code, code_lines,
                    truncated, widened, src, pair_id, fields)


def load_eval_items(path: str | Path, tokenizer: Any = None, *, limit: int | None = None,
                    label: int | None = None, **options: Any) -> list[EvalItem]:
    """Items of a labeled JSONL file (first ``limit`` rows); options as :func:`eval_item`.
    ``label`` sets every row's label (a benign-traffic file has none)."""
    items: list[EvalItem] = []
    for lineno, row in enumerate(read_jsonl(path), 1):
        if limit and len(items) >= limit:
            break
        if label is not None:
            row = {**row, "label": label}
        items.append(eval_item(row, tokenizer, source=f"{path}:{lineno}", **options))
    if not items:
        raise DataError(f"{path}: no rows")
    return items


def as_eval_items(items: Sequence[EvalItem | Mapping[str, Any]], tokenizer: Any, what: str = "item"
                  ) -> list[EvalItem]:
    """``items`` with every row turned into an :class:`EvalItem`."""
    return [i if isinstance(i, EvalItem) else eval_item(i, tokenizer, source=f"{what} {n}")
            for n, i in enumerate(items)]


# ------------------------------------------------------------------ tokens as scan sees them


def scan_ids(tokenizer: Any, text: str | Sequence[Mapping[str, str]], prompt: str | None = None
             ) -> tuple[list[int], int]:
    """``(ids, prompt_len)`` exactly as :meth:`Monitor.scan` tokenises ``text``/``prompt``
    (:func:`monitor.runtime.scan.scan_token_ids`): the response is ``ids[prompt_len:]``."""
    from monitor.runtime.scan import ScanItem, scan_token_ids

    prompt_ids, response_ids = scan_token_ids(tokenizer, ScanItem(text, prompt))
    return list(prompt_ids) + list(response_ids), len(prompt_ids)


def scan_window(tokenizer: Any, item: EvalItem) -> Window:
    """``(ids, in_scope)`` of ``item`` as scan sees it: the response tokens count, except
    position 0 and special tokens, which the monitor leaves out too."""
    ids, start = scan_ids(tokenizer, item.transcript, item.prompt)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    return ids, [n >= max(start, 1) and t not in special for n, t in enumerate(ids)]
