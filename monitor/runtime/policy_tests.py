"""Running policy test cases through a model: ``sae-monitor policy test`` and its diagnostics.

The case file format (parsing, validation, discovery) is :mod:`monitor.policy.cases`, which needs
no model; this module is the part that does. :func:`run_cases` runs cases on any
:class:`~monitor.runtime.hf.Monitor` (a tiny one in tests) with ``Monitor.scan`` (teacher-forced, so
results are deterministic) and returns one :class:`CaseResult` per case whose ``failures`` say,
in words, which expectation failed and why: the peak activation of a rule's features against its
threshold when it did not fire (thresholds as the compiled policy resolved them,
:attr:`~monitor.policy.CompiledRule.leaves`), the hit count and strongest activation when it
fired but must not.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from monitor.policy.cases import Case
from monitor.policy.compile import compile_policies
from monitor.policy.compiled import CompiledRule, ResolvedLeaf
from monitor.policy.engine import CompiledPolicy
from monitor.policy.loader import PolicySet
from monitor.policy.schema import Rule
from monitor.errors import MonitorUnavailable
from monitor.report import Report
from monitor.runtime.hf import Monitor


def scan_case(monitor: Monitor, case: Case) -> Report:
    """Run ``case``'s input through ``monitor.scan`` (chat, plain text, or prompt + response)."""
    if case.messages is not None:
        return monitor.scan([dict(m) for m in case.messages])
    if case.text is not None:
        return monitor.scan(case.text)
    return monitor.scan(case.response or "", prompt=case.prompt)


@dataclass(frozen=True)
class RuleFiring:
    """How one rule fired in one case: its hits summarised."""

    rule_id: str
    hits: int
    first_scope: str
    first_token: int
    feature: str
    peak: float

    def describe(self) -> str:
        return (f"{self.hits} hit(s), first at {self.first_scope} token {self.first_token}, "
                f"peak {self.feature} = {self.peak:.4g}")


@dataclass(frozen=True)
class CaseResult:
    """The result of one case. ``failures`` holds one sentence per unmet expectation."""

    case: Case
    passed: bool
    failures: tuple[str, ...]
    outcome: str | None
    fired: dict[str, RuleFiring] = field(default_factory=dict)
    error: str | None = None


def run_cases(monitor: Monitor, cases: Iterable[Case], *,
              policy_set: PolicySet | None = None) -> list[CaseResult]:
    """Run each case through ``monitor.scan`` against ``monitor.policy`` and check it.

    ``policy_set`` (the rules behind ``monitor.policy``) is optional; with it, a rule that
    should have fired but did not is explained by the peak activation of each of its features
    against its threshold (one extra scan of that case, with the same model and SAE).
    Never raises for a case: an exception while scanning fails that case with the reason.
    """
    return [_run_case(monitor, case, policy_set) for case in cases]


def _run_case(monitor: Monitor, case: Case, policy_set: PolicySet | None) -> CaseResult:
    try:
        report = scan_case(monitor, case)
    except MonitorUnavailable as exc:
        report = exc.report
    except Exception as exc:  # noqa: BLE001 - a broken case must not stop the others
        reason = f"could not scan the case: {type(exc).__name__}: {exc}"
        if case.messages is not None and "chat template" in str(exc).lower():
            reason += " (this tokenizer has no chat template; use 'text' or 'prompt'/'response')"
        return CaseResult(case, False, (reason,), None, error=reason)
    fired = summarise_hits(report)
    policy: CompiledPolicy = monitor.policy
    known = {r.id: r for r in policy.rules}
    failures: list[str] = []
    if report.error is not None:
        failures.append(f"monitoring failed ({report.outcome}): {report.error}")
    # Explanations need the rules behind the monitor's policy (policy_set), as documented.
    explained = {r.id for r in policy_set.rules} if policy_set is not None else set()
    missing = [known[r] for r in case.triggers if r in known and r not in fired and r in explained]
    peaks = _peaks(monitor, case, missing) if missing else {}
    for rule_id in case.triggers:
        if rule_id not in known:
            failures.append(f"rule '{rule_id}' is not in the policy under test")
        elif rule_id not in fired:
            detail = _why_not(known[rule_id], peaks) if rule_id in explained else ""
            failures.append(f"expected rule '{rule_id}' to fire; it did not{detail}")
    for rule_id in case.not_triggers:
        if rule_id not in known:
            failures.append(f"rule '{rule_id}' is not in the policy under test")
        elif rule_id in fired:
            why = (_threshold_of(known[rule_id], fired[rule_id].feature)
                   if rule_id in explained else "")
            failures.append(f"rule '{rule_id}' fired but must not: {fired[rule_id].describe()}"
                            f"{why}")
    if case.outcome is not None and report.outcome != case.outcome:
        failures.append(f"expected outcome {case.outcome}, got {report.outcome}"
                        f"{_outcome_cause(report)}")
    return CaseResult(case, not failures, tuple(failures), report.outcome, fired, report.error)


def summarise_hits(report: Report) -> dict[str, RuleFiring]:
    """Per rule that fired: hit count, first hit, and the strongest driving activation."""
    out: dict[str, RuleFiring] = {}
    for hit in report.hits:
        prev = out.get(hit.rule_id)
        if prev is None:
            out[hit.rule_id] = RuleFiring(hit.rule_id, 1, hit.scope, hit.token_index,
                                          hit.feature, hit.activation)
            continue
        stronger = hit.activation > prev.peak
        out[hit.rule_id] = RuleFiring(prev.rule_id, prev.hits + 1, prev.first_scope,
                                      prev.first_token,
                                      hit.feature if stronger else prev.feature,
                                      hit.activation if stronger else prev.peak)
    return out


