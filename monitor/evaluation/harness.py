"""The evaluation harness: scan, score every detector, measure per category and per group.

Every item goes through the monitor's teacher-forced scan, the production path (the same
tokenisation, masks, SAE encoder and policy engine as live generation). Per data category:

* **the policy**: the continuous score of :mod:`monitor.evaluation.scoring` (AUROC, TPR) and
  the decisions its enforce rules took (an item counts as flagged when an enforce rule of the
  category fired on a token of the item's scope; shadow rules get a row of their own);
* **each catalog feature** of the category (``<category>.*``): its peak in scope, ranking only;
* **baselines** (:mod:`monitor.evaluation.baselines`): a dense probe fitted on a training file,
  and/or fitted leave-one-group-out on the evaluation data itself; bandit on Python rows;

each measured overall and per group (``group_by``: source, language, ...), with the pair
measures and, given benign traffic, TPR at 1% benign FPR (:mod:`monitor.evaluation.measures`).
An enforce rule that blocks on the prompt stops the row before its response is evaluated, as
in deployment; such items have no scored token and are counted.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from monitor.activations import Progress
from monitor.errors import DataError
from monitor.evaluation import baselines
from monitor.evaluation.items import EvalItem, as_eval_items, check_group_key, group_of
from monitor.evaluation.measures import Detection, Measures
from monitor.evaluation.scoring import RuleScorer, check_policy_set, rule_categories
from monitor.evaluation.transfer import leave_one_group_out
from monitor.policy import CompiledPolicy, PolicySet
from monitor.runtime.scan import ScanItem, check_dtype, forward_precision


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
    source: str = ""


@dataclass(frozen=True)
class GroupResult:
    """The measures of one category restricted to the items whose ``key`` is ``group``."""

    key: str
    group: str
    items: int
    positives: int
    measures: tuple[Measures, ...]


@dataclass(frozen=True)
class CategoryResult:
    category: str
    items: int
    positives: int
    rules: tuple[str, ...]
    measures: tuple[Measures, ...]
    notes: tuple[str, ...] = ()
    groups: tuple[GroupResult, ...] = ()


@dataclass(frozen=True)
class EvalResult:
    policy_version: str
    n_items: int
    categories: tuple[CategoryResult, ...]
    items: tuple[ItemResult, ...] = ()
    notes: tuple[str, ...] = ()
    group_by: str | None = None
    leave_one_out: str | None = None
    benign: int = 0

    def to_dict(self, *, items: bool = False) -> dict[str, Any]:
        """Plain JSON-able data; non-finite numbers become null. ``items`` adds per-item rows."""
        data = {"policy_version": self.policy_version, "n_items": self.n_items, "group_by": self.group_by,
                "leave_one_out": self.leave_one_out, "benign_items": self.benign,
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


@dataclass(frozen=True)
class _Row:
    """What one scan says, per rule: continuous score, fired in the response scope."""

    rule_scores: torch.Tensor
    fired: torch.Tensor
    block_rule: int | None
    tokens: int
    error: str | None
    peaks: Mapping[str, float]


def scan_reports(monitor: Any, items: Sequence[EvalItem], *, batch_size: int = 8,
                 progress: Progress | None = None, dtype: str = "float32") -> list[tuple[Any, str | None]]:
    """``(report, error)`` per item from the monitor's batched teacher-forced scan
    (``Monitor.scan_many`` at ``dtype``; error: why the monitor failed open or refused, else None)."""
    scan_items = [ScanItem(item.transcript if isinstance(item.transcript, str) else list(item.transcript),
                           item.prompt) for item in items]
    done = 0

    def advance(n: int) -> None:
        nonlocal done
        done += n
        if progress:
            progress(done, len(items))

    reports = monitor.scan_many(scan_items, batch_size=batch_size, progress=advance, dtype=dtype)
    return [(r, r.error if (r.error and (r.failed_open or r.outcome == "error")) else None) for r in reports]


class _Steps:
    """One progress bar over several phases: ``part(n)`` is a callback for a phase of n items."""

    def __init__(self, progress: Progress | None, total: int) -> None:
        self.progress, self.total, self.done = progress, total, 0

    def part(self) -> Progress | None:
        if self.progress is None:
            return None
        start = self.done

        def report(done: int, _total: int) -> None:
            self.done = start + done
            self.progress(self.done, self.total)  # type: ignore[misc]
        return report


def evaluate(monitor: Any, items: Sequence[EvalItem | Mapping[str, Any]], *,
             policy_set: PolicySet | None = None,
             train_items: Sequence[EvalItem | Mapping[str, Any]] | None = None,
             benign_items: Sequence[EvalItem | Mapping[str, Any]] = (),
             group_by: str | None = "source", leave_one_out: str | None = None,
             progress: Progress | None = None, probe_l2: float = 1e-2, batch_size: int = 8,
             dtype: str = "float32") -> EvalResult:
    """Scan every item with ``monitor`` and measure detection per category (and per group).

    ``items``: :class:`EvalItem` or rows of the labeled-data format. ``policy_set`` (optional):
    the :class:`PolicySet` the monitor's policy was compiled from, checked against it. ``train_items`` adds the dense
    probe fitted on them and bandit. ``leave_one_out`` (a field, e.g. ``source``) adds the dense
    probe fitted on all groups of a category but one and scored on that one. ``benign_items``
    (label ignored) add TPR at 1% benign FPR and the benign flag rate. ``group_by`` reports
    every measure per value of that field too. ``progress(done, total)`` counts items over all
    phases. ``dtype``: the precision of every forward (``Monitor.scan_many``'s; ``bfloat16`` is
    2-3x faster on CPUs with native bfloat16, with activations off by bfloat16 rounding).
    """
    for key, option in ((group_by, "group_by"), (leave_one_out, "leave_one_out")):
        if key is not None:
            check_group_key(key, option)
    check_dtype(dtype)
    tokenizer = monitor.tokenizer
    items = as_eval_items(items, tokenizer)
    benign = as_eval_items(benign_items, tokenizer, "benign item")
    if not items:
        raise DataError("nothing to evaluate: no items")
    policy: CompiledPolicy = monitor.policy
    check_policy_set(policy, policy_set)
    scorer = RuleScorer(policy)
    by_category = rule_categories(policy, {i.category for i in items})
    train = as_eval_items(train_items, tokenizer, "train item") if train_items is not None else None
    dense = train is not None or leave_one_out is not None
    steps = _Steps(progress, len(items) + len(benign)
                   + (len(items) + len(benign) + len(train or [])) * dense)
    scanned = scan_reports(monitor, [*items, *benign], batch_size=batch_size, progress=steps.part(), dtype=dtype)
    rows = [_row(report, error, policy, scorer) for report, error in scanned]
    enforce = torch.tensor([r.mode == "enforce" for r in policy.rules], dtype=torch.bool)
    in_response = torch.tensor([r.scope in ("response", "both") for r in policy.rules], dtype=torch.bool)
    detections = _policy_detections(rows[:len(items)], rows[len(items):], by_category, enforce, in_response,
                                    scorer.evidence_rules, policy)
    results = [_item_result(item, row, by_category, in_response, enforce)
               for item, row in zip(items, rows[:len(items)])]
    notes: list[str] = []
    cat_notes: dict[str, list[str]] = {c: [] for c in by_category}
    if dense:
        with forward_precision(dtype, next(monitor.model.parameters()).device):
            x = baselines.pooled_features(monitor.model, tokenizer, monitor.point, items, batch_size=batch_size,
                                          progress=steps.part()).float()
            benign_x = baselines.pooled_features(monitor.model, tokenizer, monitor.point, benign, batch_size=batch_size,
                                                 progress=steps.part()).float() if benign else None
            train_x = baselines.pooled_features(monitor.model, tokenizer, monitor.point, train, batch_size=batch_size,
                                                progress=steps.part()).float() if train is not None else None
        if train is not None and train_x is not None:
            _train_probe(detections, items, train, x, train_x, benign_x, probe_l2, cat_notes)
        if leave_one_out is not None:
            _loso_probe(detections, items, x, benign_x, leave_one_out, probe_l2, cat_notes)
    if train is not None:
        notes += baselines.bandit_detections(detections, items, cat_notes)
    labels = torch.tensor([i.label for i in items])
    pair_ids = [i.pair_id for i in items]
    categories = []
    for category in sorted(by_category):
        idx = [n for n, i in enumerate(items) if i.category == category]
        cat_notes[category] = _category_notes(category, idx, items, results, by_category, policy) \
            + cat_notes[category]
        measured = tuple(m for d in detections.get(category, []) if (m := d.measure(idx, labels, pair_ids)))
        groups = _groups(category, idx, items, detections.get(category, []), labels, pair_ids, group_by)
        categories.append(CategoryResult(category, len(idx), int(labels[idx].sum()),
                                         tuple(policy.rules[r].id for r in by_category[category]), measured,
                                         tuple(cat_notes[category]), groups))
    prompt_only = [r.id for r in policy.rules if r.scope == "prompt"]
    if prompt_only:
        notes.insert(0, f"prompt-scoped rules read no item scope and are not scored: {', '.join(prompt_only)}")
    failed_benign = sum(1 for row in rows[len(items):] if row.error is not None)
    if failed_benign:
        notes.append(f"{failed_benign} benign items failed to scan and are left out")
    return EvalResult(policy.version_id, len(items), tuple(categories), tuple(results), tuple(notes),
                      group_by, leave_one_out, len(benign))


def _row(report: Any, error: str | None, policy: CompiledPolicy, scorer: RuleScorer) -> _Row:
    peaks = report.peaks.get("response")
    fired = torch.zeros(len(policy.rules), dtype=torch.bool)
    index = {r.id: n for n, r in enumerate(policy.rules)}
    for hit in report.hits:
        if hit.scope == "response" and hit.row == 0:
            fired[index[hit.rule_id]] = True
    block = report.blocks.get(0)
    block_rule = index[block.rule_id] if block is not None and block.scope == "response" else None
    means = report.means("response")
    return _Row(scorer.scores(peaks[0] if peaks is not None else None,
                              means[0] if means is not None else None), fired, block_rule,
                int(report.tokens_monitored.get("response", 0)), error,
                report.peak_table("response") if peaks is not None else {})


def _category_score(row: _Row, rules: torch.Tensor) -> float:
    return float(row.rule_scores[rules].max()) if bool(rules.any()) else -math.inf


def _rule_mask(n: int, chosen: Sequence[int], in_response: torch.Tensor) -> torch.Tensor:
    mask = torch.zeros(n, dtype=torch.bool)
    mask[list(chosen)] = True
    return mask & in_response


def _item_result(item: EvalItem, row: _Row, by_category: Mapping[str, list[int]], in_response: torch.Tensor,
                 enforce: torch.Tensor) -> ItemResult:
    rules = _rule_mask(len(enforce), by_category.get(item.category, []), in_response)
    fired = row.fired & rules
    blocked = row.block_rule is not None and bool(rules[row.block_rule])
    return ItemResult(item.id, item.category, item.label, _category_score(row, rules),
                      bool((fired & enforce).any()), bool((fired & ~enforce).any()), blocked, row.tokens,
                      row.error, row.peaks, item.source)


def _policy_detections(rows: Sequence[_Row], benign: Sequence[_Row], by_category: Mapping[str, list[int]],
                       enforce: torch.Tensor, in_response: torch.Tensor, evidence: set[int],
                       policy: CompiledPolicy) -> dict[str, list[Detection]]:
    ok = torch.tensor([r.error is None for r in rows], dtype=torch.bool)
    good_benign = [r for r in benign if r.error is None]
    out: dict[str, list[Detection]] = {}
    for category, chosen in by_category.items():
        found: list[Detection] = []
        rules = _rule_mask(len(enforce), chosen, in_response)
        if chosen:
            def scores(rs: Sequence[_Row]) -> torch.Tensor:
                return torch.tensor([_category_score(r, rules) for r in rs], dtype=torch.float64)

            def flags(rs: Sequence[_Row], which: torch.Tensor) -> torch.Tensor:
                return torch.tensor([bool((r.fired & rules & which).any()) for r in rs], dtype=torch.bool)

            n_enforce = sum(1 for r in chosen if bool(enforce[r]))
            has_evidence = any(r in evidence for r in chosen)
            b_scores = scores(good_benign) if good_benign and has_evidence else None
            b_flags = flags(good_benign, enforce) if good_benign else None
            found.append(Detection.single(
                f"policy ({n_enforce} enforce, {len(chosen) - n_enforce} shadow rules)",
                "an enforce rule fired in scope", scores(rows) if has_evidence else None, flags(rows, enforce),
                ok, b_scores, b_flags))
            if len(chosen) > n_enforce:
                found.append(Detection.single("policy, shadow rules", "a shadow rule fired in scope", None,
                                              flags(rows, ~enforce), ok, None,
                                              flags(good_benign, ~enforce) if good_benign else None))
        names = sorted({n for r in rows for n in r.peaks if n.startswith(category + ".")})
        for name in names:
            peaks = torch.tensor([r.peaks.get(name, 0.0) for r in rows], dtype=torch.float64)
            b_peaks = (torch.tensor([r.peaks.get(name, 0.0) for r in good_benign], dtype=torch.float64)
                       if good_benign else None)
            found.append(Detection.single(f"feature {name}", "none (ranking only)", peaks, None, ok, b_peaks))
        out[category] = found
    return out


PROBE = "probe (logistic regression, residual mean+max)"


def _train_probe(detections: dict[str, list[Detection]], items: Sequence[EvalItem], train: Sequence[EvalItem],
                 x: torch.Tensor, train_x: torch.Tensor, benign_x: torch.Tensor | None, l2: float,
                 notes: dict[str, list[str]]) -> None:
    """A dense probe per category, fitted on the training file's items of that category."""
    for category in detections:
        chosen = [n for n, i in enumerate(train) if i.category == category]
        if {train[n].label for n in chosen} != {0, 1}:
            notes[category].append(f"probe: the training file has {len(chosen)} items of this category, "
                                   "not both labels; no probe")
            continue
        probe = baselines.fit_pooled_probe(train_x[chosen], torch.tensor([train[n].label for n in chosen]), l2=l2)
        covered = torch.tensor([i.category == category for i in items], dtype=torch.bool)
        logits = probe.score(x).double()
        b_logits = probe.score(benign_x).double() if benign_x is not None else None
        detections[category].append(Detection.single(
            PROBE, "probability > 0.5", logits, logits > 0, covered, b_logits,
            b_logits > 0 if b_logits is not None else None))


