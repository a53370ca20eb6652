"""Reading logged traffic for a backtest: files -> :class:`Conversation` or :class:`Problem`.

First stage of a backtest (read -> scan -> results -> summary/diff -> report). Every input record
becomes exactly one of the two, keyed by ``file:line`` (Parquet: ``file:row``, 1-based), so a
run can count, resume and report every record: nothing is dropped silently and nothing raises
for bad data.

Accepted shapes, per row (JSONL or Parquet):

* OpenAI chat: ``{"messages": [{"role", "content"}, ...]}`` (``content`` a string or a list of
  ``{"type": "text", "text"}`` parts);
* prompt/response: ``{"prompt": str | messages, "response": str}`` (``response`` optional);
* this project's logs (:mod:`monitor.logs`): a ``request_completed`` event logged with
  ``log_text=True`` replays as its ``prompt`` messages plus the ``response``. Logged without
  text (the default: ``prompt_sha256``/``response_sha256`` only), and every other event
  (``rule_hit``, ``request_blocked`` ...), cannot be replayed: a ``no_text`` problem;
* this project's audit trail (:mod:`monitor.audit`): records carry no text by design, so each
  is a ``no_text`` problem (they say what *was* decided, not what was said);
* anything else through a :class:`FieldMap` (e.g. ``messages=conversation``, ``id=uuid``).

Problems (kinds): ``malformed`` (not JSON, not an object, unreadable Parquet), ``encoding``
(bytes that are not UTF-8), ``unknown_role``, ``bad_message``, ``empty``, ``no_text``,
``unknown_shape``. Too-long conversations are found by the scanner (it knows the tokenizer).
"""

from __future__ import annotations

import glob as globlib
import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from monitor.errors import DataError

ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
PARQUET_SUFFIXES = (".parquet", ".pq")
AUDIT_KEYS = frozenset({"request_id", "rule", "action", "token_index", "policy_version"})


@dataclass(frozen=True)
class FieldMap:
    """Where each field lives in a row of another shape. Dotted paths reach nested objects
    (``request.messages``). ``role``/``content`` name the keys inside each message."""

    messages: str = "messages"
    prompt: str = "prompt"
    response: str = "response"
    id: str = "id"
    role: str = "role"
    content: str = "content"

    @classmethod
    def parse(cls, pairs: Iterable[str]) -> FieldMap:
        """From ``name=path`` strings (the CLI's ``--field``); an unknown name is a DataError."""
        values: dict[str, str] = {}
        known = set(cls.__dataclass_fields__)
        for pair in pairs:
            name, sep, path = pair.partition("=")
            if not sep or name not in known or not path:
                raise DataError(f"--field {pair!r}: expected NAME=PATH with NAME one of "
                                f"{', '.join(sorted(known))} (e.g. --field messages=conversation)")
            values[name] = path
        return cls(**values)


@dataclass(frozen=True)
class Conversation:
    """One replayable conversation. ``key`` (``file:line``) is unique and stable across runs;
    ``id`` is the row's own id when it has one (else the key)."""

    key: str
    id: str
    messages: tuple[Mapping[str, str], ...]
    source: str
    line: int


@dataclass(frozen=True)
class Problem:
    """A record that cannot be backtested, and why (``kind``: see the module doc)."""

    key: str
    source: str
    line: int
    kind: str
    detail: str


Record = Conversation | Problem


def expand(inputs: str | Path | Iterable[str | Path]) -> list[Path]:
    """Files named by ``inputs`` (files, directories searched recursively, globs), sorted and
    de-duplicated. Raises DataError when an input matches no readable file."""
    items = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    out: dict[Path, None] = {}
    for item in items:
        text = str(item)
        path = Path(text)
        if path.is_dir():
            found = [p for p in sorted(path.rglob("*")) if p.is_file() and _readable(p)]
        elif path.is_file():
            found = [path]
        else:
            found = [Path(p) for p in sorted(globlib.glob(text, recursive=True)) if Path(p).is_file()]
            found = [p for p in found if _readable(p)]
        if not found:
            raise DataError(f"{text}: no JSONL or Parquet file there (give a file, a directory "
                            f"or a glob such as 'logs/*.jsonl')")
        out.update(dict.fromkeys(p for p in found))
    return list(out)


def _readable(path: Path) -> bool:
    name = path.name.lower()
    return name.endswith(JSONL_SUFFIXES + PARQUET_SUFFIXES) or name.endswith(".jsonl.gz")


def read_records(paths: Iterable[Path], fields: FieldMap | None = None,
                 skip: frozenset[str] | set[str] = frozenset()) -> Iterator[Record]:
    """Every record of ``paths`` in order, as a Conversation or a Problem; keys in ``skip``
    (already done by an earlier run) are passed over without parsing."""
    fields = fields or FieldMap()
    for path in paths:
        yield from read_file(path, fields, skip)


def read_file(path: Path, fields: FieldMap | None = None,
              skip: frozenset[str] | set[str] = frozenset()) -> Iterator[Record]:
    """The records of one file (JSONL, gzipped JSONL or Parquet)."""
    fields = fields or FieldMap()
    if path.name.lower().endswith(PARQUET_SUFFIXES):
        yield from _read_parquet(path, fields, skip)
    else:
        yield from _read_jsonl(path, fields, skip)


