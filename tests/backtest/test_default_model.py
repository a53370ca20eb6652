"""The backtest against ``Monitor.scan`` on real conversations with the default model and the
shipped policies: the last-turn ``scan`` never flags a conversation the backtest does not, and
every turn is evaluated as ``scan`` evaluates that turn's request."""

from __future__ import annotations

import json

import pytest

from monitor.backtest.read import Conversation, FieldMap, parse_row
from monitor.backtest.replay import ONE_FORWARD, PER_TURN
from monitor.backtest.run import default_parts
from monitor.backtest.scan import Scanner
from monitor.policy import compile_policies, load_policies
from monitor.runtime.hf import Monitor
from monitor.shipped import shipped_policies_dir
from tests.backtest.helpers import DATA, per_turn_scans, shadow_copy

PICK = ["syc-0", "syc-1", "syc-2", "syc-3", "syc-4", "code-0", "code-1", "multi-0", "multi-2", "multi-4",
        "multi-5", "multi-6", "multi-7", "pr-0"]


@pytest.fixture(scope="module")
def setup():
    parts = default_parts()
    d_sae = parts.sae.cfg.d_sae
    policy = compile_policies(load_policies(shipped_policies_dir(), parts.catalog, d_sae=d_sae), parts.catalog,
                              d_sae=d_sae)
    rows = {json.loads(line)["id"]: (n, json.loads(line)) for n, line in enumerate(DATA.read_text().splitlines(), 1)}
    convs = [parse_row(rows[i][1], FieldMap(), str(DATA), rows[i][0]) for i in PICK]
    return parts, policy, convs


def test_scan_never_flags_what_the_backtest_does_not(setup):
    parts, policy, convs = setup
    results = Scanner(parts.model, parts.tokenizer, parts.sae, [policy], parts.catalog, batch_size=8).scan(convs)
    mon = Monitor(parts.model, parts.tokenizer, sae=parts.sae, policies=policy, catalog=parts.catalog,
                  self_test=False, on_error="open")
    try:
        reports = mon.scan_many([list(c.messages) for c in convs], batch_size=8)
    finally:
        mon.close()
    flagged_scan = flagged_more = 0
    for conv, res, report in zip(convs, results, reports):
        assert report.error is None
        scan_rules = {h.rule_id for h in report.hits}
        backtest_rules = {f.rule for f in res.versions[0].firings}
        assert scan_rules <= backtest_rules, conv.id
        if report.blocks:
            assert res.versions[0].decision == "block", conv.id
        flagged_scan += bool(scan_rules)
        flagged_more += len(backtest_rules - scan_rules) > 0
    assert flagged_scan >= 8, "the shipped policies fire on these conversations"
    assert flagged_more >= 1, "multi-turn conversations fire in earlier turns that scan does not see"


def test_every_turn_equals_its_own_scan_request_on_the_default_model(setup, tmp_path):
    """Multi-turn conversations, most in one forward (SmolLM2's ChatML template is prefix-stable),
    and one whose first reply starts with a blank line: the tokenizer merges it with the
    template's newline, so no turn is a token prefix and it is scanned one row per turn (as are
    the code conversations whose reply starts with indentation)."""
    parts, policy, convs = setup
    multi = [c for c in convs if len(c.messages) > 2]
    first = multi[0]
    msgs = [dict(m) for m in first.messages]
    msgs[1]["content"] = "\n\n" + msgs[1]["content"]
    multi.append(Conversation("blank:1", "blank-line", tuple(msgs), "blank", 1))
    results = Scanner(parts.model, parts.tokenizer, parts.sae, [policy], parts.catalog, batch_size=8).scan(multi)
    assert results[-1].replay == PER_TURN and sum(r.replay == ONE_FORWARD for r in results) >= 4
    mon = Monitor(parts.model, parts.tokenizer, sae=parts.sae, policies=policy, catalog=parts.catalog,
                  self_test=False, on_error="open")
    d_sae = parts.sae.cfg.d_sae
    shadow_policy = compile_policies(load_policies(shadow_copy(shipped_policies_dir(), tmp_path), parts.catalog,
                                                   d_sae=d_sae), parts.catalog, d_sae=d_sae)
    shadow = Monitor(parts.model, parts.tokenizer, sae=parts.sae, policies=shadow_policy, catalog=parts.catalog,
                     self_test=False, on_error="open")
    try:
        earlier = 0
        for conv, res in zip(multi, results):
            expected, blocked = per_turn_scans(mon, conv, shadow)
            assert {f.rule: (f.turn, f.scope, f.token) for f in res.versions[0].firings} == expected, conv.id
            assert (res.versions[0].decision == "block") == blocked, conv.id
            earlier += any(turn < len(conv.messages) - 1 for turn, _, _ in expected.values())
    finally:
        mon.close()
        shadow.close()
    assert len(multi) >= 8 and earlier >= 1, "rules fire in earlier turns of these conversations"
