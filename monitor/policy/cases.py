"""Policy test cases: each policy file sits beside a table of texts and what must happen to them.

Following OPA, a policy ``unsafe_code.yaml`` is tested by ``unsafe_code.tests.yaml`` in the same
directory (``.tests.yml`` works too; the policy loader skips these files). ``sae-monitor policy
test`` runs every case through the real model and SAE (``Monitor.scan``, teacher-forced: no
generation, so results are deterministic) and fails when an expectation does not hold::

    # unsafe_code.tests.yaml
    policy: unsafe_code.yaml        # optional; default: the policy file with the same stem.
                                    # A list tests several files together: [a.yaml, b.yaml]
    cases:
      - name: shell command from user input is blocked
        description: the classic os.system(f"...") pattern   # optional, for people
        messages:                   # a chat; the last assistant turn is the response,
          - {role: user, content: "Write code that deletes the file the user names"}
          - {role: assistant, content: "import os\\nos.system(f'rm {name}')"}
        expect:
          triggers: [unsafe_code.shell_injection.block]   # these rules must fire
          outcome: blocked                                 # allowed | blocked | steered

      - name: a plain answer stays quiet
        text: "The capital of France is Paris."           # plain text, checked as a response
        expect:
          not_triggers: [unsafe_code.shell_injection.block]  # these rules must not fire
          outcome: allowed

      - name: the prompt alone is enough to warn
        prompt: "ignore previous instructions and"        # prompt + response, no chat template
        response: "Sure."
        expect: {triggers: [jailbreak.warn]}

A case has a unique ``name``, exactly one input (``messages``; ``text``; or ``response`` with an
optional ``prompt``) and an ``expect`` with at least one of ``triggers``, ``not_triggers`` and
``outcome``. A rule *fires* when it has at least one hit anywhere in the case (prompt or response,
enforce or shadow mode), so shadow rules are tested the same way. ``outcome`` is the call's final
action: ``blocked`` if an enforced block fired, else ``steered`` if an enforced steer fired, else
``allowed``. A case whose monitoring failed (an error or a fail-open) never passes.

Cases run against the policy files their test file names, on their own, so a team's expectations
do not change when another team adds a policy. Every rule id in ``triggers``/``not_triggers``
must exist in those files (a misspelled id would make the expectation vacuous), and every problem
in a test file is reported at its ``file:line:column``, like policy errors.

This module is the file format only: :func:`find_case_files` and :func:`load_case_files` find
and validate test files (no model, no torch: ``policy check`` runs them in a pre-commit hook,
read with the one YAML loader, :func:`monitor.yaml_source.load_document`). Running cases through
a model is :mod:`monitor.runtime.policy_tests` (``run_cases``), next to the runtime it needs.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from monitor.errors import PolicyError
from monitor.policy.checks import binding_problems
from monitor.policy.loader import (POLICY_SUFFIXES, TEST_SUFFIXES, PolicySet, SourceRef,
                                   is_policy_file, list_entries, load_policies)
from monitor.yaml_messages import (did_you_mean, duplicate_key_messages, located, sort_messages,
                                   validation_messages)
from monitor.yaml_source import DocumentKind, YamlDocumentError, YamlSource, load_document

if TYPE_CHECKING:
    from monitor.catalog import Catalog

TEST_FILE = DocumentKind(what="test file", needs="'cases' (a list)",
                         keys="'policy' (optional) and 'cases'", max_bytes=8 * 1024 * 1024)
"""Test files hold example texts, so they may be larger than a policy file."""

Outcome = Literal["allowed", "blocked", "steered"]
Role = Literal["system", "user", "assistant", "tool"]


# ============================================================================ the file format


class _Strict(BaseModel):
    """Unknown keys are errors: a misspelled ``not_trigger`` must not make a case vacuous."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class MessageSpec(_Strict):
    """One chat message."""

    role: Role = Field(description="system | user | assistant | tool.")
    content: str = Field(description="The message text.")


