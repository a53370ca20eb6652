"""Table tests for the engine's decisions: hits, block, steer, scopes, errors."""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode

from monitor.errors import EngineError
from monitor.policy import PolicySet, compile_policies
from tests.policy.helpers import columns, compiled, ones, rules_from_yaml

ONE_RULE = """
- id: shell
  description: block shell injection
  severity: high
  scope: response
  when: {latent: 7, above: 2.0}
  actions: [log, {block: {message: "refused"}}]
"""


def acts(batch: int, tokens: int, **values: dict[int, float]) -> torch.Tensor:
    """Zero activations [B, T, 64]; values like l7={(0, 2): 3.0} set latent 7 at row 0 token 2."""
    out = torch.zeros(batch, tokens, 64)
    for name, cells in values.items():
        for (b, t), v in cells.items():
            out[b, t, int(name[1:])] = v
    return out


def test_hit_fields_and_block():
    policy = compiled(ONE_RULE)
    state = policy.new_state(2)
    r = policy.step(state, columns(policy, acts(2, 3, l7={(1, 2): 5.0})), ones(2, 3), "response")
    assert [(h.rule_id, h.row, h.token_index, h.feature, h.activation) for h in r.hits] == [
        ("shell", 1, 2, "latent:7", 5.0)]
    assert r.hits[0].actions == ("log", "block") and r.hits[0].severity == "high"
    assert r.block.tolist() == [False, True]
    assert r.block_messages == {1: ("shell", "refused")}
    assert r.fired.shape == (2, 3, 1)


def test_token_index_counts_masked_tokens_and_masked_never_fire():
    policy = compiled(ONE_RULE)
    state = policy.new_state(1)
    mask = torch.tensor([[False, True, False]])
    a = acts(1, 3, l7={(0, 0): 9.0, (0, 1): 9.0, (0, 2): 9.0})
    r1 = policy.step(state, columns(policy, a), mask, "response")
    r2 = policy.step(state, columns(policy, a), mask, "response")
    assert [h.token_index for h in r1.hits + r2.hits] == [1, 4]
    assert state.tokens_seen("response") == 6


def test_scope_filters_rules():
    policy = compiled(ONE_RULE)
    state = policy.new_state(1)
    r = policy.step(state, columns(policy, acts(1, 1, l7={(0, 0): 9.0})), ones(1, 1), "prompt")
    assert r.hits == [] and not r.fired.any()
    assert state.tokens_seen("prompt") == 1 and state.tokens_seen("response") == 0


def test_shadow_rules_report_but_never_act():
    policy = compiled("""
    - id: quiet
      description: shadow trial
      severity: medium
      mode: shadow
      when: {latent: 7, above: 1.0}
      actions: [log, {block: {message: "no"}}, {steer: {latent: 7, clamp: 0}}]
    """)
    state = policy.new_state(1)
    r = policy.step(state, columns(policy, acts(1, 1, l7={(0, 0): 3.0})), ones(1, 1), "response")
    assert [h.mode for h in r.hits] == ["shadow"]
    assert not r.block.any() and r.block_messages == {} and r.steer == []
    assert state.active_steers(0) == ()


STEER = """
- id: calm
  description: steer while active
  severity: low
  when: {latent: 7, above: 1.0}
  actions: [{steer: {latent: 7, scale: 0.5}}]
- id: lock
  description: steer for the rest of the response
  severity: high
  when: {latent: 12, above: 1.0}
  actions: [{steer: {latent: 12, clamp: -1.5, duration: rest_of_response}}]
"""


def test_while_active_steer_is_in_force_only_after_firing_tokens():
    policy = compiled(STEER)
    state = policy.new_state(1)
    step = lambda v: policy.step(state, columns(policy, acts(1, 1, l7={(0, 0): v})),  # noqa: E731
                                 ones(1, 1), "response")
    assert step(3.0).steer[0].op == "scale" and step(3.0).steer[0].value == 0.5
    assert step(0.0).steer == []
    d = step(3.0).steer
    assert [(x.latent, x.duration, x.token_index) for x in d] == [(7, "while_active", 3)]


