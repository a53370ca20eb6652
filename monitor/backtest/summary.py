"""What a backtest found: per-rule summary, problems, and the diff between two policy versions.

Fourth stage (read -> scan -> results -> **summary/diff** -> report). Pure functions over the
result rows of :mod:`monitor.backtest.results` (plain dicts), so they work the same on a run
just finished, on a resumed one and on ``conversations.parquet`` read back later.

Examples identify conversations by key, id and ``text_sha256`` (as the logs do); their text is
included only when the rows carry it (``--include-text`` at scan time).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from monitor.backtest.scan import DECISIONS

ACTIONS = ("block", "steer", "alert", "log")


def _example(row: dict[str, Any], firing: dict[str, Any] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"key": row["key"], "id": row["id"], "text_sha256": row["text_sha256"]}
    if firing is not None:
        out.update(turn=firing["turn"], scope=firing["scope"], token=firing["token"],
                   activation=round(float(firing["activation"]), 4))
    if row.get("messages"):
        out["messages"] = json.loads(row["messages"])
    return out


def summarize(rows: Sequence[dict[str, Any]], labels: Sequence[str],
              versions: Sequence[dict[str, str]] = (), examples: int = 3) -> dict[str, Any]:
    """The summary: totals, problems, per version the decisions and per-rule counts and rates,
    and with two versions the diff of the first (candidate) against the second (baseline)."""
    scanned = [r for r in rows if r["status"] == "scanned"]
    skipped = [r for r in rows if r["status"] != "scanned"]
    n = len(scanned)
    problems: dict[str, int] = {}
    for r in skipped:
        problems[r["problem"]] = problems.get(r["problem"], 0) + 1
    out: dict[str, Any] = {
        "records": len(rows), "scanned": n, "skipped": len(skipped),
        "tokens": sum(r["tokens"] or 0 for r in scanned),
        "problems": {"counts": dict(sorted(problems.items())),
                     "records": [{"key": r["key"], "kind": r["problem"], "detail": r["detail"]} for r in skipped]},
    }
    per_version: dict[str, Any] = {}
    out["versions"] = per_version
    info = {v["label"]: v for v in versions}
    for label in labels:
        decisions = {d: 0 for d in DECISIONS}
        rules: dict[str, dict[str, Any]] = {}
        for r in scanned:
            decisions[r[f"{label}_decision"]] += 1
            for f in r[f"{label}_firings"]:
                entry = rules.setdefault(f["rule"], {"rule": f["rule"], "action": f["action"], "mode": f["mode"],
                                                     "conversations": 0, "tokens": 0, "examples": []})
                entry["conversations"] += 1
                entry["tokens"] += f["tokens_fired"]
                if len(entry["examples"]) < examples:
                    entry["examples"].append(_example(r, f))
        for entry in rules.values():
            entry["rate"] = entry["conversations"] / n if n else 0.0
            enforced = entry["mode"] == "enforce"
            for action in ("block", "steer", "alert"):
                entry[f"would_{action}"] = entry["conversations"] if enforced and entry["action"] == action else 0
        per_version[label] = {
            **{k: v for k, v in info.get(label, {}).items() if k != "label"},
            "decisions": decisions,
            "rates": {d: (c / n if n else 0.0) for d, c in decisions.items()},
            "rules": sorted(rules.values(), key=lambda e: (-e["conversations"], e["rule"])),
        }
    if len(labels) >= 2:
        out["diff"] = diff(scanned, labels[0], labels[1], examples=None)
    return out


def _deciding_rule(row: dict[str, Any], label: str) -> str | None:
    decision = row[f"{label}_decision"]
    candidates = [f for f in row[f"{label}_firings"]
                  if (f["action"] if f["mode"] == "enforce" else "log") == decision]
    return min(candidates, key=lambda f: f["position"])["rule"] if candidates else None


def diff(rows: Sequence[dict[str, Any]], candidate: str, baseline: str,
         examples: int | None = None) -> dict[str, Any]:
    """How ``candidate`` decides differently from ``baseline`` on the same conversations.

    ``newly_blocked``: candidate blocks, baseline did not; ``no_longer_blocked``: the reverse;
    ``changed_action``: both differ otherwise (e.g. alert -> steer, or a block now made by
    another rule). Each lists the conversations (all, or the first ``examples``) and per-rule
    firing counts in both versions are compared under ``rules``.
    """
    groups: dict[str, list[dict[str, Any]]] = {"newly_blocked": [], "no_longer_blocked": [], "changed_action": []}
    for r in rows:
        if r["status"] != "scanned":
            continue
        a, b = r[f"{candidate}_decision"], r[f"{baseline}_decision"]
        ra, rb = _deciding_rule(r, candidate), _deciding_rule(r, baseline)
        if a == "block" and b != "block":
            kind = "newly_blocked"
        elif b == "block" and a != "block":
            kind = "no_longer_blocked"
        elif a != b or (a == "block" and ra != rb):
            kind = "changed_action"
        else:
            continue
        groups[kind].append({**_example(r), candidate: a, baseline: b,
                             f"{candidate}_rule": ra, f"{baseline}_rule": rb})
    fired: dict[str, dict[str, int]] = {}
    for r in rows:
        if r["status"] != "scanned":
            continue
        for label in (candidate, baseline):
            for f in r[f"{label}_firings"]:
                fired.setdefault(f["rule"], {candidate: 0, baseline: 0})[label] += 1
    rules = [{"rule": rule, candidate: c[candidate], baseline: c[baseline], "change": c[candidate] - c[baseline]}
             for rule, c in sorted(fired.items()) if c[candidate] != c[baseline]]
    out: dict[str, Any] = {"candidate": candidate, "baseline": baseline,
                           "counts": {k: len(v) for k, v in groups.items()}, "rules": rules}
    for kind, items in groups.items():
        out[kind] = items if examples is None else items[:examples]
    return out
