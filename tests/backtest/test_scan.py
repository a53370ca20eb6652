"""The scanner on a tiny model: the last-turn property, one forward for two versions, batching."""

from __future__ import annotations

import pytest
import torch

from monitor.backtest.read import Conversation
from monitor.backtest.scan import Scanner
from monitor.policy import compile_policies, load_policies
from monitor.runtime.hf import Monitor
from monitor.backtest.replay import ONE_FORWARD, PER_TURN
from tests.backtest.helpers import (per_turn_scans, quantile_threshold, rule_yaml, shadow_copy, short_conversations,
                                    tiny_parts, write_policy)
from tests.backtest.test_replay import LAST_MARKED


def convs(rows=None):
    rows = rows or short_conversations()
    return [Conversation(f"mem:{i + 1}", r["id"], tuple(r["messages"]), "mem", i + 1) for i, r in enumerate(rows)]


def compiled(directory):
    return compile_policies(load_policies(directory), None, d_sae=16)


@pytest.fixture(scope="module")
def parts():
    return tiny_parts()


@pytest.fixture(scope="module")
def firing_policies(parts, tmp_path_factory):
    """Candidate: a block rule (response) + an alert rule (prompt); baseline: a stricter block."""
    cs = convs()
    t_hi = quantile_threshold(parts, [c.messages for c in cs], 3, 0.97)
    t_lo = quantile_threshold(parts, [c.messages for c in cs], 3, 0.90)
    t_p = quantile_threshold(parts, [c.messages for c in cs], 5, 0.97)
    base = tmp_path_factory.mktemp("pol")
    cand = write_policy(base / "cand", rule_yaml("r.block", 3, t_lo),
                        rule_yaml("p.alert", 5, t_p, scope="prompt", actions="[log, alert]"))
    old = write_policy(base / "old", rule_yaml("r.block", 3, t_hi))
    return cand, old


def test_last_turn_scan_never_flags_what_the_backtest_does_not(parts, firing_policies):
    cand, _ = firing_policies
    policy = compiled(cand)
    results = Scanner(parts.model, parts.tokenizer, parts.sae, [policy], batch_size=8).scan(convs())
    mon = Monitor(parts.model, parts.tokenizer, sae=parts.sae, policies=policy, self_test=False, on_error="open")
    try:
        flagged_scan = flagged_backtest = earlier_only = 0
        for conv, res in zip(convs(), results):
            report = mon.scan(list(conv.messages))
            scan_rules = {h.rule_id for h in report.hits}
            bt = {f.rule for f in res.versions[0].firings}
            assert scan_rules <= bt, (conv.id, scan_rules, bt)
            # the last turn is evaluated exactly as scan evaluates it: same first token per rule
            last = len(conv.messages) - 1
            for hit in report.hits:
                if hit.scope == "response":
                    f = next(f for f in res.versions[0].firings if f.rule == hit.rule_id)
                    if f.turn == last:
                        first = min(h.token_index for h in report.hits if h.rule_id == hit.rule_id)
                        assert f.token == first
            flagged_scan += bool(scan_rules)
            flagged_backtest += bool(bt)
            earlier_only += bool(bt) and not scan_rules
    finally:
        mon.close()
    assert flagged_scan > 0, "the rule was built to fire: pick another quantile"
    assert flagged_backtest >= flagged_scan
    assert earlier_only > 0, "some conversation fires only in an earlier turn (per-turn replay matters)"


def test_two_versions_on_one_forward_equal_two_separate_scans(parts, firing_policies):
    cand, old = (compiled(p) for p in firing_policies)
    both = Scanner(parts.model, parts.tokenizer, parts.sae, [cand, old], batch_size=8).scan(convs())
    only_c = Scanner(parts.model, parts.tokenizer, parts.sae, [cand], batch_size=8).scan(convs())
    only_o = Scanner(parts.model, parts.tokenizer, parts.sae, [old], batch_size=8).scan(convs())
    for b, c, o in zip(both, only_c, only_o):
        assert b.versions == (c.versions[0], o.versions[0])
    assert {r.versions[0].decision for r in both} >= {"block", "allow"}


def test_batch_size_does_not_change_decisions(parts, firing_policies):
    policy = compiled(firing_policies[0])
    one = Scanner(parts.model, parts.tokenizer, parts.sae, [policy], batch_size=1).scan(convs())
    many = Scanner(parts.model, parts.tokenizer, parts.sae, [policy], batch_size=16).scan(convs())
    assert [(r.key, r.versions[0].decision, [(f.rule, f.turn, f.token) for f in r.versions[0].firings])
            for r in one] == [(r.key, r.versions[0].decision, [(f.rule, f.turn, f.token) for f in r.versions[0].firings])
                              for r in many]


