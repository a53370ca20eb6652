"""How well do the policies detect what they are for? (``sae-monitor eval``)

Every item of a labeled file goes through :meth:`Monitor.scan`, the production path: the same
tokenisation, masks, SAE encoder and policy engine as live generation. Per data category the
harness reports

* **AUROC and TPR at 1% / 5% FPR of a continuous policy score** (below), computed over the
  enforce and shadow rules that belong to the category;
* **precision and recall of the decisions the enforce rules actually took**: an item counts as
  flagged when an enforce rule of the category fired on a token of the item's scope (a block
  is such a firing). Shadow rules' firings are reported the same way on their own row;
* with a training file, the same measures for the baselines of :mod:`monitor.baselines`.

Which rules belong to a category: a rule whose id is the category or starts with
``<category>.``; otherwise one that reads a catalog feature named ``<category>.*``.

The continuous score. A rule only says fired / did not fire, and AUROC needs a ranking. For
each rule, its *evidence leaves* are the feature tests that ask for a value **above** a
threshold (``above`` or ``above_relative``) and are not inside a ``not``. Per item, a leaf's
score is its relative margin at the item's peak, ``(peak - threshold) / |threshold|`` (the
margin the engine uses to name a hit's driving feature), where ``peak`` is the feature's
maximum over the item's scoped tokens (``Report.peaks["response"]``). A rule's score is the max
over its evidence leaves, the category's score the max over its rules. So a score > 0 means
some evidence feature crossed its threshold somewhere in scope; when a rule fires on an
evidence leaf, its score is > 0. Guards (``not``, ``below``) and aggregations (windows, runs)
can only stop a rule from firing and are ignored by the score: they enter the decision rows.
Rules without evidence leaves count for decisions only.

Scope. ``Monitor.scan(text, prompt=...)`` monitors ``prompt`` and ``text`` as the prompt and
response scopes; the score reads only the response scope, so each item is cut so that its
response is what the label is about:

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

Long items are cut to ``context_chars`` of text before the scope and ``scope_chars`` of scope
(counted in the notes). An enforce rule that blocks on the prompt stops the row before its
response is evaluated, as in deployment; such items have no scored token and are counted.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from monitor import baselines
from monitor.data import read_jsonl
from monitor.discover import labeled_item
from monitor.errors import DataError, MonitorError
from monitor.policy import CompiledPolicy, PolicySet
from monitor.policy.schema import AllOf, AnyOf, Leaf, Not
from monitor.stats import auroc, precision_recall, tpr_at_fpr

FPR_POINTS = (0.01, 0.05)


# ============================================================================ items


@dataclass(frozen=True)
class EvalItem:
    """One labeled item, cut for :meth:`Monitor.scan` (see the module docstring).

    ``scan(transcript, prompt=prompt)`` evaluates it; its response scope is what counts.
    ``code``/``code_lines`` are for line-based baselines (bandit): the code text and the
    1-based lines in scope (empty: all).
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


def _line_numbers(text: str, spans: Iterable[tuple[int, int]]) -> tuple[int, ...]:
    lines: set[int] = set()
    for start, end in spans:
        first = text.count("\n", 0, start) + 1
        last = text.count("\n", 0, max(start, end - 1)) + 1
        lines.update(range(first, last + 1))
    return tuple(sorted(lines))


def eval_item(row: Mapping[str, Any], tokenizer: Any = None, *, context_chars: int = 2000,
              scope_chars: int = 4000, source: str = "") -> EvalItem:
    """Build an :class:`EvalItem` from a row of the labeled-data format."""
    if "label" not in row:
        raise DataError(f"{source}: row has no 'label'")
    label = int(row["label"])
    if label not in (0, 1):
        raise DataError(f"{source}: label must be 0 or 1, got {row['label']!r}")
    category = str(row.get("category") or "uncategorised")
    ident = str(row.get("id", source))
    language = row.get("language")
    messages = row.get("messages")
    if (isinstance(messages, list) and messages and messages[-1].get("role") == "assistant"
            and not row.get("changed_lines") and getattr(tokenizer, "chat_template", None)):
        return EvalItem(label, category, tuple(dict(m) for m in messages), None, ident, language)
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
                    truncated, widened)