def _loso_probe(detections: dict[str, list[Detection]], items: Sequence[EvalItem], x: torch.Tensor,
                benign_x: torch.Tensor | None, key: str, l2: float, notes: dict[str, list[str]]) -> None:
    """A dense probe per category and left-out group, fitted on the category's other groups."""
    for category in detections:
        idx = torch.tensor([n for n, i in enumerate(items) if i.category == category], dtype=torch.long)
        groups = [group_of(items[n], key) for n in idx.tolist()]
        labels = torch.tensor([items[n].label for n in idx.tolist()])
        folds = leave_one_group_out(x[idx], labels, groups, baselines.probe_fitter(l2), benign_x=benign_x)
        for group, why in folds.skipped.items():
            notes[category].append(f"leave-one-{key}-out probe: no fit without {key}={group!r} ({why})")
        if not bool(folds.covered.any()):
            continue
        scores = torch.full((len(items),), math.nan, dtype=torch.float64)
        fold = torch.zeros(len(items), dtype=torch.long)
        scores[idx], fold[idx] = folds.scores, folds.fold
        detections[category].append(Detection(
            f"probe, leave-one-{key}-out (residual mean+max)", "probability > 0.5", scores, scores > 0,
            ~torch.isnan(scores), fold, folds.benign, {f: s > 0 for f, s in folds.benign.items()}))