def _outcome_cause(report: Report) -> str:
    if report.blocks:
        first = report.blocks[min(report.blocks)]
        return f" (blocked by rule '{first.rule_id}' at {first.scope} token {first.token_index})"
    if report.steers:
        ids = sorted({d.rule_id for d in report.steers})
        return f" (steered by rule {', '.join(repr(i) for i in ids)})"
    return ""


# ---------------------------------------------------------------------------- diagnostics

_FLOOR = -1e30  # a threshold every finite activation passes


def _threshold_text(leaf: ResolvedLeaf) -> str:
    """The test as written; a relative one with its resolved value (``above_relative 0.5 = 5``)."""
    if leaf.written == "above_relative":
        text = f"above_relative {leaf.written_value:g} = {leaf.threshold:.4g}"
    else:
        text = f"{leaf.written} {leaf.written_value:g}"
    if leaf.aggregate == "window_mean":
        text += f", mean over {leaf.tokens} tokens"
    elif leaf.aggregate == "count_in_window":
        text += f", {leaf.at_least} of {leaf.tokens} tokens"
    elif leaf.aggregate == "consecutive":
        text += f", {leaf.tokens} tokens in a row"
    elif leaf.aggregate == "scope_mean":
        text += f", mean over the whole scope, from {leaf.min_tokens} tokens"
    return text


def _threshold_of(rule: CompiledRule, feature: str) -> str:
    for leaf in rule.leaves:
        if leaf.label == feature:
            return f" (threshold {_threshold_text(leaf)})"
    return ""


@dataclass(frozen=True)
class _Peak:
    high: float
    high_at: tuple[str, int]
    low: float
    low_at: tuple[str, int]


def _peaks(monitor: Monitor, case: Case, rules: Sequence[CompiledRule]
           ) -> dict[tuple[str, str, bool], _Peak]:
    """Max and min activation of every feature the ``rules`` read, per scope, over the case
    (key ``(label, scope, True)``: of the running scope mean, for ``scope_mean`` tests).

    One scan with a shadow policy holding a never-failing test per feature: the same model,
    SAE, token masking and encoder as the real run, so the numbers are the ones the rule saw.
    """
    keys: dict[tuple[str, str, bool], ResolvedLeaf] = {}
    for rule in rules:
        for leaf in rule.leaves:
            keys.setdefault((leaf.label, rule.scope, leaf.aggregate == "scope_mean"), leaf)
    if not keys:
        return {}
    diag_rules, by_id = [], {}
    for n, ((label, scope, mean), leaf) in enumerate(keys.items()):
        rule_id = f"peak.{n}"
        by_id[rule_id] = (label, scope, mean)
        target: dict[str, Any] = ({"feature": leaf.name} if leaf.name is not None
                                  else {"latent": leaf.feature.index})
        if mean:
            target["aggregate"] = {"scope_mean": {"min_tokens": 1}}
        diag_rules.append(Rule.model_validate({
            "id": rule_id, "description": "diagnostic: every activation", "severity": "info",
            "mode": "shadow", "scope": scope, "when": {**target, "above": _FLOOR},
            "actions": ["log"]}))
    try:
        policy = compile_policies(PolicySet.from_rules(diag_rules), monitor.catalog,
                                  d_sae=monitor.sae.cfg.d_sae)
        diag = Monitor(monitor.model, monitor.tokenizer, sae=monitor.sae, policies=policy,
                       catalog=monitor.catalog, on_error="open", self_test=False,
                       include_special_tokens=monitor.include_special_tokens)
    except Exception:  # noqa: BLE001 - diagnostics are best effort
        return {}
    try:
        report = scan_case(diag, case)
    except Exception:  # noqa: BLE001
        return {}
    finally:
        diag.close()
    peaks: dict[tuple[str, str, bool], _Peak] = {}
    for hit in report.hits:
        key = by_id[hit.rule_id]
        at = (hit.scope, hit.token_index)
        prev = peaks.get(key)
        if prev is None:
            peaks[key] = _Peak(hit.activation, at, hit.activation, at)
        else:
            high = hit.activation > prev.high
            low = hit.activation < prev.low
            peaks[key] = _Peak(hit.activation if high else prev.high, at if high else prev.high_at,
                               hit.activation if low else prev.low, at if low else prev.low_at)
    return peaks


def _why_not(rule: CompiledRule, peaks: dict[tuple[str, str, bool], _Peak]) -> str:
    parts = []
    seen: set[tuple[str, bool]] = set()
    for leaf in rule.leaves:
        mean = leaf.aggregate == "scope_mean"
        if (leaf.label, mean) in seen:
            continue
        seen.add((leaf.label, mean))
        peak = peaks.get((leaf.label, rule.scope, mean))
        threshold = _threshold_text(leaf)
        if peak is not None and mean:
            parts.append(f"{leaf.label} scope mean peaked at {peak.high:.4g} at {peak.high_at[0]} "
                         f"token {peak.high_at[1]}, lowest {peak.low:.4g} (threshold {threshold})")
            continue
        if peak is None:
            parts.append(f"{leaf.label}: no monitored tokens in scope '{rule.scope}' "
                         f"(threshold {threshold})")
        elif leaf.written == "below":
            parts.append(f"{leaf.label} lowest {peak.low:.4g} at {peak.low_at[0]} token "
                         f"{peak.low_at[1]} (threshold {threshold})")
        else:
            parts.append(f"{leaf.label} peaked at {peak.high:.4g} at {peak.high_at[0]} token "
                         f"{peak.high_at[1]} (threshold {threshold})")
    return ": " + "; ".join(parts) if parts else ""