def load_eval_items(path: str | Path, tokenizer: Any = None, *, limit: int | None = None,
                    **options: Any) -> list[EvalItem]:
    """Items of a labeled JSONL file (first ``limit`` rows); options as :func:`eval_item`."""
    items = []
    for lineno, row in enumerate(read_jsonl(path), 1):
        if limit and len(items) >= limit:
            break
        items.append(eval_item(row, tokenizer, source=f"{path}:{lineno}", **options))
    if not items:
        raise DataError(f"{path}: no rows")
    return items


# ============================================================================ scoring


def _conditions(policy: CompiledPolicy, policy_set: PolicySet | None) -> list[Any]:
    """The ``when`` condition of each compiled rule, in rule order."""
    if policy_set is not None:
        if policy_set.version_id != policy.version_id:
            raise MonitorError(f"the policy set given (version {policy_set.version_id}) is not the one the "
                               f"monitor runs (version {policy.version_id})")
        return [policy_set.rule(r.id).when for r in policy.rules]
    whens = [getattr(r, "when", None) for r in policy.rules]
    if any(w is None for w in whens):
        raise MonitorError("evaluate needs the rules' conditions: pass policy_set= (the PolicySet "
                           "the monitor's policy was compiled from, e.g. load_policies(DIR))")
    return whens


def _evidence_leaves(cond: Any, negated: bool = False) -> list[Leaf]:
    if isinstance(cond, Leaf):
        return [cond] if not negated and cond.below is None else []
    if isinstance(cond, Not):
        return _evidence_leaves(cond.not_, not negated)
    if isinstance(cond, (AnyOf, AllOf)):
        kids = cond.any if isinstance(cond, AnyOf) else cond.all
        return [leaf for kid in kids for leaf in _evidence_leaves(kid, negated)]
    return []


def _all_leaves(cond: Any) -> list[Leaf]:
    if isinstance(cond, Leaf):
        return [cond]
    if isinstance(cond, Not):
        return _all_leaves(cond.not_)
    kids = cond.any if isinstance(cond, AnyOf) else cond.all
    return [leaf for kid in kids for leaf in _all_leaves(kid)]


class RuleScorer:
    """Turns a report's per-feature peaks into one continuous score per rule (vectorised).

    ``scores(peaks)`` takes ``peaks[F]`` (columns of ``policy.features``) and returns ``[R]``:
    per rule the max relative margin of its evidence leaves, ``-inf`` for rules without
    evidence leaves or without scoped tokens.
    """

    def __init__(self, policy: CompiledPolicy, conditions: Sequence[Any], catalog: Any = None) -> None:
        column = {}
        for c, ref in enumerate(policy.features):
            column[(ref.kind, ref.index if ref.kind == "latent" else ref.name)] = c
        cols, thrs, owners = [], [], []
        self.evidence_rules: set[int] = set()
        for r, cond in enumerate(conditions):
            for leaf in _evidence_leaves(cond):
                if leaf.latent is not None:
                    key: tuple = ("latent", leaf.latent)
                else:
                    entry = catalog.get(leaf.feature)
                    key = ("latent", entry.latent) if entry.latent is not None else ("probe", leaf.feature)
                if leaf.above is not None:
                    thr = float(leaf.above)
                else:
                    thr = float(leaf.above_relative) * float(catalog.get(leaf.feature).max_activation)
                cols.append(column[key])
                thrs.append(thr)
                owners.append(r)
                self.evidence_rules.add(r)
        self.n_rules = len(conditions)
        self.cols = torch.tensor(cols, dtype=torch.long)
        self.thr = torch.tensor(thrs, dtype=torch.float64)
        self.owner = torch.tensor(owners, dtype=torch.long)

    def scores(self, peaks: torch.Tensor | None) -> torch.Tensor:
        out = torch.full((self.n_rules,), -math.inf, dtype=torch.float64)
        if peaks is None or not len(self.cols):
            return out
        value = peaks.double()[self.cols]
        margin = (value - self.thr) / self.thr.abs().clamp(min=1e-6)
        margin = torch.where(torch.isfinite(value), margin, torch.full_like(margin, -math.inf))
        return out.scatter_reduce(0, self.owner, margin, reduce="amax", include_self=True)