def test_too_long_conversation_is_skipped_with_its_length(parts, firing_policies):
    policy = compiled(firing_policies[0])
    long = [{"id": "long", "messages": [{"role": "user", "content": "x" * 300}, {"role": "assistant", "content": "y"}]}]
    out = Scanner(parts.model, parts.tokenizer, parts.sae, [policy]).scan(convs(long + short_conversations(2)))
    assert out[0].kind == "too_long" and "context of 128" in out[0].detail and out[0].key == "mem:1"
    assert out[1].versions and out[2].versions  # the others are scanned


def test_firing_positions_are_per_turn(parts, tmp_path):
    """A rule that fires everywhere fires at response token 0 of the first assistant turn
    (the template's first monitored token) and counts tokens over every turn."""
    policy = compiled(write_policy(tmp_path, rule_yaml("all", 0, -1.0) + "    allow_always_true: true\n"))
    res = Scanner(parts.model, parts.tokenizer, parts.sae, [policy]).scan(convs(short_conversations(3)))
    for r in res:
        (f,) = r.versions[0].firings
        assert (f.turn, f.scope, f.token) == (1, "response", 0) and f.tokens_fired > 5
        assert r.versions[0].decision == "block"


def firings(result):
    return {f.rule: (f.turn, f.scope, f.token) for f in result.versions[0].firings}


@pytest.mark.parametrize("template", ["chatml", "last_marked"])
def test_every_turn_is_evaluated_as_its_own_scan_request(parts, firing_policies, template, tmp_path):
    """Per rule, the earliest firing the backtest reports (turn, scope, token) is the earliest
    over ``Monitor.scan(messages[:k + 1])`` of every turn, and it blocks exactly when one of
    those requests is blocked: from one forward (ChatML) and from per-turn rows (a template
    that renders the last message differently, so no turn is a prefix of the conversation)."""
    if template == "last_marked":
        parts = tiny_parts()
        parts.tokenizer.chat_template = LAST_MARKED
    cand = write_policy(tmp_path, "")
    (cand / "p.yaml").write_text((firing_policies[0] / "p.yaml").read_text())
    mean = quantile_threshold(parts, [c.messages for c in convs()], 6, 0.8)
    with open(cand / "p.yaml", "a") as f:  # running-mean rules: causal too, so prefix-exact
        for scope in ("prompt", "response"):
            f.write(f"  - id: mean.{scope}\n    description: test\n    severity: low\n    mode: enforce\n"
                    f"    scope: {scope}\n    actions: [alert]\n"
                    f"    when: {{latent: 6, above: {mean}, aggregate: {{scope_mean: {{min_tokens: 3}}}}}}\n")
    policy = compiled(cand)
    cs = convs() + convs([{"id": "trailing", "messages": short_conversations(2)[1]["messages"] + [
        {"role": "user", "content": "rm -rf / now"}]}])
    results = Scanner(parts.model, parts.tokenizer, parts.sae, [policy], batch_size=8).scan(cs)
    multi = {r.replay for r, c in zip(results, cs) if len(c.messages) > 2}
    assert multi == {ONE_FORWARD if template == "chatml" else PER_TURN}
    mon = Monitor(parts.model, parts.tokenizer, sae=parts.sae, policies=policy, self_test=False, on_error="open")
    shadow = Monitor(parts.model, parts.tokenizer, sae=parts.sae, policies=compiled(shadow_copy(cand, tmp_path / "s")),
                     self_test=False, on_error="open")
    try:
        fired = earlier = 0
        means = set()
        for conv, res in zip(cs, results):
            expected, blocked = per_turn_scans(mon, conv, shadow)
            means |= {rule for rule in expected if rule.startswith("mean.")}
            assert firings(res) == expected, conv.id
            assert (res.versions[0].decision == "block") == blocked, conv.id
            fired += bool(expected)
            earlier += any(turn < len(conv.messages) - 1 for turn, _, _ in expected.values())
    finally:
        mon.close()
        shadow.close()
    assert fired >= 5 and earlier >= 2, "the rules were built to fire, in earlier turns too"
    assert means >= {"mean.prompt", "mean.response"}, "the scope-mean rules fire somewhere"


def test_one_forward_equals_one_row_per_turn(parts, firing_policies):
    """The one-forward plan gives the per-turn plan's results (positions, counts, decisions)."""
    both = [compiled(p) for p in firing_policies]
    one = Scanner(parts.model, parts.tokenizer, parts.sae, both, batch_size=8).scan(convs())
    ref = Scanner(parts.model, parts.tokenizer, parts.sae, both, batch_size=8, one_forward=False).scan(convs())
    assert [r.replay for r in one] == [ONE_FORWARD] * len(one) and {r.replay for r in ref} == {PER_TURN}
    assert [r.versions for r in one] == [r.versions for r in ref]
    assert sum(len(r.versions[0].firings) for r in one) >= 10


