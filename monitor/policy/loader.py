"""Loading policy files into an immutable :class:`PolicySet`, with every error located.

``load_policies`` accepts files and directories. A directory contributes its ``*.yaml`` and
``*.yml`` files (not recursive, sorted by name, hidden files skipped) **except test-case files
named** ``<policy>.tests.yaml`` / ``<policy>.tests.yml``, which sit beside the policy they test
(the OPA convention: each policy next to its own case table).

All problems of all files are collected and raised together as one
:class:`~monitor.errors.PolicyError` (``.errors`` lists them, each ``file:line:column: path:
problem``), never as a traceback and never as a silently empty config: YAML syntax, duplicate
keys, unknown keys (with did-you-mean), wrong types, out-of-range thresholds and windows, empty
``any``/``all``, booleans where numbers belong, duplicate rule ids (within and across files),
enforce rules whose condition cannot be false (:mod:`monitor.policy.checks`), and, when a catalog
is given, unknown feature names (with did-you-mean), relative thresholds on features without
``max_activation`` and probe steering without ``along_direction: true``; with ``d_sae``,
latents out of range.

Files are read with the one YAML loader (:func:`monitor.yaml_source.load_document`): a policy
file over :data:`MAX_POLICY_BYTES`, nesting deeper than ``MAX_DEPTH`` or aliases that expand
beyond ``MAX_ALIAS_NODES`` are refused with ``file:line``. An entry of a policy directory whose
name is a policy file's but that cannot be read (a broken symbolic link, a symlink loop, a FIFO,
a directory, an unreadable file) is an error, never skipped: a reload then keeps the last good
policy (:class:`~monitor.policy.reload.PolicyStore`) instead of silently dropping its rules.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from monitor.errors import PolicyError
from monitor.policy.checks import rule_problems
from monitor.policy.schema import PolicyFile, Rule
from monitor.policy.tree import walk_conditions as walk_conditions  # noqa: F401 - old path
from monitor.yaml_messages import (duplicate_key_messages, located, sort_messages,
                                   validation_messages)
from monitor.yaml_source import (DocumentKind, Loc, SourceRef, YamlDocumentError, YamlSource,
                                 load_document)

if TYPE_CHECKING:
    from monitor.catalog import Catalog

POLICY_SUFFIXES = (".yaml", ".yml")
TEST_SUFFIXES = (".tests.yaml", ".tests.yml")
MAX_POLICY_BYTES = 1024 * 1024
"""Largest policy file accepted (1 MiB: hundreds of rules; a 7 MB file took 45 s and 1.4 GB)."""
POLICY_FILE = DocumentKind(what="policy file", needs="'version' and 'rules'",
                           keys="'version' and 'rules'", max_bytes=MAX_POLICY_BYTES)


@dataclass(frozen=True)
class LoadedFile:
    """One policy file that contributed to a :class:`PolicySet`."""

    path: str
    version: str
    rule_ids: tuple[str, ...]


@dataclass(frozen=True)
class PolicySet:
    """Validated rules from one or more files. Immutable.

    ``rules[i]`` was defined at ``sources[i]``. ``version_id`` is a content hash of the file
    version labels and the normalised rules (not of paths, comments or formatting), so two
    deployments with the same rules report the same id.
    """

    rules: tuple[Rule, ...]
    sources: tuple[SourceRef, ...]
    files: tuple[LoadedFile, ...]
    version_id: str

    @classmethod
    def from_rules(cls, rules: Sequence[Rule], *, version: str = "memory",
                   origin: str = "<memory>") -> PolicySet:
        """A set built in code (tests, generated policies). Raises on duplicate ids."""
        seen: set[str] = set()
        for r in rules:
            if r.id in seen:
                raise PolicyError(f"duplicate rule id '{r.id}'", [f"duplicate rule id '{r.id}'"])
            seen.add(r.id)
        files = (LoadedFile(origin, version, tuple(r.id for r in rules)),)
        sources = tuple(SourceRef(origin, 0, 0) for _ in rules)
        return cls(tuple(rules), sources, files, _version_id(files, rules))

    def rule(self, rule_id: str) -> Rule:
        """The rule with id ``rule_id`` (KeyError if absent)."""
        for r in self.rules:
            if r.id == rule_id:
                return r
        raise KeyError(rule_id)

    def source(self, rule_id: str) -> SourceRef:
        """Where rule ``rule_id`` was defined (KeyError if absent)."""
        for r, s in zip(self.rules, self.sources):
            if r.id == rule_id:
                return s
        raise KeyError(rule_id)


def _version_id(files: Sequence[LoadedFile], rules: Sequence[Rule]) -> str:
    doc = {"versions": [f.version for f in files], "rules": [_hashed(r) for r in rules]}
    blob = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _hashed(rule: Rule) -> dict:
    """The rule as hashed: ``allow_always_true`` and the ``scope_mean`` aggregate only when set,
    so ids from before those keys existed do not change."""
    data = rule.model_dump(mode="json", by_alias=True)
    if not data.get("allow_always_true"):
        data.pop("allow_always_true", None)
    return _without_unset(data, "scope_mean")


def _without_unset(node: Any, key: str) -> Any:
    """``node`` with every ``key: None`` entry removed, at any depth."""
    if isinstance(node, dict):
        return {k: _without_unset(v, key) for k, v in node.items() if not (k == key and v is None)}
    if isinstance(node, list):
        return [_without_unset(v, key) for v in node]
    return node


def policy_files(paths: str | Path | Sequence[str | Path]) -> tuple[list[Path], list[str]]:
    """The policy files named by ``paths`` (files as given, directories expanded) and errors.

    A directory contributes every entry whose *name* is a policy file's, whatever it is on disk,
    so broken links and unreadable entries reach the reader and are reported, not skipped.
    """
    items = [paths] if isinstance(paths, (str, Path)) else list(paths)
    files: list[Path] = []
    errors: list[str] = []
    seen: set[str] = set()
    if not items:
        errors.append("no policy paths given")
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = list_entries(p, is_policy_file)
            if not found:
                errors.append(f"{p}: directory holds no policy files (*.yaml, *.yml; "
                              f"*.tests.yaml are test cases)")
            candidates = found
        elif os.path.lexists(p):
            candidates = [p]  # a file, or something the reader will explain (broken link, FIFO)
        else:
            errors.append(f"{p}: no such policy file or directory")
            candidates = []
        for f in candidates:
            key = os.path.realpath(f)
            if key not in seen:
                seen.add(key)
                files.append(f)
    return files, errors


def list_entries(directory: Path, accept: Callable[[Path], bool]) -> list[Path]:
    """Entries of ``directory`` (not recursive) whose name ``accept`` takes, sorted by name.

    Chosen by name only: a broken symbolic link, a symlink loop or a FIFO called ``x.yaml`` is
    listed, so the reader reports it rather than the scan dropping it.
    """
    return sorted(f for f in directory.iterdir() if accept(f))


def is_policy_file(path: Path) -> bool:
    """True for ``*.yaml``/``*.yml`` files that are not hidden and not ``*.tests.yaml`` cases."""
    name = path.name
    return (name.endswith(POLICY_SUFFIXES) and not name.endswith(TEST_SUFFIXES)
            and not name.startswith("."))


def load_policies(paths: str | Path | Sequence[str | Path], catalog: Catalog | None = None,
                  *, d_sae: int | None = None) -> PolicySet:
    """Load and validate policy files into a :class:`PolicySet`.

    ``catalog`` resolves feature names (without one, names are checked later by
    :func:`~monitor.policy.compile.compile_policies`); ``d_sae`` range-checks raw latents.
    Raises :class:`PolicyError` listing every problem found in every file.
    """
    files, errors = policy_files(paths)
    rules: list[Rule] = []
    sources: list[SourceRef] = []
    loaded: list[LoadedFile] = []
    first_seen: dict[str, SourceRef] = {}
    for path in files:
        file_errors, parsed = _load_file(path, catalog, d_sae)
        errors += sort_messages(file_errors)
        if parsed is None:
            continue
        doc, src, file_sources = parsed
        for i, (rule, ref) in enumerate(zip(doc.rules, file_sources)):
            prior = first_seen.get(rule.id)
            if prior is not None:
                if prior.path != ref.path:  # same-file duplicates are reported by _load_file
                    errors.append(located(src, ("rules", i, "id"),
                                          f"duplicate rule id '{rule.id}': also defined at "
                                          f"{prior}; rule ids must be unique across files"))
                continue
            first_seen[rule.id] = ref
            rules.append(rule)
            sources.append(ref)
        loaded.append(LoadedFile(str(path), doc.version, tuple(r.id for r in doc.rules)))
    if errors:
        head = f"{len(errors)} problem(s) in policy files:\n  " + "\n  ".join(errors)
        raise PolicyError(head, errors)
    return PolicySet(tuple(rules), tuple(sources), tuple(loaded), _version_id(loaded, rules))


def _load_file(path: Path, catalog: Catalog | None, d_sae: int | None
               ) -> tuple[list[str], tuple[PolicyFile, YamlSource, list[SourceRef]] | None]:
    """(errors, parsed) for one file; ``parsed`` is None when the file has any error."""
    try:
        src = load_document(path, POLICY_FILE)
    except YamlDocumentError as exc:
        return [exc.message], None
    errors = duplicate_key_messages(src)
    doc: PolicyFile | None = None
    try:
        doc = PolicyFile.model_validate(src.data)
    except ValidationError as exc:
        errors += validation_messages(exc, PolicyFile, src)
    # Semantic checks on every rule that is valid on its own, so one broken rule does not
    # hide the unknown feature names of the others.
    raw_rules = src.data.get("rules")
    ids: dict[str, int] = {}
    for i, raw in enumerate(raw_rules if isinstance(raw_rules, list) else []):
        loc: Loc = ("rules", i)
        rule_id = raw.get("id") if isinstance(raw, dict) else None
        if isinstance(rule_id, str) and rule_id in ids:
            line = src.position(("rules", ids[rule_id])).line
            errors.append(located(src, (*loc, "id"), f"duplicate rule id '{rule_id}' (first "
                                  f"defined at line {line}); rule ids must be unique"))
        elif isinstance(rule_id, str):
            ids[rule_id] = i
        try:
            rule = Rule.model_validate(raw)
        except ValidationError:
            continue  # already reported above
        errors += [located(src, where, text) for where, text in
                   rule_problems(rule, catalog, d_sae, loc)]
    if errors or doc is None:
        return errors, None
    refs = []
    for i in range(len(doc.rules)):
        pos = src.position(("rules", i))
        refs.append(SourceRef(str(path), pos.line, pos.column))
    return [], (doc, src, refs)