def rule_categories(policy: CompiledPolicy, conditions: Sequence[Any], categories: Iterable[str]
                    ) -> dict[str, list[int]]:
    """Rule indices per category (see the module docstring)."""
    cats = set(categories)
    out: dict[str, list[int]] = {c: [] for c in sorted(cats)}
    for r, (rule, cond) in enumerate(zip(policy.rules, conditions)):
        by_id = [c for c in cats if rule.id == c or rule.id.startswith(c + ".")]
        if by_id:
            chosen = {max(by_id, key=len)}
        else:
            chosen = {c for leaf in _all_leaves(cond) if leaf.feature for c in cats
                      if leaf.feature.startswith(c + ".")}
        for c in chosen:
            out[c].append(r)
    return out


# ============================================================================ results


@dataclass(frozen=True)
class Measures:
    """Detection measures of one scorer on one category; None where undefined."""

    scorer: str
    n: int
    positives: int
    negatives: int
    auroc: float | None
    tpr_at_1pct_fpr: float | None
    tpr_at_5pct_fpr: float | None
    decision: str
    flagged: int
    precision: float | None
    recall: float | None


@dataclass(frozen=True)
class CategoryResult:
    category: str
    items: int
    positives: int
    rules: tuple[str, ...]
    measures: tuple[Measures, ...]
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class ItemResult:
    """One scanned item: its category score, the enforce/shadow decisions in scope, a block."""

    id: str
    category: str
    label: int
    score: float
    flagged: bool
    shadow_flagged: bool
    blocked: bool
    scored_tokens: int
    error: str | None = None
    feature_peaks: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class EvalResult:
    policy_version: str
    n_items: int
    categories: tuple[CategoryResult, ...]
    items: tuple[ItemResult, ...] = ()
    notes: tuple[str, ...] = ()

    def to_dict(self, *, items: bool = False) -> dict[str, Any]:
        """Plain JSON-able data; non-finite numbers become null. ``items`` adds per-item rows."""
        data = {"policy_version": self.policy_version, "n_items": self.n_items,
                "categories": [asdict(c) for c in self.categories], "notes": list(self.notes)}
        if items:
            data["items"] = [asdict(i) for i in self.items]
        return _finite(data)


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def measure(scorer: str, scores: torch.Tensor | None, decisions: torch.Tensor, labels: torch.Tensor,
            decision: str) -> Measures:
    """Measures from continuous ``scores`` (None: decisions only) and boolean ``decisions``."""
    labels = torch.as_tensor(labels).bool()
    decisions = torch.as_tensor(decisions).bool()
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    both = n_pos > 0 and n_neg > 0
    ranked = scores is not None and both
    precision, recall = precision_recall(decisions, labels)
    return Measures(
        scorer=scorer, n=len(labels), positives=n_pos, negatives=n_neg,
        auroc=float(auroc(scores, labels)) if ranked else None,
        tpr_at_1pct_fpr=float(tpr_at_fpr(scores, labels, FPR_POINTS[0])) if ranked else None,
        tpr_at_5pct_fpr=float(tpr_at_fpr(scores, labels, FPR_POINTS[1])) if ranked else None,
        decision=decision, flagged=int(decisions.sum()),
        precision=precision if bool(decisions.any()) else None,
        recall=recall if n_pos else None)