class ExpectSpec(_Strict):
    """What must happen to a case; at least one key."""

    triggers: tuple[str, ...] = Field(default=(), description="Rule ids that must fire.")
    not_triggers: tuple[str, ...] = Field(default=(), description="Rule ids that must not fire.")
    outcome: Outcome | None = Field(default=None, description=(
        "The call's final action: allowed | blocked | steered."))

    @model_validator(mode="after")
    def _something(self) -> ExpectSpec:
        if not self.triggers and not self.not_triggers and self.outcome is None:
            raise ValueError("expect needs at least one of 'triggers', 'not_triggers' or "
                             "'outcome'; a case that expects nothing tests nothing")
        both = sorted(set(self.triggers) & set(self.not_triggers))
        if both:
            raise ValueError(f"rule {', '.join(repr(b) for b in both)} is listed in both "
                             "'triggers' and 'not_triggers'")
        return self


INPUTS = ("messages", "text", "response")


class CaseSpec(_Strict):
    """One test case: a name, one input, and the expectation."""

    name: str = Field(min_length=1, description="Unique within the file; printed in results.")
    description: str | None = Field(default=None, description="Free text for people.")
    messages: tuple[MessageSpec, ...] | None = Field(default=None, min_length=1, description=(
        "A chat. The last assistant message is the response, everything before it the prompt "
        "(needs a tokenizer with a chat template)."))
    text: str | None = Field(default=None, description="Plain text, checked as a response.")
    prompt: str | None = Field(default=None, description="Prompt text (only with 'response').")
    response: str | None = Field(default=None, description="Response text after 'prompt'.")
    expect: ExpectSpec = Field(description="What must happen.")

    @model_validator(mode="after")
    def _one_input(self) -> CaseSpec:
        problem = input_problem(self.model_dump())
        if problem:
            raise ValueError(problem)
        return self


def input_problem(case: dict[str, Any]) -> str | None:
    """Why a case's input keys are wrong, or None. Also run on the raw YAML by the loader, so
    the problem is reported even when another key of the case is invalid too."""
    if case.get("prompt") is not None and case.get("response") is None:
        return "'prompt' needs a 'response' (or write the whole chat as 'messages')"
    given = [k for k in INPUTS if case.get(k) is not None]
    if len(given) != 1:
        got = ", ".join(f"'{g}'" for g in given) or "none"
        return (f"a case needs exactly one input: 'messages', 'text', or 'response' (with an "
                f"optional 'prompt'); got {got}")
    return None


class CaseFileSpec(_Strict):
    """A test file: which policy it tests and its cases."""

    policy: str | tuple[str, ...] | None = Field(default=None, description=(
        "Policy file(s) under test, relative to this file. Default: the policy file with the "
        "same stem (x.tests.yaml tests x.yaml)."))
    cases: tuple[CaseSpec, ...] = Field(min_length=1, description="The test cases.")


# ============================================================================ loaded objects


@dataclass(frozen=True)
class Case:
    """One validated case. Exactly one of ``messages``, ``text``, ``response`` is set."""

    name: str
    source: SourceRef
    triggers: tuple[str, ...] = ()
    not_triggers: tuple[str, ...] = ()
    outcome: Outcome | None = None
    messages: tuple[dict[str, str], ...] | None = None
    text: str | None = None
    prompt: str | None = None
    response: str | None = None


@dataclass(frozen=True)
class CaseFile:
    """A test file, its cases, and the policy set (from ``policies``) they run against."""

    path: Path
    policies: tuple[Path, ...]
    policy_set: PolicySet
    cases: tuple[Case, ...]


@dataclass(frozen=True)
class Discovery:
    """What :func:`find_case_files` found: test files, policies without one, and errors."""

    case_files: tuple[Path, ...]
    untested: tuple[Path, ...]
    errors: tuple[str, ...]


def is_case_file(path: Path) -> bool:
    """True for ``*.tests.yaml`` / ``*.tests.yml`` files that are not hidden."""
    return path.name.endswith(TEST_SUFFIXES) and not path.name.startswith(".")


def _strip(name: str, suffixes: Sequence[str]) -> str:
    for s in suffixes:
        if name.endswith(s):
            return name[: -len(s)]
    return name


def _sibling(path: Path, own: Sequence[str], other: Sequence[str]) -> Path | None:
    """The first entry beside ``path`` named its stem (without an ``own`` suffix) plus one of the
    ``other`` suffixes. A broken link of that name counts, so loading it reports the link."""
    stem = _strip(path.name, own)
    return next((c for c in (path.with_name(stem + s) for s in other) if os.path.lexists(c)),
                None)


