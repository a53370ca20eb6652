"""``CompiledPolicy.step_many`` (many one-row requests in one evaluation) against ``step`` alone.

Requests join and leave at different times and sit at different positions, as under continuous
batching; every decision (fired, hits with their token indices, blocks, steering in force,
window and run state) must be what stepping each request on its own gives.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from monitor.errors import EngineError
from monitor.policy import PolicySet, Rule, compile_policies
from tests.policy.test_engine_properties import N_LATENTS, conditions, quarters

D_SAE = 16


def policy_with_actions(conds: list[dict]):
    """Each condition as an enforce rule that logs, blocks or steers (both durations)."""
    actions = [["log"], ["log", {"block": {"message": "stop"}}],
               [{"steer": {"latent": 1, "clamp": 0.0}}],
               [{"steer": {"latent": 2, "scale": 0.5, "duration": "rest_of_response"}}]]
    rules = [Rule.model_validate({"id": f"r{i}", "description": "test", "severity": "high", "scope": "both",
                                  "when": c, "actions": actions[i % 4],
                                  "allow_always_true": True})
             for i, c in enumerate(conds)]
    return compile_policies(PolicySet.from_rules(rules), None, d_sae=D_SAE)


def summary(result) -> tuple:
    return (result.fired.tolist(), result.hits, result.block.tolist(), result.block_messages, result.steer)


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_step_many_equals_stepping_each_request_alone(data: st.DataObject) -> None:
    conds = data.draw(st.lists(conditions, min_size=1, max_size=4))
    policy = policy_with_actions(conds)
    n = data.draw(st.integers(1, 5))
    starts = data.draw(st.lists(st.integers(0, 6), min_size=n, max_size=n))
    lengths = data.draw(st.lists(st.integers(1, 10), min_size=n, max_size=n))
    acts = [[[data.draw(quarters) for _ in range(N_LATENTS)] for _ in range(16)] for _ in range(n)]
    masks = [[data.draw(st.booleans()) or data.draw(st.booleans()) for _ in range(16)] for _ in range(n)]
    feats = torch.tensor(acts, dtype=torch.float32).index_select(-1, policy.latent_indices)
    mask = torch.tensor(masks)
    alone = [policy.new_state(1) for _ in range(n)]
    together = [policy.new_state(1) for _ in range(n)]
    for clock in range(max(s + n_ for s, n_ in zip(starts, lengths))):
        active = [i for i in range(n) if starts[i] <= clock < starts[i] + lengths[i]]
        if not active:
            continue
        pos = [clock - starts[i] for i in active]
        rows = torch.tensor(active)
        step_feats = torch.stack([feats[i, p:p + 1] for i, p in zip(active, pos)])
        step_mask = torch.stack([mask[i, p:p + 1] for i, p in zip(active, pos)])
        scope = "prompt" if clock % 3 == 0 else "response"
        many = policy.step_many([together[i] for i in active], step_feats, step_mask, scope)
        for k, i in enumerate(active):
            one = policy.step(alone[i], step_feats[k:k + 1], step_mask[k:k + 1], scope)
            assert summary(many[k]) == summary(one)
        assert len(rows) == len(many)
    for a, b in zip(alone, together):
        for scope in ("prompt", "response"):
            sa, sb = a.scopes[scope], b.scopes[scope]
            assert sa.tokens_seen == sb.tokens_seen
            assert torch.equal(sa.history, sb.history) and torch.equal(sa.history_valid, sb.history_valid)
            assert torch.equal(sa.runs, sb.runs)
        assert a.active_steers(0) == b.active_steers(0)


def test_step_many_refuses_batched_states_and_foreign_states() -> None:
    policy = policy_with_actions([{"latent": 0, "above": 1.0}])
    other = policy_with_actions([{"latent": 0, "above": 1.0}])
    feats, mask = torch.zeros(2, 1, 1), torch.ones(2, 1, dtype=torch.bool)
    with pytest.raises(EngineError, match="one-row states"):
        policy.step_many([policy.new_state(2)], feats, mask, "response")
    with pytest.raises(EngineError, match="must come from this CompiledPolicy"):
        policy.step_many([policy.new_state(1), other.new_state(1)], feats, mask, "response")
    assert policy.step_many([], feats[:0], mask[:0], "response") == []