# ============================================================================ the harness


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="item", file=sys.stderr, disable=not enabled, leave=False)


def _scan(monitor: Any, item: EvalItem) -> tuple[Any, str | None]:
    from monitor.errors import MonitorUnavailable

    try:
        report = monitor.scan(item.transcript if isinstance(item.transcript, str) else list(item.transcript),
                              prompt=item.prompt)
    except MonitorUnavailable as exc:
        return exc.report, str(exc)
    return report, (report.error if report.failed_open else None)


def evaluate(monitor: Any, items: Sequence[EvalItem | Mapping[str, Any]], *,
             policy_set: PolicySet | None = None,
             train_items: Sequence[EvalItem | Mapping[str, Any]] | None = None,
             progress: bool = True, probe_l2: float = 1e-2) -> EvalResult:
    """Scan every item with ``monitor`` and measure detection per category.

    ``items`` are :class:`EvalItem` or rows of the labeled-data format. ``policy_set`` is the
    :class:`PolicySet` the monitor's policy was compiled from (the continuous score reads the
    rules' conditions). ``train_items`` adds the baselines: a pooled residual probe per
    category fitted on them, and bandit on the Python rows (when installed).
    """
    tokenizer = monitor.tokenizer
    items = [i if isinstance(i, EvalItem) else eval_item(i, tokenizer, source=f"item {n}")
             for n, i in enumerate(items)]
    if not items:
        raise DataError("nothing to evaluate: no items")
    policy: CompiledPolicy = monitor.policy
    conditions = _conditions(policy, policy_set)
    scorer = RuleScorer(policy, conditions, monitor.catalog)
    by_category = rule_categories(policy, conditions, {i.category for i in items})
    in_response = torch.tensor([r.scope in ("response", "both") for r in policy.rules], dtype=torch.bool)
    enforce = torch.tensor([r.mode == "enforce" for r in policy.rules], dtype=torch.bool)
    rule_index = {r.id: n for n, r in enumerate(policy.rules)}

    results: list[ItemResult] = []
    bar = _progress(len(items), "scan", progress)
    for item in items:
        report, error = _scan(monitor, item)
        rules = torch.zeros(len(policy.rules), dtype=torch.bool)
        rules[by_category.get(item.category, [])] = True
        rules &= in_response
        peaks = report.peaks.get("response")
        rule_scores = scorer.scores(peaks[0] if peaks is not None else None)
        score = float(rule_scores[rules].max()) if bool(rules.any()) else -math.inf
        fired = torch.zeros(len(policy.rules), dtype=torch.bool)
        for hit in report.hits:
            if hit.scope == "response" and hit.row == 0:
                fired[rule_index[hit.rule_id]] = True
        fired &= rules
        block = report.blocks.get(0)
        blocked = block is not None and block.scope == "response" and bool(rules[rule_index[block.rule_id]])
        feature_peaks = report.peak_table("response") if peaks is not None else {}
        results.append(ItemResult(item.id, item.category, item.label, score, bool((fired & enforce).any()),
                                  bool((fired & ~enforce).any()), blocked,
                                  int(report.tokens_monitored.get("response", 0)), error, feature_peaks))
        bar.update(1)
    bar.close()

    baseline = _baselines(monitor, items, train_items, progress, probe_l2) if train_items is not None else None
    categories = []
    for category in sorted({i.category for i in items}):
        idx = [n for n, i in enumerate(items) if i.category == category]
        categories.append(_category(category, idx, items, results, policy, by_category[category],
                                    scorer.evidence_rules, enforce, baseline))
    notes = []
    prompt_only = [r.id for r in policy.rules if r.scope == "prompt"]
    if prompt_only:
        notes.append(f"prompt-scoped rules read no item scope and are not scored: {', '.join(prompt_only)}")
    if baseline is not None:
        notes.extend(baseline.notes)
    return EvalResult(policy.version_id, len(items), tuple(categories), tuple(results), tuple(notes))