def test_real_tokenizer_boundary_merges_fall_back_to_per_turn_and_equal_scan(tmp_path):
    """SmolLM2's real tokenizer on the real multi-turn conversations (a tiny random model with
    its vocabulary): code replies starting with indentation merge with the template's newline,
    so those conversations are planned one row per turn; every conversation still equals the
    per-turn ``scan``s, rule by rule."""
    import transformers as tf

    from monitor.backtest.read import read_records
    from monitor.backtest.run import Parts
    from monitor.models import load_default_model
    from monitor.testing import TINY, tied_sae
    from tests.backtest.helpers import DATA

    tok = load_default_model()[1]
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(**{**TINY, "vocab_size": len(tok), "max_position_embeddings": 2048}, num_key_value_heads=2)
    parts = Parts(tf.AutoModelForCausalLM.from_config(cfg).eval(), tok, tied_sae(2), None)
    cs = [r for r in read_records([DATA]) if isinstance(r, Conversation) and len(r.messages) > 2]
    msgs = [c.messages for c in cs]
    policy = compiled(write_policy(tmp_path, rule_yaml("r.block", 3, quantile_threshold(parts, msgs, 3, 0.995)),
                                   rule_yaml("p.alert", 5, quantile_threshold(parts, msgs, 5, 0.99), scope="prompt",
                                             actions="[log, alert]")))
    results = Scanner(parts.model, tok, parts.sae, [policy], batch_size=8).scan(cs)
    assert {r.replay for r in results} == {ONE_FORWARD, PER_TURN}
    mon = Monitor(parts.model, tok, sae=parts.sae, policies=policy, self_test=False, on_error="open")
    shadow = Monitor(parts.model, tok, sae=parts.sae, policies=compiled(shadow_copy(tmp_path, tmp_path / "s")),
                     self_test=False, on_error="open")
    try:
        earlier = 0
        for conv, res in zip(cs, results):
            expected, blocked = per_turn_scans(mon, conv, shadow)
            assert firings(res) == expected, conv.id
            assert (res.versions[0].decision == "block") == blocked, conv.id
            earlier += any(scope == "response" and turn < len(conv.messages) - 1
                           for turn, scope, _ in expected.values())
    finally:
        mon.close()
        shadow.close()
    assert earlier >= 1, "the block rule fires in an earlier turn of some conversation"


def test_bfloat16_runs_the_forward_under_autocast_and_encodes_in_float32(parts, firing_policies):
    """``dtype="bfloat16"``: the model's matmuls run in bfloat16 (autocast), the encoder gets a
    float32 residual outside autocast, and the activations differ from float32's by rounding
    only (same conversations, comparable values)."""
    policy = compiled(firing_policies[0])
    seen: dict[str, list] = {"matmul": [], "encode": []}
    layer = parts.model.model.layers[0].mlp.down_proj
    handle = layer.register_forward_hook(lambda m, i, o: seen["matmul"].append(o.dtype) and None)
    try:
        results = {}
        for dtype in ("float32", "bfloat16"):
            scanner = Scanner(parts.model, parts.tokenizer, parts.sae, [policy], batch_size=8, dtype=dtype)
            encode = scanner.encoders[0].encode

            def spy(resid, *a, _encode=encode, **kw):
                seen["encode"].append((resid.dtype, torch.is_autocast_enabled("cpu")))
                return _encode(resid, *a, **kw)

            scanner.encoders[0].encode = spy  # type: ignore[method-assign]
            seen["matmul"].clear()
            seen["encode"].clear()
            results[dtype] = scanner.scan(convs())
            want = torch.float32 if dtype == "float32" else torch.bfloat16
            assert seen["matmul"] and set(seen["matmul"]) == {want}, dtype
            assert set(seen["encode"]) == {(torch.float32, False)}, dtype
    finally:
        handle.remove()
    f32 = [(r.key, f.rule, f.turn, f.position, f.activation) for r in results["float32"] for f in r.versions[0].firings]
    b16 = [(r.key, f.rule, f.turn, f.position, f.activation) for r in results["bfloat16"]
           for f in r.versions[0].firings]
    same_place = {x[:4]: x[4] for x in f32}.keys() & {x[:4]: x[4] for x in b16}.keys()
    assert len(same_place) >= 5
    a32, a16 = {x[:4]: x[4] for x in f32}, {x[:4]: x[4] for x in b16}
    diffs = [abs(a32[k] - a16[k]) for k in same_place]
    assert max(diffs) > 0, "bfloat16 rounding changed no activation: autocast did not take effect"
    assert max(diffs) < 0.05 * max(abs(a32[k]) for k in same_place)


