"""Reading text for training, discovery and evaluation.

Accepts JSONL (optionally gzipped) with ``{"text": ...}`` or chat ``{"messages": [...]}`` rows,
and plain text or source files. Chat rows are rendered with the tokenizer's own chat template so
that the model sees the token stream it sees in deployment.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from monitor.errors import DataError

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".json.gz", ".ndjson")


def _open_text(path: Path):
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return path.open("r", encoding="utf-8", errors="replace")


def read_jsonl(path: str | Path) -> Iterator[dict[str, Any]]:
    """Rows of a JSONL file; a malformed line is a :class:`DataError` naming file and line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    with _open_text(path) as handle:
        for lineno, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg}); each line must be one JSON object") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            yield row


def render(row: dict[str, Any], tokenizer: Any = None, *, source: str = "") -> str:
    """The text the model sees for one row: chat ``messages`` through the chat template, else
    ``prompt`` + ``response``, else ``text``."""
    messages = row.get("messages")
    if messages and tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False)
    if "text" in row and isinstance(row["text"], str):
        return row["text"]
    if isinstance(row.get("prompt"), str) and isinstance(row.get("response"), str):
        return row["prompt"] + row["response"]
    raise DataError(f"{source}: row has no 'text', 'messages' or 'prompt'+'response' field")


def token_ids(value: Any) -> list[int]:
    """Plain token ids from what ``apply_chat_template``/tokenizers return by version: a list,
    a nested list, a tensor or a BatchEncoding."""
    if hasattr(value, "keys") and "input_ids" in value:
        value = value["input_ids"]
    if hasattr(value, "tolist"):
        value = value.tolist()
    if value and isinstance(value[0], list):
        value = value[0]
    return [int(i) for i in value]


def iter_texts(paths: Iterable[str | Path], tokenizer: Any = None) -> Iterator[str]:
    """Texts from JSONL files and plain text files, in order."""
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            yield from iter_texts(sorted(p for p in path.rglob("*") if p.is_file()), tokenizer)
        elif path.name.endswith(JSONL_SUFFIXES):
            for lineno, row in enumerate(read_jsonl(path), 1):
                yield render(row, tokenizer, source=f"{path}:{lineno}")
        elif path.is_file():
            with _open_text(path) as handle:
                yield handle.read()
        else:
            raise DataError(f"{path}: no such file or directory")