def _groups(category: str, idx: Sequence[int], items: Sequence[EvalItem], detections: Sequence[Detection],
            labels: torch.Tensor, pair_ids: Sequence[str | None], key: str | None) -> tuple[GroupResult, ...]:
    if key is None:
        return ()
    members: dict[str, list[int]] = {}
    for n in idx:
        members.setdefault(group_of(items[n], key), []).append(n)
    if len(members) < 2:
        return ()
    return tuple(GroupResult(key, g, len(m), int(labels[m].sum()),
                             tuple(r for d in detections if (r := d.measure(m, labels, pair_ids))))
                 for g, m in sorted(members.items()))


def _category_notes(category: str, idx: Sequence[int], items: Sequence[EvalItem], results: Sequence[ItemResult],
                    by_category: Mapping[str, list[int]], policy: CompiledPolicy) -> list[str]:
    notes = []
    rows = [results[n] for n in idx]
    failed = [r for r in rows if r.error is not None]
    if failed:
        notes.append(f"{len(failed)} items failed to scan and are left out: {failed[0].error}")
    kept = [r for r in rows if r.error is None]
    if not by_category[category]:
        notes.append("no rule belongs to this category (rule id or feature name prefixed with it)")
    else:
        blocked = sum(r.blocked for r in kept)
        if blocked:
            notes.append(f"{blocked} items blocked in scope")
        unscored = sum(1 for r in kept if r.scored_tokens == 0)
        if unscored:
            notes.append(f"{unscored} items have no scored token (empty scope, or blocked on the text before it)")
    truncated = sum(items[n].truncated for n in idx)
    if truncated:
        notes.append(f"{truncated} items cut to the context/scope length limits")
    widened = sum(items[n].widened for n in idx)
    if widened:
        notes.append(f"{widened} items have non-contiguous changed lines; the lines between them are scored too")
    return notes