def test_rest_of_response_steer_persists():
    policy = compiled(STEER)
    state = policy.new_state(2)
    r = policy.step(state, columns(policy, acts(2, 3, l12={(1, 1): 2.0})), ones(2, 3), "prompt")
    assert [(d.row, d.rule_id, d.value, d.token_index, d.scope) for d in r.steer] == [
        (1, "lock", -1.5, 1, "prompt")]
    for _ in range(3):  # nothing fires any more, the directive stays in force
        r = policy.step(state, columns(policy, acts(2, 1)), ones(2, 1), "response")
        assert [d.rule_id for d in r.steer] == ["lock"] and r.hits == []
    assert state.active_steers(1)[0].latent == 12 and state.active_steers(0) == ()
    # Firing again does not duplicate the persisted directive.
    r = policy.step(state, columns(policy, acts(2, 1, l12={(1, 0): 2.0})), ones(2, 1), "response")
    assert len(state.active_steers(1)) == 1 and state.active_steers(1)[0].token_index == 1


def test_quiet_step_syncs_with_the_host_once():
    window = rules_from_yaml("""
    - id: w
      description: window
      severity: low
      when: {all: [{latent: 3, above: 1, aggregate: {window_mean: {tokens: 4}}},
                   {not: {latent: 9, below: 0, aggregate: {consecutive: {tokens: 2}}}}]}
      actions: [log]
    """)
    rules = rules_from_yaml(STEER) + rules_from_yaml(ONE_RULE) + window
    policy = compile_policies(PolicySet.from_rules(rules), None, d_sae=64)
    state = policy.new_state(4)
    policy.step(state, columns(policy, acts(4, 5)), ones(4, 5), "response")  # warm caches

    class Syncs(TorchFunctionMode):
        names = {"__bool__", "item", "tolist", "cpu", "nonzero", "numpy", "__int__", "__float__"}

        def __init__(self):
            super().__init__()
            self.seen: list[str] = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            name = getattr(func, "__name__", "")
            if name in self.names:
                self.seen.append(name)
            return func(*args, **(kwargs or {}))

    with Syncs() as syncs:
        r = policy.step(state, columns(policy, acts(4, 1)), ones(4, 1), "response")
    assert r.hits == [] and syncs.seen == ["__bool__"]
    with Syncs() as syncs:  # the runtime's non-finite check rides on the same sync
        r = policy.step(state, columns(policy, acts(4, 1)), ones(4, 1), "response", require_finite=True)
    assert r.hits == [] and syncs.seen == ["tolist"]


def test_require_finite_raises_on_nan_and_inf_only_when_asked():
    policy = compiled(ONE_RULE)
    for bad in (float("nan"), float("inf")):
        feats = columns(policy, acts(1, 3, l7={(0, 1): bad}))
        policy.step(policy.new_state(1), feats, ones(1, 3), "response")  # not asked: evaluated
        with pytest.raises(FloatingPointError):
            policy.step(policy.new_state(1), feats, ones(1, 3), "response", require_finite=True)
    fine = columns(policy, acts(1, 3, l7={(0, 1): 3.0}))
    assert policy.step(policy.new_state(1), fine, ones(1, 3), "response", require_finite=True).hits


def test_step_rejects_wrong_inputs():
    policy = compiled(ONE_RULE)
    other = compiled(ONE_RULE)
    state = policy.new_state(1)
    good = torch.zeros(1, 2, 1)
    with pytest.raises(EngineError, match="different CompiledPolicy"):
        other.step(state, good, ones(1, 2), "response")
    with pytest.raises(EngineError, match=r"shape \[batch, tokens, 1\]"):
        policy.step(state, torch.zeros(1, 2, 3), ones(1, 2), "response")
    with pytest.raises(EngineError, match="mask must be a bool"):
        policy.step(state, good, torch.ones(1, 2), "response")
    with pytest.raises(EngineError, match="batch size 1"):
        policy.step(state, torch.zeros(2, 2, 1), ones(2, 2), "response")
    with pytest.raises(EngineError, match="scope"):
        policy.step(state, good, ones(1, 2), "both")  # type: ignore[arg-type]


def test_no_rules_for_scope_and_empty_policy():
    policy = compile_policies(PolicySet.from_rules([]), None, d_sae=8)
    r = policy.step(policy.new_state(2), torch.zeros(2, 3, 0), ones(2, 3), "prompt")
    assert r.fired.shape == (2, 3, 0) and r.hits == [] and not r.block.any()