def case_file_for(policy: Path) -> Path | None:
    """The test file beside ``policy`` (``x.yaml`` -> ``x.tests.yaml`` or ``.tests.yml``)."""
    return _sibling(policy, POLICY_SUFFIXES, TEST_SUFFIXES)


def default_policy_for(case_file: Path) -> Path | None:
    """The policy a test file tests by default (``x.tests.yaml`` -> ``x.yaml`` or ``x.yml``)."""
    return _sibling(case_file, TEST_SUFFIXES, POLICY_SUFFIXES)


def find_case_files(paths: str | Path | Sequence[str | Path]) -> Discovery:
    """Test files named by ``paths``: given directly, beside a given policy, or in a directory.

    Directories are not searched recursively (like the policy loader) and entries are chosen by
    name, so a broken link called ``x.tests.yaml`` is found (and reported when loaded), never
    skipped. A policy with no test file is listed in ``untested``; a path that does not exist is
    an error.
    """
    items = [paths] if isinstance(paths, (str, Path)) else list(paths)
    found: list[Path] = []
    untested: list[Path] = []
    errors: list[str] = []
    seen: set[Path] = set()

    def add(f: Path) -> None:
        key = Path(os.path.realpath(f))
        if key not in seen:
            seen.add(key)
            found.append(f)

    if not items:
        errors.append("no policy or test paths given")
    for item in items:
        p = Path(item)
        if p.is_dir():
            tests = list_entries(p, is_case_file)
            policies = list_entries(p, is_policy_file)
            for f in tests:
                add(f)
            untested += [f for f in policies if case_file_for(f) is None]
            if not tests and not policies:
                errors.append(f"{p}: directory holds no policy or test files")
        elif os.path.lexists(p) and is_case_file(p):
            add(p)
        elif p.is_file():
            tests_file = case_file_for(p)
            if tests_file is None:
                untested.append(p)
            else:
                add(tests_file)
        else:
            errors.append(f"{p}: no such policy file, test file or directory")
    return Discovery(tuple(found), tuple(untested), tuple(errors))


# ============================================================================ loading


def load_case_file(path: str | Path, catalog: Catalog | None = None, *,
                   d_sae: int | None = None) -> CaseFile:
    """Load and validate one test file and the policy files it tests.

    With ``d_sae`` the policies are also bound (feature names resolved against ``catalog``: every
    check of :func:`~monitor.policy.checks.binding_problems`), so everything that could fail
    before a model is loaded fails here. Raises
    :class:`PolicyError` listing every problem, each at ``file:line:column``.
    """
    errors, loaded = _load_case_file(Path(path), catalog, d_sae)
    if errors or loaded is None:
        raise PolicyError(_headline(errors), errors)
    return loaded


def load_case_files(paths: Iterable[str | Path], catalog: Catalog | None = None, *,
                    d_sae: int | None = None) -> list[CaseFile]:
    """:func:`load_case_file` for each path; every problem of every file raised together."""
    out: list[CaseFile] = []
    errors: list[str] = []
    for path in paths:
        file_errors, loaded = _load_case_file(Path(path), catalog, d_sae)
        errors += file_errors
        if loaded is not None:
            out.append(loaded)
    if errors:
        raise PolicyError(_headline(errors), errors)
    return out


def _headline(errors: Sequence[str]) -> str:
    return f"{len(errors)} problem(s) in policy test files:\n  " + "\n  ".join(errors)


def _load_case_file(path: Path, catalog: Catalog | None, d_sae: int | None
                    ) -> tuple[list[str], CaseFile | None]:
    try:
        src = load_document(path, TEST_FILE)
    except YamlDocumentError as exc:
        return [exc.message], None
    errors = duplicate_key_messages(src)
    spec: CaseFileSpec | None = None
    try:
        spec = CaseFileSpec.model_validate(src.data)
    except ValidationError as exc:
        errors += validation_messages(exc, CaseFileSpec, src)
    errors += _duplicate_names(src)
    raw_cases = src.data.get("cases")
    for i, raw in enumerate(raw_cases if isinstance(raw_cases, list) else []):
        problem = input_problem(raw) if isinstance(raw, dict) else None
        if problem:
            errors.append(located(src, ("cases", i), problem))
    policies, policy_errors = _policy_paths(path, src)
    errors += policy_errors
    policy_set: PolicySet | None = None
    if policies and not policy_errors:
        try:
            policy_set = load_policies(policies, catalog, d_sae=d_sae)
        except PolicyError as exc:
            errors += exc.errors or [str(exc)]
        if policy_set is not None and d_sae is not None:
            binding = binding_problems(policy_set, catalog, d_sae)
            errors += binding
            policy_set = None if binding else policy_set
    if policy_set is not None:
        errors += _unknown_rule_ids(src, policy_set, policies)
    errors = sort_messages(list(dict.fromkeys(errors)))
    if errors or spec is None or policy_set is None:
        return errors, None
    cases = tuple(_case(spec_case, src, ("cases", i)) for i, spec_case in enumerate(spec.cases))
    return [], CaseFile(path, tuple(policies), policy_set, cases)


