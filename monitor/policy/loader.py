"""Loading policy files into an immutable :class:`PolicySet`, with every error located.

``load_policies`` accepts files and directories. A directory contributes its ``*.yaml`` and
``*.yml`` files (not recursive, sorted by name, hidden files skipped) **except test-case files
named** ``<policy>.tests.yaml`` / ``<policy>.tests.yml``, which sit beside the policy they test
(the OPA convention: each policy next to its own case table).

All problems of all files are collected and raised together as one
:class:`~monitor.errors.PolicyError` (``.errors`` lists them, each ``file:line:column: path:
problem``), never as a traceback and never as a silently empty config: YAML syntax, duplicate
keys, unknown keys (with did-you-mean), wrong types, out-of-range thresholds and windows, empty
``any``/``all``, duplicate rule ids (within and across files), and, when a catalog is given,
unknown feature names (with did-you-mean), relative thresholds on features without
``max_activation`` and probe steering without ``along_direction: true``; with ``d_sae``,
latents out of range.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from monitor.catalog import Catalog
from monitor.errors import PolicyError
from monitor.policy.schema import AllOf, AnyOf, Leaf, Not, PolicyFile, Rule, Steer
from monitor.yaml_source import (Loc, YamlSource, YamlSyntaxError, duplicate_key_messages,
                                 located, parse_yaml, sort_messages, validation_messages)

POLICY_SUFFIXES = (".yaml", ".yml")
TEST_SUFFIXES = (".tests.yaml", ".tests.yml")


@dataclass(frozen=True)
class SourceRef:
    """Where something was defined: ``path:line:column`` (1-based)."""

    path: str
    line: int
    column: int

    def __str__(self) -> str:
        return f"{self.path}:{self.line}:{self.column}"


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
    doc = {"versions": [f.version for f in files],
           "rules": [r.model_dump(mode="json", by_alias=True) for r in rules]}
    blob = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def policy_files(paths: str | Path | Sequence[str | Path]) -> tuple[list[Path], list[str]]:
    """The policy files named by ``paths`` (files as given, directories expanded) and errors."""
    items = [paths] if isinstance(paths, (str, Path)) else list(paths)
    files: list[Path] = []
    errors: list[str] = []
    seen: set[Path] = set()
    if not items:
        errors.append("no policy paths given")
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.is_file() and is_policy_file(f))
            if not found:
                errors.append(f"{p}: directory holds no policy files (*.yaml, *.yml; "
                              f"*.tests.yaml are test cases)")
            candidates = found
        elif p.is_file():
            candidates = [p]
        else:
            errors.append(f"{p}: no such policy file or directory")
            candidates = []
        for f in candidates:
            key = f.resolve()
            if key not in seen:
                seen.add(key)
                files.append(f)
    return files, errors


def is_policy_file(path: Path) -> bool:
    """True for ``*.yaml``/``*.yml`` files that are not hidden and not ``*.tests.yaml`` cases."""
    name = path.name
    return (name.endswith(POLICY_SUFFIXES) and not name.endswith(TEST_SUFFIXES)
            and not name.startswith("."))


def load_policies(paths: str | Path | Sequence[str | Path], catalog: Catalog | None = None,
                  *, d_sae: int | None = None) -> PolicySet:
    """Load and validate policy files into a :class:`PolicySet`.

    ``catalog`` resolves feature names (without one, names are checked later by
    :func:`~monitor.policy.engine.compile_policies`); ``d_sae`` range-checks raw latents.
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
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        return [f"{path}: cannot read policy file: {exc}"], None
    try:
        src = parse_yaml(text, path)
    except YamlSyntaxError as exc:
        return [exc.message], None
    if src.data is None:
        return [f"{path}:1:1: the file is empty; a policy file needs 'version' and 'rules'"], None
    if not isinstance(src.data, dict):
        return [f"{src.where(())}: a policy file must be a mapping with keys 'version' and "
                f"'rules', not a {type(src.data).__name__}"], None
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


# -------------------------------------------------------------------------------- semantics


def walk_conditions(cond: Leaf | AnyOf | AllOf | Not, loc: Loc) -> Iterator[tuple[Loc, Leaf]]:
    """Every feature test in ``cond`` with its path in the YAML data."""
    if isinstance(cond, Leaf):
        yield loc, cond
    elif isinstance(cond, AnyOf):
        for i, c in enumerate(cond.any):
            yield from walk_conditions(c, (*loc, "any", i))
    elif isinstance(cond, AllOf):
        for i, c in enumerate(cond.all):
            yield from walk_conditions(c, (*loc, "all", i))
    else:
        yield from walk_conditions(cond.not_, (*loc, "not"))


def rule_problems(rule: Rule, catalog: Catalog | None, d_sae: int | None,
                  loc: Loc = ()) -> list[tuple[Loc, str]]:
    """Problems that need the catalog or the SAE width, as ``(path, text)`` pairs.

    Feature names are only checked when ``catalog`` is given, latent ranges only with
    ``d_sae``. Shared by the loader (which has YAML positions) and the compiler.
    """
    out: list[tuple[Loc, str]] = []
    for where, leaf in walk_conditions(rule.when, (*loc, "when")):
        out += _target_problems(leaf.feature, leaf.latent, catalog, d_sae, where)
        if leaf.above_relative is not None and catalog is not None:
            entry = catalog.find(leaf.feature or "")
            if entry is not None and entry.max_activation is None:
                out.append(((*where, "above_relative"), f"feature '{entry.name}' has no "
                            "max_activation in the catalog; use an absolute 'above' or add "
                            "max_activation to the catalog"))
    for i, action in enumerate(rule.actions):
        if action.steer is not None:
            out += _steer_problems(action.steer, catalog, d_sae, (*loc, "actions", i, "steer"))
    return out


def _target_problems(feature: str | None, latent: int | None, catalog: Catalog | None,
                     d_sae: int | None, where: Loc) -> list[tuple[Loc, str]]:
    out: list[tuple[Loc, str]] = []
    if feature is not None and catalog is not None:
        entry = catalog.find(feature)
        if entry is None:
            close = catalog.suggest(feature)
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            out.append(((*where, "feature"), f"unknown feature '{feature}' (not in catalog for "
                                             f"SAE '{catalog.sae}'){hint}"))
        elif entry.latent is not None and d_sae is not None and entry.latent >= d_sae:
            out.append(((*where, "feature"), f"feature '{feature}' is latent {entry.latent} in "
                        f"the catalog, out of range for an SAE with {d_sae} latents"))
    if latent is not None and d_sae is not None and latent >= d_sae:
        out.append(((*where, "latent"), f"latent {latent} is out of range for an SAE with "
                                        f"{d_sae} latents (valid: 0..{d_sae - 1})"))
    return out


def _steer_problems(steer: Steer, catalog: Catalog | None, d_sae: int | None,
                    where: Loc) -> list[tuple[Loc, str]]:
    out = _target_problems(steer.feature, steer.latent, catalog, d_sae, where)
    entry = catalog.find(steer.feature) if catalog is not None and steer.feature else None
    if entry is None:
        return out
    if entry.probe is not None and not steer.along_direction:
        out.append(((*where, "feature"), f"feature '{entry.name}' is a linear probe, not an SAE "
                    "latent; steering it moves the residual along the probe direction. Add "
                    "'along_direction: true' to confirm"))
    if steer.clamp_relative is not None and entry.max_activation is None:
        out.append(((*where, "clamp_relative"), f"feature '{entry.name}' has no max_activation "
                    "in the catalog; use an absolute 'clamp' or add max_activation"))
    return out
