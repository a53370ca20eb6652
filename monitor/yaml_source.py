"""YAML documents read safely, remembering where every value came from.

The one loader for every YAML file people write for sae-monitor: policies
(:mod:`monitor.policy.loader`), policy test cases (:mod:`monitor.policy.cases`) and feature
catalogs (:mod:`monitor.catalog`). :func:`load_document` reads one file and returns a
:class:`YamlSource`, or raises :class:`YamlDocumentError` whose ``message`` names the file (and
``line:column`` where there is one): a missing file, a broken symbolic link, a symlink loop, a
directory or FIFO where a file should be, unreadable bytes, a file over the size limit of its kind,
YAML syntax, an empty document, a document that is not a mapping.

Hostile input is refused before it can cost memory or stack: nesting deeper than
:data:`MAX_DEPTH` mappings/lists (a 3,000-level ``not:`` chain would otherwise raise
``RecursionError``) and aliases that add more than :data:`MAX_ALIAS_NODES` values when expanded
(a few hundred bytes of "billion laughs" would otherwise grow to gigabytes), each at the
``file:line:column`` where the limit was crossed.

Errors must point at the offending line:
``policies/pii.yaml:14:9: rules[2] (id: pii.email).when.above: Input should be a valid number``.
PyYAML's plain ``safe_load`` forgets positions, so :func:`parse_yaml` composes the node graph
(``start_mark`` on every node), builds the plain Python data from it and an index from data paths
(``("rules", 2, "when", "above")``) to line/column, and records mapping keys written twice (YAML
keeps only the last; a policy whose ``above:`` appears twice must not lose one quietly).
:mod:`monitor.yaml_messages` turns pydantic errors on that data into located messages.
Models read from YAML derive from :class:`NumbersNotBooleans`, which refuses a boolean where a
number belongs (pydantic would read ``latent: true`` as latent 1).
"""

from __future__ import annotations

import errno
import os
import stat
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import yaml
from pydantic import BaseModel, ValidationInfo, field_validator

from monitor.errors import MonitorError

Loc = tuple[str | int, ...]

MAX_DEPTH = 64
"""Deepest nesting of mappings and lists accepted in one document (aliases included)."""
MAX_ALIAS_NODES = 10_000
"""Most values that ``*alias`` references may add to a document when expanded."""


@dataclass(frozen=True)
class Position:
    """A 1-based line and column in a source file."""

    line: int
    column: int


@dataclass(frozen=True)
class SourceRef:
    """Where something was defined: ``path:line:column`` (1-based)."""

    path: str
    line: int
    column: int

    def __str__(self) -> str:
        return f"{self.path}:{self.line}:{self.column}"