def _read_jsonl(path: Path, fields: FieldMap, skip: frozenset[str] | set[str]) -> Iterator[Record]:
    import gzip

    source = str(path)
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as handle:
        for lineno, raw in enumerate(handle, 1):
            key = f"{source}:{lineno}"
            if key in skip or not raw.strip():
                continue  # blank lines are not records
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield Problem(key, source, lineno, "encoding",
                              f"bytes that are not UTF-8 at column {exc.start + 1}; re-encode the file as UTF-8")
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as exc:
                yield Problem(key, source, lineno, "malformed", f"not valid JSON ({exc.msg} at column {exc.colno})")
                continue
            yield parse_row(row, fields, source, lineno)


def _read_parquet(path: Path, fields: FieldMap, skip: frozenset[str] | set[str]) -> Iterator[Record]:
    import pyarrow.parquet as pq

    source = str(path)
    try:
        table = pq.ParquetFile(path)
        batches = table.iter_batches(batch_size=1024)
        lineno = 0
        for batch in batches:
            for row in batch.to_pylist():
                lineno += 1
                key = f"{source}:{lineno}"
                if key not in skip:
                    yield parse_row(row, fields, source, lineno)
    except (OSError, ValueError) as exc:  # pyarrow raises ArrowInvalid (a ValueError) / OSError
        yield Problem(f"{source}:0", source, 0, "malformed", f"unreadable Parquet file ({exc})")


def _get(row: Mapping[str, Any], path: str) -> Any:
    node: Any = row
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def parse_row(row: Any, fields: FieldMap, source: str, line: int) -> Record:
    """One row -> a Conversation, or a Problem saying what is wrong and how to fix it."""
    key = f"{source}:{line}"

    def problem(kind: str, detail: str) -> Problem:
        return Problem(key, source, line, kind, detail)

    if not isinstance(row, Mapping):
        return problem("malformed", f"expected a JSON object, got {type(row).__name__}")
    rid = _get(row, fields.id)
    if rid is None:
        rid = row.get("request_id")
    conv_id = str(rid) if rid is not None else key
    messages = _get(row, fields.messages)
    prompt = _get(row, fields.prompt)
    response = _get(row, fields.response)
    if messages is None and prompt is None:
        if "prompt_sha256" in row or "response_sha256" in row:
            return problem("no_text", "a log record with text hashes only (logged without log_text); "
                                      "log with log_text=True to make requests replayable")
        if AUDIT_KEYS <= set(row):
            return problem("no_text", "an audit record: it holds the decision taken, not the text; "
                                      "replay the request_completed log records (logged with log_text=True)")
        if "event" in row:
            return problem("no_text", f"a {row['event']!r} log event carries no conversation text; "
                                      "only request_completed events logged with log_text=True replay")
        return problem("unknown_shape", f"no {fields.messages!r} and no {fields.prompt!r} field (keys: "
                                        f"{', '.join(sorted(map(str, row))[:8])}); map yours with --field "
                                        "messages=PATH or --field prompt=PATH --field response=PATH")
    if messages is None:
        if isinstance(prompt, str):
            messages = [{fields.role: "user", fields.content: prompt}]
        elif isinstance(prompt, list):
            messages = list(prompt)
        else:
            return problem("bad_message", f"{fields.prompt!r} must be a string or a list of messages, "
                                          f"got {type(prompt).__name__}")
        if response is not None:
            if not isinstance(response, str):
                return problem("bad_message", f"{fields.response!r} must be a string, got {type(response).__name__}")
            messages = messages + [{fields.role: "assistant", fields.content: response}]
    if not isinstance(messages, list):
        return problem("bad_message", f"{fields.messages!r} must be a list of messages, got {type(messages).__name__}")
    out: list[dict[str, str]] = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            return problem("bad_message", f"message {i} is a {type(message).__name__}, not an object")
        role = message.get(fields.role)
        if role not in ROLES:
            return problem("unknown_role", f"message {i} has role {role!r}; expected one of {', '.join(sorted(ROLES))}")
        content = _content(message.get(fields.content))
        if content is None:
            return problem("bad_message", f"message {i} ({role}) has no text content "
                                          "(a string, or a list of {\"type\": \"text\", \"text\"} parts)")
        out.append({"role": str(role), "content": content})
    if not out or all(not m["content"].strip() for m in out):
        return problem("empty", "the conversation has no messages with text")
    return Conversation(key, conv_id, tuple(out), source, line)


def _content(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value:
        texts = [p.get("text") for p in value if isinstance(p, Mapping) and p.get("type") == "text"]
        if texts and all(isinstance(t, str) for t in texts) and len(texts) == len(value):
            return "".join(texts)  # type: ignore[arg-type]
    return None


@dataclass
class ProblemCounts:
    """Problems tallied by kind, keeping the first few locations of each for the report."""

    counts: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def add(self, problem: Problem, keep: int = 5) -> None:
        self.counts[problem.kind] = self.counts.get(problem.kind, 0) + 1
        shown = self.examples.setdefault(problem.kind, [])
        if len(shown) < keep:
            shown.append(f"{problem.key}: {problem.detail}")


def record_to_json(record: Record) -> str:
    """A record as one JSON string (how records travel to Ray workers)."""
    if isinstance(record, Problem):
        return json.dumps({"problem": True, "key": record.key, "source": record.source, "line": record.line,
                           "kind": record.kind, "detail": record.detail}, ensure_ascii=False)
    return json.dumps({"problem": False, "key": record.key, "id": record.id, "source": record.source,
                       "line": record.line, "messages": list(record.messages)}, ensure_ascii=False)


def record_from_json(text: str) -> Record:
    """The inverse of :func:`record_to_json`."""
    d = json.loads(text)
    if d["problem"]:
        return Problem(d["key"], d["source"], d["line"], d["kind"], d["detail"])
    return Conversation(d["key"], d["id"], tuple(d["messages"]), d["source"], d["line"])