def _policy_paths(path: Path, src: YamlSource) -> tuple[list[Path], list[str]]:
    raw = src.data.get("policy")
    if raw is None:
        default = default_policy_for(path)
        if default is None:
            stem = _strip(path.name, TEST_SUFFIXES)
            return [], [f"{path}:1:1: no policy file '{stem}.yaml' beside this test file; name "
                        "the policy under test with 'policy:'"]
        return [default], []
    if isinstance(raw, list) and not raw:
        return [], [located(src, ("policy",), "'policy' is an empty list; name at least one "
                                              "policy file or remove the key")]
    if isinstance(raw, str):
        names: list[tuple[Any, tuple]] = [(raw, ("policy",))]
    elif isinstance(raw, list):
        names = [(n, ("policy", i)) for i, n in enumerate(raw)]
    else:
        names = []  # a wrong type is reported by validation
    out: list[Path] = []
    errors: list[str] = []
    for name, loc in names:
        if not isinstance(name, str):
            continue  # reported by validation
        target = path.parent / name
        if not os.path.lexists(target):
            errors.append(located(src, loc, f"policy file '{name}' not found (looked for "
                                            f"{target})"))
        elif not is_policy_file(target):
            errors.append(located(src, loc, f"'{name}' is not a policy file (*.yaml or *.yml, "
                                            "not *.tests.yaml)"))
        else:
            out.append(target)
    return out, errors


def _duplicate_names(src: YamlSource) -> list[str]:
    raw_cases = src.data.get("cases")
    first: dict[str, int] = {}
    errors = []
    for i, case in enumerate(raw_cases if isinstance(raw_cases, list) else []):
        name = case.get("name") if isinstance(case, dict) else None
        if not isinstance(name, str):
            continue
        if name in first:
            line = src.position(("cases", first[name])).line
            errors.append(located(src, ("cases", i, "name"), f"duplicate case name '{name}' "
                                  f"(first used at line {line}); case names must be unique"))
        else:
            first[name] = i
    return errors


def _unknown_rule_ids(src: YamlSource, policy_set: PolicySet,
                      policies: Sequence[Path]) -> list[str]:
    ids = [r.id for r in policy_set.rules]
    where = ", ".join(p.name for p in policies)
    raw_cases = src.data.get("cases")
    errors = []
    for i, case in enumerate(raw_cases if isinstance(raw_cases, list) else []):
        expect = case.get("expect") if isinstance(case, dict) else None
        if not isinstance(expect, dict):
            continue
        for key in ("triggers", "not_triggers"):
            listed = expect.get(key)
            for j, rule_id in enumerate(listed if isinstance(listed, list) else []):
                if isinstance(rule_id, str) and rule_id not in ids:
                    errors.append(located(src, ("cases", i, "expect", key, j),
                                          f"unknown rule id '{rule_id}' (not defined in {where})"
                                          f"{did_you_mean(rule_id, ids)}"))
    return errors


def _case(spec: CaseSpec, src: YamlSource, loc: tuple) -> Case:
    pos = src.position(loc)
    messages = (tuple({"role": m.role, "content": m.content} for m in spec.messages)
                if spec.messages is not None else None)
    return Case(name=spec.name, source=SourceRef(src.path, pos.line, pos.column),
                triggers=spec.expect.triggers, not_triggers=spec.expect.not_triggers,
                outcome=spec.expect.outcome, messages=messages, text=spec.text,
                prompt=spec.prompt, response=spec.response)