def test_float32_is_the_default_and_unchanged(parts, firing_policies):
    """An explicit ``dtype="float32"`` is the default: the same results, bit for bit (the
    default's exactness against ``scan`` is what the tests above check)."""
    policy = compiled(firing_policies[0])
    default = Scanner(parts.model, parts.tokenizer, parts.sae, [policy], batch_size=8)
    explicit = Scanner(parts.model, parts.tokenizer, parts.sae, [policy], batch_size=8, dtype="float32")
    assert default.dtype == "float32"
    assert default.scan(convs()) == explicit.scan(convs())


@pytest.mark.parametrize("bad", ["float16", "bf16", "fp32", ""])
def test_an_unknown_dtype_is_refused_naming_the_option_and_the_valid_values(parts, firing_policies, bad):
    from monitor.backtest.scan import DtypeError
    from monitor.errors import MonitorError

    with pytest.raises(DtypeError, match=r"--dtype .*must be one of float32, bfloat16") as info:
        Scanner(parts.model, parts.tokenizer, parts.sae, [compiled(firing_policies[0])], dtype=bad)
    assert isinstance(info.value, MonitorError) and repr(bad) in str(info.value)


def _probe_at(tmp_path, layer: int):
    """A catalog with one probe ``t.deep`` read at ``layer`` (random direction, seeded)."""
    import yaml
    from safetensors.torch import save_file

    from monitor.catalog import load_catalog

    weight = torch.randn(64, generator=torch.Generator().manual_seed(11))
    save_file({"deep.weight": weight, "deep.bias": torch.tensor(0.0)}, str(tmp_path / "cat.probes.safetensors"))
    (tmp_path / "cat.yaml").write_text(yaml.safe_dump({"sae": "tiny", "layer": 2, "features": [
        {"name": "t.deep", "probe": "deep", "layer": layer}]}))
    return load_catalog(tmp_path / "cat.yaml"), weight


@pytest.mark.parametrize("layer", [3, 1])
def test_a_probe_at_another_layer_is_read_at_that_layer_as_scan_reads_it(parts, tmp_path, layer):
    from monitor.capture import HookPoint, capture
    from monitor.data import token_ids
    from monitor.policy import PolicySet, Rule

    catalog, weight = _probe_at(tmp_path, layer)
    cs = convs()
    values = []
    for c in cs:
        ids = torch.tensor([token_ids(parts.tokenizer.apply_chat_template(list(c.messages), tokenize=True))])
        values.append((capture(parts.model, ids, HookPoint(layer))[0, 1:] @ weight))
    threshold = float(torch.quantile(torch.cat(values), 0.9))
    rule = Rule.model_validate({"id": "deep.block", "description": "probe at another layer", "severity": "high",
                                "when": {"feature": "t.deep", "above": threshold},
                                "actions": [{"block": {"message": "BLOCKED"}}]})
    policy = compile_policies(PolicySet.from_rules([rule]), catalog, d_sae=16)
    scanner = Scanner(parts.model, parts.tokenizer, parts.sae, [policy], catalog, batch_size=8)
    assert scanner.extra_layers == (layer,)
    results = scanner.scan(cs)
    mon = Monitor(parts.model, parts.tokenizer, sae=parts.sae, policies=policy, catalog=catalog, self_test=False)
    try:
        flagged = 0
        for conv, res in zip(cs, results):
            report = mon.scan(list(conv.messages))
            hits = [h for h in report.hits if h.scope == "response"]
            if not hits:
                continue
            flagged += 1
            firing = next(f for f in res.versions[0].firings if f.rule == "deep.block")
            if firing.turn == len(conv.messages) - 1:  # the last turn: the token and value scan saw
                first = min(hits, key=lambda h: h.token_index)
                assert firing.token == first.token_index
                assert firing.activation == pytest.approx(float(first.activation), rel=1e-4, abs=1e-4)
    finally:
        mon.close()
    assert flagged > 0, "the rule was built to fire on some conversations"
    # read at the SAE's layer instead, the same direction decides differently: the layer matters
    at_sae = [v for v in (capture(parts.model, torch.tensor([token_ids(parts.tokenizer.apply_chat_template(
        list(c.messages), tokenize=True))]), HookPoint(2))[0, 1:] @ weight for c in cs)]
    assert not torch.allclose(torch.cat(at_sae), torch.cat(values), atol=1e-2)