def _category(category: str, idx: list[int], items: Sequence[EvalItem], results: Sequence[ItemResult],
              policy: CompiledPolicy, rule_ids: list[int], evidence: set[int], enforce: torch.Tensor,
              baseline: _BaselineScores | None) -> CategoryResult:
    labels = torch.tensor([items[n].label for n in idx])
    rows = [results[n] for n in idx]
    notes = []
    measures = []
    names = tuple(policy.rules[r].id for r in rule_ids)
    ok = torch.tensor([r.error is None for r in rows], dtype=torch.bool)
    if not bool(ok.all()):
        notes.append(f"{int((~ok).sum())} items failed to scan and are left out: {rows[int((~ok).nonzero()[0])].error}")
    kept_labels = labels[ok]
    kept = [r for r, good in zip(rows, ok.tolist()) if good]
    if not rule_ids:
        notes.append("no rule belongs to this category (rule id or feature name prefixed with it)")
    else:
        scores = torch.tensor([r.score for r in kept], dtype=torch.float64)
        has_evidence = any(r in evidence for r in rule_ids)
        n_enforce = sum(1 for r in rule_ids if bool(enforce[r]))
        n_shadow = len(rule_ids) - n_enforce
        measures.append(measure(f"policy ({n_enforce} enforce, {n_shadow} shadow rules)",
                                scores if has_evidence else None,
                                torch.tensor([r.flagged for r in kept], dtype=torch.bool), kept_labels,
                                "an enforce rule fired in scope"))
        if n_shadow:
            measures.append(measure("policy, shadow rules", None,
                                    torch.tensor([r.shadow_flagged for r in kept], dtype=torch.bool),
                                    kept_labels, "a shadow rule fired in scope"))
        blocked = sum(r.blocked for r in kept)
        if blocked:
            notes.append(f"{blocked} items blocked in scope")
        unscored = sum(1 for r in kept if r.scored_tokens == 0)
        if unscored:
            notes.append(f"{unscored} items have no scored token (empty scope, or blocked on the text before it)")
    # each catalog feature of the category on its own: its peak over the scoped tokens
    no_decision = torch.zeros(len(kept), dtype=torch.bool)
    for name in sorted({n for r in kept for n in r.feature_peaks if n.startswith(category + ".")}):
        peaks = torch.tensor([r.feature_peaks.get(name, 0.0) for r in kept], dtype=torch.float64)
        measures.append(measure(f"feature {name}", peaks, no_decision, kept_labels, "none (ranking only)"))
    truncated = sum(items[n].truncated for n in idx)
    if truncated:
        notes.append(f"{truncated} items cut to the context/scope length limits")
    widened = sum(items[n].widened for n in idx)
    if widened:
        notes.append(f"{widened} items have non-contiguous changed lines; the lines between them are scored too")
    if baseline is not None:
        measures.extend(baseline.measures(category, idx, items))
        notes.extend(baseline.category_notes.get(category, []))
    return CategoryResult(category, len(idx), int(labels.sum()), names, tuple(measures), tuple(notes))


# ============================================================================ baselines


