"""``sae-monitor policy check`` and ``sae-monitor policy test``: policies in a team's CI.

``policy check PATH...`` validates policy files and directories, and the test files beside them
(see :mod:`monitor.policy.cases`), against the feature catalog and the width of an SAE. It reads
only the SAE's ``cfg.json`` (or a safetensors header), never a model or SAE weights, so it is fast
enough for a pre-commit hook. Valid: prints the rules as a table, exit 0. Invalid: prints every
problem as ``file:line:column: message`` (never a traceback), exit 1.

``policy test PATH...`` finds the test files for the given policies (``x.yaml`` ->
``x.tests.yaml``; directories and test files work too), runs every case through the real model
and SAE with ``Monitor.scan`` and prints ``PASS``/``FAIL`` per case with the reasons, then
``N passed, M failed``. Exit 0 when all pass, 1 when any case fails, 2 when nothing could run
(invalid files, no test cases, a model or SAE that does not load or fit).

The command functions take plain arguments and output streams and return the exit status, so
they are tested without a subprocess; :func:`add_parser` registers both under ``policy``.
Policy, catalog and model code is imported inside the functions: ``policy check`` runs in
pre-commit hooks and ``policy test --help`` should answer at once.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from monitor.cli.common import Parents, Subparsers
from monitor.errors import CatalogError, MonitorError, PolicyError, SAEFormatError
from monitor.shipped import SHIPPED_CATALOG, SHIPPED_SAES

if TYPE_CHECKING:
    from monitor.catalog import Catalog
    from monitor.policy.cases import CaseFile
    from monitor.runtime.policy_tests import CaseResult
    from monitor.policy.loader import PolicySet
    from monitor.policy.schema import Rule

# ============================================================================ argparse


def add_parser(subparsers: Subparsers, parents: Parents) -> None:
    """Register ``policy check`` and ``policy test``."""
    policy = subparsers.add_parser("policy", help="validate policy files and run their test cases")
    commands = policy.add_subparsers(dest="policy_command", metavar="COMMAND", required=True)

    check = commands.add_parser(
        "check", help="validate policy files (and their *.tests.yaml) without loading a model",
        description="Validate policy files and directories, and the test files beside them, "
                    "against the SAE's catalog and width. Exit 0 if valid, 1 otherwise.")
    check.add_argument("paths", nargs="+", metavar="PATH",
                       help="policy files, directories, or *.tests.yaml files")
    check.add_argument("--sae", default="default", help=(
        "SAE whose width bounds raw latents: 'default', an SAE directory, or 'none' to skip "
        "(only its cfg.json is read)"))
    check.add_argument("--catalog", default=None, help=(
        "feature catalog resolving feature names (default: the shipped catalog with "
        "--sae default)"))
    check.set_defaults(func=cmd_check)

    test = commands.add_parser(
        "test", parents=[parents.model, parents.sae, parents.catalog],
        help="run each policy's *.tests.yaml cases through the model and SAE",
        description="Run test cases through the real model and SAE. Exit 0 if all pass, "
                    "1 if any fails, 2 if they could not run.")
    test.add_argument("paths", nargs="+", metavar="PATH",
                      help="policy files (their x.tests.yaml is used), directories or test files")
    test.add_argument("-v", "--verbose", action="store_true",
                      help="also show which rules fired in passing cases")
    test.set_defaults(func=cmd_test)


def cmd_check(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """``sae-monitor policy check``."""
    return check_policies(args.paths, sae=args.sae, catalog=args.catalog, out=out, err=err)


def cmd_test(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """``sae-monitor policy test``."""
    return run_policy_tests(args.paths, model=args.model, sae=args.sae, catalog=args.catalog,
                            verbose=args.verbose, out=out, err=err)


# ============================================================================ SAE and catalog

# The SAE file names sae_width reads (monitor.sae.SAELENS_CFG and SPARSIFY_WEIGHTS, spelled
# here because monitor.sae imports torch; tests/cli/test_policy.py checks they agree).
SAELENS_CFG = "cfg.json"
SPARSIFY_WEIGHTS = "sae.safetensors"
SHIPPED_DIR = SHIPPED_SAES


def sae_width(sae: str | Path) -> int | None:
    """``d_sae`` of an SAE (``"default"``, a directory, or ``"none"`` -> None), reading no weights
    when the layout allows: SAELens ``cfg.json``, else the sparsify safetensors header; only
    other layouts (Gemma Scope ``params.npz``) are loaded in full (and only they import torch)."""
    name = str(sae)
    if name.lower() == "none":
        return None
    shipped = SHIPPED_DIR / name
    path = shipped if "/" not in name and shipped.is_dir() else Path(name)
    if name == "default" and not shipped.is_dir():
        raise SAEFormatError(f"the shipped default SAE is missing from {shipped}; reinstall "
                             "sae-monitor (pip install -e .), pass --sae PATH, or --sae none")
    if path.is_dir() and (path / SAELENS_CFG).is_file():
        try:
            raw = json.loads((path / SAELENS_CFG).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise SAEFormatError(f"{path / SAELENS_CFG}: not readable JSON: {exc}") from None
        d_sae = raw.get("d_sae") if isinstance(raw, dict) else None
        if isinstance(d_sae, int) and not isinstance(d_sae, bool) and d_sae > 0:
            return d_sae
    if path.is_dir() and (path / SPARSIFY_WEIGHTS).is_file():
        from safetensors import safe_open

        try:
            with safe_open(str(path / SPARSIFY_WEIGHTS), "numpy") as f:
                return int(f.get_slice("encoder.weight").get_shape()[0])
        except Exception as exc:  # noqa: BLE001 - safetensors has its own error types
            raise SAEFormatError(f"{path / SPARSIFY_WEIGHTS}: cannot read the width of "
                                 f"'encoder.weight': {exc}") from None
    from monitor.sae import load_sae

    return load_sae(sae).cfg.d_sae


def resolve_catalog(sae: str | Path, catalog: str | Path | None, d_sae: int | None
                    ) -> Catalog | None:
    """The catalog given, else the shipped one for ``--sae default`` (as ``monitor.wrap`` does)."""
    from monitor.catalog import load_catalog

    if catalog is not None:
        return load_catalog(catalog, d_sae=d_sae)
    if str(sae) == "default" and SHIPPED_CATALOG.is_file():
        return load_catalog(SHIPPED_CATALOG, d_sae=d_sae)
    return None


def _error_lines(exc: MonitorError) -> list[str]:
    """Every located problem of an error, one per line (the headline dropped when it has any)."""
    errors = getattr(exc, "errors", None)
    if errors:
        return list(errors)
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    if isinstance(exc, CatalogError) and len(lines) > 1:
        return lines[1:]
    return lines


def _unique(items: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(items))


# ============================================================================ check


def check_policies(paths: Sequence[str | Path], *, sae: str | Path = "default",
                   catalog: str | Path | None = None, out: TextIO | None = None,
                   err: TextIO | None = None) -> int:
    """``policy check``: 0 and a table of rules when everything is valid, else 1 and every
    problem as ``file:line:column: message`` on ``err``."""
    from monitor.policy.cases import find_case_files, is_case_file, load_case_files
    from monitor.policy.loader import load_policies

    out = out or sys.stdout
    err = err or sys.stderr
    try:
        d_sae = sae_width(sae)
        cat = resolve_catalog(sae, catalog, d_sae)
    except MonitorError as exc:
        return _fail(err, _error_lines(exc), status=1)
    test_paths = [Path(p) for p in paths if is_case_file(Path(p))]
    policy_paths = [Path(p) for p in paths if not is_case_file(Path(p))]
    errors: list[str] = []
    policy_set: PolicySet | None = None
    if policy_paths:
        try:
            policy_set = load_policies(policy_paths, cat, d_sae=d_sae)
            errors += _binding_errors(policy_set, cat)
        except PolicyError as exc:
            errors += _error_lines(exc)
    errors += [f"{p}: no such test file" for p in test_paths if not p.is_file()]
    found = find_case_files([p for p in [*policy_paths, *test_paths] if p.exists()])
    case_files: list[CaseFile] = []
    try:
        case_files = load_case_files(found.case_files, cat, d_sae=d_sae)
    except PolicyError as exc:
        errors += _error_lines(exc)
    if errors:
        return _fail(err, _unique(errors), status=1)
    if policy_set is not None:
        _print_rules(out, policy_set)
    n_rules = len(policy_set.rules) if policy_set is not None else 0
    n_files = len(policy_set.files) if policy_set is not None else 0
    n_cases = sum(len(f.cases) for f in case_files)
    version = f", version {policy_set.version_id}" if policy_set is not None else ""
    print(f"OK: {n_rules} rule(s) in {n_files} policy file(s){version}; {n_cases} test case(s) "
          f"in {len(case_files)} test file(s)", file=out)
    return 0


def _binding_errors(policy_set: PolicySet, catalog: Catalog | None) -> list[str]:
    """What compiling would reject beyond the loader's checks: feature names without a catalog.

    The loader already checked names against the catalog and latents against ``d_sae`` (the
    rest of what :func:`~monitor.policy.compile_policies` rejects), so check does not compile
    and does not import torch."""
    if catalog is not None:
        return []
    errors = []
    for rule, source in zip(policy_set.rules, policy_set.sources):
        names = [n for n in _features(rule) if not n.startswith("latent:")]
        if names:
            errors.append(f"{source}: rule '{rule.id}': uses feature names ({', '.join(names)}) "
                          "but no catalog was given to resolve them; pass --catalog")
    return errors


def _features(rule: Rule) -> list[str]:
    """Labels of every column a rule reads or steers, in order, without repeats."""
    from monitor.policy.tree import walk_conditions

    labels = [leaf.label for _, leaf in walk_conditions(rule.when, ())]
    for action in rule.actions:
        if action.steer is not None:
            s = action.steer
            labels.append(s.feature if s.feature is not None else f"latent:{s.latent}")
    return _unique(labels)


def _print_rules(out: TextIO, policy_set: PolicySet) -> None:
    header = ("RULE", "SCOPE", "FEATURES", "ACTIONS", "MODE")
    rows = [(r.id, r.scope, ", ".join(_features(r)), ", ".join(a.kind for a in r.actions),
             r.mode) for r in policy_set.rules]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header) - 1)]
    for row in [header, *rows]:
        cells = [cell.ljust(w) for cell, w in zip(row, widths)] + [row[-1]]
        print("  ".join(cells), file=out)


def _fail(err: TextIO, lines: Sequence[str], *, status: int) -> int:
    for line in lines:
        print(line, file=err)
    if len(lines) > 1:
        print(f"{len(lines)} problems", file=err)
    return status


# ============================================================================ test


def run_policy_tests(paths: Sequence[str | Path], *, model: str | Path = "default",
                     sae: str | Path = "default", catalog: str | Path | None = None,
                     verbose: bool = False, out: TextIO | None = None, err: TextIO | None = None,
                     **monitor_options: Any) -> int:
    """``policy test``: run every case of the test files for ``paths`` and print the results.

    Files are validated before the model loads, so a typo costs no model load.
    ``monitor_options`` go to :class:`~monitor.runtime.hf.Monitor` (``self_test=False`` in tests
    with random weights). Returns 0 (all passed), 1 (a case failed) or 2 (could not run).
    """
    from monitor.policy.cases import find_case_files, load_case_files

    out = out or sys.stdout
    err = err or sys.stderr
    found = find_case_files(paths)
    if found.errors:
        return _fail(err, list(found.errors), status=2)
    for policy in found.untested:
        print(f"note: {policy} has no test file ({policy.name.rsplit('.', 1)[0]}.tests.yaml)",
              file=out)
    if not found.case_files:
        return _fail(err, ["no test cases found: a policy x.yaml is tested by x.tests.yaml "
                           "beside it"], status=2)
    try:
        d_sae = sae_width(sae)
        if d_sae is None:
            raise SAEFormatError("policy test runs the real SAE; --sae none is only for check")
        cat = resolve_catalog(sae, catalog, d_sae)
        case_files = load_case_files(found.case_files, cat, d_sae=d_sae)
    except MonitorError as exc:
        return _fail(err, _error_lines(exc), status=2)
    try:
        results = _run_files(case_files, model, sae, cat, d_sae, verbose, out, monitor_options)
    except MonitorError as exc:
        return _fail(err, _error_lines(exc), status=2)
    failed = sum(not r.passed for r in results)
    print(f"\n{len(results) - failed} passed, {failed} failed", file=out)
    return 1 if failed else 0


def _run_files(case_files: Sequence[CaseFile], model_name: str | Path, sae_name: str | Path,
               catalog: Catalog | None, d_sae: int, verbose: bool, out: TextIO,
               options: dict[str, Any]) -> list[CaseResult]:
    from monitor.models import load_model
    from monitor.policy.compile import compile_policies
    from monitor.runtime.policy_tests import run_cases
    from monitor.sae import load_sae
    from monitor.runtime.hf import Monitor

    model, tokenizer = load_model(str(model_name))
    sae = load_sae(sae_name)
    self_test = options.pop("self_test", True)
    results: list[CaseResult] = []
    for n, case_file in enumerate(case_files):
        policy = compile_policies(case_file.policy_set, catalog, d_sae=d_sae)
        # The SAE's fit to the model is checked once; later monitors reuse the same pair.
        monitor = Monitor(model, tokenizer, sae=sae, policies=policy, catalog=catalog,
                          self_test=self_test and n == 0, **options)
        try:
            file_results = run_cases(monitor, case_file.cases, policy_set=case_file.policy_set)
        finally:
            monitor.close()
        _print_file(out, case_file, file_results, verbose)
        results += file_results
    return results


def _print_file(out: TextIO, case_file: CaseFile, results: Sequence[CaseResult],
                verbose: bool) -> None:
    names = ", ".join(p.name for p in case_file.policies)
    print(f"{case_file.path} (policy: {names})", file=out)
    for r in results:
        if r.passed:
            print(f"  PASS  {r.case.name}", file=out)
            if verbose:
                fired = "; ".join(f"{f.rule_id}: {f.describe()}" for f in r.fired.values())
                print(f"          outcome {r.outcome}; fired: {fired or 'nothing'}", file=out)
            continue
        print(f"  FAIL  {r.case.name}  ({r.case.source})", file=out)
        for reason in r.failures:
            print(f"          - {reason}", file=out)