class YamlDocumentError(MonitorError):
    """A YAML file cannot be used; ``message`` names the file and, where known, line:column.

    Callers turn it into their own error type (``PolicyError``, ``CatalogError``).
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class YamlSyntaxError(YamlDocumentError):
    """The text is not valid YAML, or nests or expands beyond the limits."""


@dataclass(frozen=True)
class DocumentKind:
    """What a file is, for messages, and how large it may be.

    ``what`` names it ("policy file"); ``needs`` ends "the file is empty; a policy file needs
    ..."; ``keys`` ends "must be a mapping with keys ...".
    """

    what: str
    needs: str
    keys: str
    max_bytes: int


@dataclass
class YamlSource:
    """Parsed YAML data plus the position of every value and mapping key in it.

    ``values[path]`` is where the value at ``path`` starts; ``keys[path]`` is where the key that
    introduces ``path`` is written (only for paths whose last element is a mapping key).
    ``duplicate_keys`` lists ``(path, position)`` of keys repeated within one mapping.
    """

    path: str
    data: Any
    values: dict[Loc, Position] = field(default_factory=dict)
    keys: dict[Loc, Position] = field(default_factory=dict)
    duplicate_keys: list[tuple[Loc, Position]] = field(default_factory=list)

    def position(self, loc: Loc) -> Position:
        """Position of the deepest existing node along ``loc`` (the file start if none)."""
        for n in range(len(loc), -1, -1):
            pos = self.values.get(tuple(loc[:n]))
            if pos is not None:
                return pos
        return Position(1, 1)

    def where(self, loc: Loc, *, key: bool = False) -> str:
        """``file:line:column`` of ``loc``; with ``key=True`` the position of its key if known."""
        pos = self.keys.get(loc) if key else None
        pos = pos or self.position(loc)
        return f"{self.path}:{pos.line}:{pos.column}"


# -------------------------------------------------------------------------------- reading


def read_text(path: str | Path, kind: DocumentKind) -> str:
    """The UTF-8 text of the regular file at ``path``, at most ``kind.max_bytes`` long.

    Raises :class:`YamlDocumentError` naming what is wrong: no such file, a broken symbolic link
    or a symlink loop (named as such, so a directory scan never drops them silently), a
    directory or other non-regular file, a file over the size limit, unreadable or non-UTF-8.
    """
    path = Path(path)
    what = kind.what
    try:
        info = path.stat()
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise YamlDocumentError(f"{path}: symbolic link loop (the link leads back to itself); "
                                    f"fix or remove the link") from None
        if isinstance(exc, FileNotFoundError) and path.is_symlink():
            raise YamlDocumentError(f"{path}: broken symbolic link to '{os.readlink(path)}' (the "
                                    f"target does not exist); fix or remove the link") from None
        if isinstance(exc, FileNotFoundError):
            raise YamlDocumentError(f"{path}: cannot read {what}: no such file") from None
        raise YamlDocumentError(f"{path}: cannot read {what}: {exc.strerror or exc}") from None
    if stat.S_ISDIR(info.st_mode):
        raise YamlDocumentError(f"{path}: is a directory, not a {what}")
    if not stat.S_ISREG(info.st_mode):
        raise YamlDocumentError(f"{path}: not a regular file (a FIFO, socket or device); a {what} "
                                f"must be a regular file")
    if info.st_size > kind.max_bytes:
        raise YamlDocumentError(_too_big(path, info.st_size, kind))
    try:
        with path.open("rb") as fh:
            raw = fh.read(kind.max_bytes + 1)
    except OSError as exc:
        raise YamlDocumentError(f"{path}: cannot read {what}: {exc.strerror or exc}") from None
    if len(raw) > kind.max_bytes:  # grew since stat, or a file whose size stat does not know
        raise YamlDocumentError(_too_big(path, len(raw), kind, at_least=True))
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise YamlDocumentError(f"{path}: cannot read {what}: not UTF-8 text ({exc.reason} at "
                                f"byte {exc.start}); save it as UTF-8") from None


def _too_big(path: Path, size: int, kind: DocumentKind, *, at_least: bool = False) -> str:
    more = "more than " if at_least else ""
    return (f"{path}: {kind.what} is {more}{size:,} bytes, over the limit of {kind.max_bytes:,} "
            f"bytes; split it into smaller files")


def load_document(path: str | Path, kind: DocumentKind) -> YamlSource:
    """Read and parse one YAML file that must hold a mapping (:func:`read_text`,
    :func:`parse_yaml`).

    Raises :class:`YamlDocumentError` for every problem before validation, including an empty
    document and one whose top level is not a mapping. Duplicate keys are left for the caller to
    report with its other problems (:func:`duplicate_key_messages`).
    """
    text = read_text(path, kind)
    src = parse_yaml(text, path)
    if src.data is None:
        raise YamlDocumentError(f"{path}:1:1: the file is empty; a {kind.what} needs {kind.needs}")
    if not isinstance(src.data, dict):
        raise YamlDocumentError(f"{src.where(())}: a {kind.what} must be a mapping with keys "
                                f"{kind.keys}, not a {type(src.data).__name__}")
    return src


# -------------------------------------------------------------------------------- parsing


class _Mark(Protocol):
    """A PyYAML position (the pure-Python and the libyaml marks both have these)."""

    line: int
    column: int


class _LimitedLoader(yaml.SafeLoader):
    """A SafeLoader whose composer refuses deep nesting, runaway aliases and recursive aliases.

    Expanded sizes are counted on the node graph (each node once, memoised), so a bomb is
    detected from its few hundred physical nodes without ever being expanded.
    """

    def __init__(self, text: str, name: str, max_depth: int, max_alias_nodes: int) -> None:
        super().__init__(text)
        self._name = name
        self._max_depth = max_depth
        self._max_alias = max_alias_nodes
        self._depth = 0
        self._added = 0
        self._size: dict[int, int] = {}  # id(node) -> values in its expansion
        self._height: dict[int, int] = {}  # id(node) -> nesting levels in its expansion

    def _refuse(self, mark: _Mark | None, text: str) -> YamlSyntaxError:
        # The parser gives every event its start mark; the stubs allow None, which names no line.
        where = f"{self._name}:{mark.line + 1}:{mark.column + 1}" if mark is not None else self._name
        return YamlSyntaxError(f"{where}: {text}")

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            target = self.anchors.get(event.anchor)
            if target is not None:
                self._alias(event, target)
            return super().compose_node(parent, index)
        collection = isinstance(event, (yaml.SequenceStartEvent, yaml.MappingStartEvent))
        if collection:
            self._depth += 1
            if self._depth > self._max_depth:
                raise self._refuse(event.start_mark, self._too_deep())
        node = super().compose_node(parent, index)
        if collection:
            self._depth -= 1
        kids: list[yaml.Node] = []
        if isinstance(node, yaml.SequenceNode):
            kids = list(node.value)
        elif isinstance(node, yaml.MappingNode):
            kids = [n for pair in node.value for n in pair]
        self._size[id(node)] = 1 + sum(self._size[id(k)] for k in kids)
        self._height[id(node)] = (1 + max((self._height[id(k)] for k in kids), default=0)
                                  if collection else 0)
        return node

    def _alias(self, event: yaml.AliasEvent, target: yaml.Node) -> None:
        size = self._size.get(id(target))
        if size is None:  # the anchored collection is still open: the alias is inside it
            raise self._refuse(event.start_mark, f"alias '*{event.anchor}' refers to a "
                               "collection that contains it; recursive structures are refused")
        self._added += size
        if self._added > self._max_alias:
            raise self._refuse(event.start_mark, (
                f"aliases ('*name' references) would add more than {self._max_alias:,} values "
                f"to this document, the limit; a document that grows like this from aliases is "
                f"refused (an alias bomb): write the values out or use fewer aliases"))
        if self._depth + self._height[id(target)] > self._max_depth:
            raise self._refuse(event.start_mark, self._too_deep())

    def _too_deep(self) -> str:
        return (f"nested more than {self._max_depth} levels of mappings and lists deep "
                f"(limit {self._max_depth}); flatten the structure, e.g. list conditions under "
                f"one 'any' or 'all' instead of nesting them")


def parse_yaml(text: str, path: str | Path, *, max_depth: int = MAX_DEPTH,
               max_alias_nodes: int = MAX_ALIAS_NODES) -> YamlSource:
    """Parse one YAML document, keeping positions. Raises :class:`YamlSyntaxError`.

    Nesting deeper than ``max_depth`` and aliases adding more than ``max_alias_nodes`` values are
    refused at the line where the limit is crossed. An empty document yields ``data=None``; the
    caller decides whether that is an error.
    """
    name = str(path)
    loader = _LimitedLoader(text, name, max_depth, max_alias_nodes)
    try:
        node = loader.get_single_node()
        if node is None:
            return YamlSource(name, None)
        # Construction flattens merge keys (<<) in place, so index the node afterwards.
        data = yaml.constructor.SafeConstructor().construct_document(node)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{name}:{mark.line + 1}:{mark.column + 1}" if mark else name
        problem = exc.problem or exc.context or "invalid YAML"
        raise YamlSyntaxError(f"{where}: YAML syntax error: {problem}") from None
    except yaml.YAMLError as exc:  # pragma: no cover - non-marked errors are rare
        raise YamlSyntaxError(f"{name}: YAML error: {exc}") from None
    finally:
        loader.dispose()
    src = YamlSource(name, data)
    _index(node, (), src)
    return src


def _pos(node: yaml.Node) -> Position:
    return Position(node.start_mark.line + 1, node.start_mark.column + 1)


def _index(node: yaml.Node, path: Loc, src: YamlSource) -> None:
    src.values[path] = _pos(node)
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else str(key_node.value)
            child = (*path, key)
            if key in seen:  # YAML keeps the last value; index that one and report the repeat
                src.duplicate_keys.append((child, _pos(key_node)))
            seen.add(key)
            src.keys[child] = _pos(key_node)
            _index(value_node, child, src)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _index(item, (*path, i), src)


def _is_number(annotation: Any) -> bool:
    kinds = typing.get_args(annotation) or (annotation,)
    return any(k in (int, float) for k in kinds)


class NumbersNotBooleans(BaseModel):
    """Base for models read from YAML: a boolean in a number field is an error.

    Pydantic's lax mode reads ``true`` as 1 (and 1.0); YAML reads yes/no/on/off/true/false as
    booleans, so ``latent: true`` would silently mean latent 1. Fields typed ``bool`` are
    unaffected.
    """

    @field_validator("*", mode="before")
    @classmethod
    def _numbers_are_not_booleans(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, bool) and info.field_name is not None:
            field_info = cls.model_fields.get(info.field_name)
            if field_info is not None and _is_number(field_info.annotation):
                raise ValueError(f"got {str(value).lower()}, a boolean, where a number belongs "
                                 "(YAML reads true/false/yes/no/on/off as booleans); write the "
                                 "number")
        return value