@dataclass
class _BaselineScores:
    probe: dict[int, float] = field(default_factory=dict)  # test item index -> logit
    bandit: dict[int, tuple[float, bool]] = field(default_factory=dict)
    bandit_skipped: dict[str, int] = field(default_factory=dict)
    category_notes: dict[str, list[str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def measures(self, category: str, idx: list[int], items: Sequence[EvalItem]) -> list[Measures]:
        out = []
        probed = [n for n in idx if n in self.probe]
        if probed:
            labels = torch.tensor([items[n].label for n in probed])
            logits = torch.tensor([self.probe[n] for n in probed], dtype=torch.float64)
            out.append(measure("probe (logistic regression, residual mean+max)", logits, logits > 0, labels,
                               "probability > 0.5"))
        checked = [n for n in idx if n in self.bandit]
        if checked:
            labels = torch.tensor([items[n].label for n in checked])
            scores = torch.tensor([self.bandit[n][0] for n in checked], dtype=torch.float64)
            flags = torch.tensor([self.bandit[n][1] for n in checked], dtype=torch.bool)
            out.append(measure(f"bandit (Python rows only: {len(checked)} of {len(idx)})", scores, flags, labels,
                               "a MEDIUM/HIGH finding in scope"))
        return out


def _pooled(monitor: Any, items: Sequence[EvalItem], desc: str, progress: bool) -> torch.Tensor:
    rows = []
    bar = _progress(len(items), desc, progress)
    for item in items:
        transcript = item.transcript if isinstance(item.transcript, str) else list(item.transcript)
        ids, start = baselines.scan_ids(monitor.tokenizer, transcript, item.prompt)
        rows.append(baselines.pooled_residual(monitor.model, monitor.tokenizer, monitor.point, ids, start))
        bar.update(1)
    bar.close()
    return torch.stack(rows)


def _baselines(monitor: Any, items: Sequence[EvalItem], train_items: Sequence[EvalItem | Mapping[str, Any]],
               progress: bool, l2: float) -> _BaselineScores:
    out = _BaselineScores()
    train = [i if isinstance(i, EvalItem) else eval_item(i, monitor.tokenizer, source=f"train item {n}")
             for n, i in enumerate(train_items)]
    categories = sorted({i.category for i in items})
    fit_on: dict[str, list[int]] = {}
    for category in categories:
        chosen = [n for n, i in enumerate(train) if i.category == category]
        labels = {train[n].label for n in chosen}
        if labels == {0, 1}:
            fit_on[category] = chosen
        else:
            out.category_notes.setdefault(category, []).append(
                f"probe: the training file has {len(chosen)} items of this category, not both labels; no probe")
    if fit_on:
        train_x = _pooled(monitor, [train[n] for c in fit_on for n in fit_on[c]], "probe features (train)", progress)
        test_idx = [n for n, i in enumerate(items) if i.category in fit_on]
        test_x = _pooled(monitor, [items[n] for n in test_idx], "probe features (eval)", progress)
        row_of = {n: k for k, n in enumerate(test_idx)}
        offset = 0
        for category, chosen in fit_on.items():
            x = train_x[offset:offset + len(chosen)]
            offset += len(chosen)
            probe = baselines.fit_pooled_probe(x, torch.tensor([train[n].label for n in chosen]), l2=l2)
            mine = [n for n in test_idx if items[n].category == category]
            logits = probe.score(test_x[[row_of[n] for n in mine]])
            out.probe.update({n: float(v) for n, v in zip(mine, logits)})
    version = baselines.bandit_version()
    python = [n for n, i in enumerate(items) if i.code is not None and baselines.is_python(i.language)]
    if version is None:
        out.notes.append("bandit: not installed (pip install bandit); no bandit baseline")
    else:
        out.notes.append(f"bandit {version}: Python rows only, findings on the scoped lines")
        findings = baselines.bandit_findings([items[n].code or "" for n in python]) if python else []
        unparsed = 0
        for n, found in zip(python, findings):
            if found is None:
                unparsed += 1
                found = []
            lines = items[n].code_lines
            out.bandit[n] = (baselines.bandit_score(found, lines), baselines.bandit_flags(found, lines))
        if unparsed:
            out.notes.append(f"bandit could not parse {unparsed} Python rows (scored 0)")
        for category in categories:
            idx = [n for n, i in enumerate(items) if i.category == category]
            skipped = sum(1 for n in idx if n not in out.bandit)
            if skipped and skipped < len(idx):
                out.category_notes.setdefault(category, []).append(
                    f"bandit skipped {skipped} non-Python rows")
    return out


# ============================================================================ rendering


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def render_markdown(result: EvalResult, *, title: str = "") -> str:
    """A markdown table (one row per category and scorer) followed by the notes."""
    lines = []
    if title:
        lines += [f"## {title}", ""]
    lines += [f"Policy version `{result.policy_version}`, {result.n_items} items.", "",
              "| category | scorer | items (pos/neg) | AUROC | TPR@1%FPR | TPR@5%FPR | decision | flagged "
              "| precision | recall |",
              "| --- | --- | --- | ---: | ---: | ---: | --- | ---: | ---: | ---: |"]
    notes = []
    for cat in result.categories:
        if not cat.measures:
            lines.append(f"| {cat.category} | (none) | {cat.items} ({cat.positives}/{cat.items - cat.positives}) "
                         "| – | – | – | – | – | – | – |")
        for m in cat.measures:
            lines.append(f"| {cat.category} | {m.scorer} | {m.n} ({m.positives}/{m.negatives}) | {_fmt(m.auroc)} "
                         f"| {_fmt(m.tpr_at_1pct_fpr)} | {_fmt(m.tpr_at_5pct_fpr)} | {m.decision} | {m.flagged} "
                         f"| {_fmt(m.precision)} | {_fmt(m.recall)} |")
        notes += [f"- {cat.category}: {note}" for note in cat.notes]
        if cat.rules:
            notes.append(f"- {cat.category}: rules {', '.join(cat.rules)}")
    notes += [f"- {note}" for note in result.notes]
    if notes:
        lines += ["", "Notes:", *notes]
    return "\n".join(lines) + "\n"


def render_json(result: EvalResult, *, items: bool = False) -> str:
    return json.dumps(result.to_dict(items=items), indent=2) + "\n"


# ============================================================================ CLI support


def monitor_for_eval(policies: str | Path | None = None, *, sae: str | Path = "default",
                     model: str = "default", catalog: str | Path | None = None) -> tuple[Any, PolicySet]:
    """A :class:`Monitor` over ``policies`` (default: the shipped ones) and the policy set it
    was compiled from, as :func:`evaluate` needs both."""
    from monitor.catalog import load_catalog
    from monitor.models import load_model
    from monitor.policy import compile_policies, load_policies
    from monitor.sae import load_sae
    from monitor.wrapper import SHIPPED_CATALOG, Monitor, shipped_policies_dir

    model_obj, tokenizer = load_model(model)
    sae_obj = load_sae(sae)
    if catalog is None and str(sae) == "default" and SHIPPED_CATALOG.is_file():
        catalog = SHIPPED_CATALOG
    cat = load_catalog(catalog, d_sae=sae_obj.cfg.d_sae) if catalog is not None else None
    policy_set = load_policies(policies if policies is not None else shipped_policies_dir())
    compiled = compile_policies(policy_set, cat, d_sae=sae_obj.cfg.d_sae)
    return Monitor(model_obj, tokenizer, sae=sae_obj, policies=compiled, catalog=cat), policy_set


def run_eval(data: str | Path, *, policies: str | Path | None = None, train: str | Path | None = None,
             limit: int | None = None, sae: str | Path = "default", model: str = "default",
             catalog: str | Path | None = None, as_json: bool = False, items: bool = False,
             progress: bool = True) -> str:
    """What ``sae-monitor eval`` prints: load, scan, measure, render."""
    for path in (data, train):
        if path is not None and not Path(path).is_file():
            raise DataError(f"{path}: no such file")
    monitor, policy_set = monitor_for_eval(policies, sae=sae, model=model, catalog=catalog)
    try:
        test = load_eval_items(data, monitor.tokenizer, limit=limit)
        train_items = load_eval_items(train, monitor.tokenizer) if train else None
        result = evaluate(monitor, test, policy_set=policy_set, train_items=train_items, progress=progress)
    finally:
        monitor.close()
    if as_json:
        return render_json(result, items=items)
    return render_markdown(result, title=f"Evaluation on {Path(data).name}")
