"""The ``scope_mean`` aggregate: the running mean over every monitored token of the scope.

The reference comparison over random trees and chunkings is in test_engine_properties; here are
the behaviours named in its contract: the mean is reported, ``min_tokens``, masks, NaN, scopes,
float chunking invariance, batch-first state, the file format and the compiled leaf.
"""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from monitor.policy.kernels import ScopeState
from monitor.policy.schema import Leaf
from tests.policy.helpers import columns, compiled, ones

MEAN_RULE = """
- id: mean
  description: mean of latent 7 over the scope
  severity: high
  when: {latent: 7, above: 2.0, aggregate: {scope_mean: {min_tokens: 3}}}
  actions: [log, {block: {message: refused}}]
"""


def feats(policy, values: list[list[float]]) -> torch.Tensor:
    """Latent 7 set to ``values[b][t]``, every other latent 0."""
    out = torch.zeros(len(values), len(values[0]), 64)
    out[..., 7] = torch.tensor(values)
    return columns(policy, out)


def test_fires_on_the_running_mean_from_min_tokens_and_reports_it():
    policy = compiled(MEAN_RULE)
    state = policy.new_state(1)
    # Running means 9, 4.5, 3.0, 2.25, 1.8: the first two exceed 2 but come before min_tokens.
    r = policy.step(state, feats(policy, [[9.0, 0.0, 0.0, 0.0, 0.0]]), ones(1, 5), "response")
    assert [(h.token_index, h.activation) for h in r.hits] == [(2, 3.0), (3, 2.25)]
    assert r.block.tolist() == [True]


def test_masked_tokens_do_not_count_towards_sum_or_min_tokens():
    policy = compiled(MEAN_RULE)
    state = policy.new_state(1)
    mask = torch.tensor([[True, False, True, False, True, True]])
    r = policy.step(state, feats(policy, [[3.0, -100.0, 3.0, -100.0, 3.0, 0.0]]), mask, "response")
    # Monitored: 3, 3, 3 (mean 3 at the 3rd monitored token = index 4), then 0 -> 2.25.
    assert [(h.token_index, h.activation) for h in r.hits] == [(4, 3.0), (5, 2.25)]


def test_a_nan_fails_the_test_for_the_rest_of_the_scope_and_not_passes():
    policy = compiled("""
    - {id: mean, description: d, severity: low, scope: response, actions: [log],
       when: {latent: 7, above: 2.0, aggregate: {scope_mean: {min_tokens: 1}}}}
    - {id: not_mean, description: d, severity: low, scope: response, actions: [log],
       when: {not: {latent: 7, above: 2.0, aggregate: {scope_mean: {min_tokens: 1}}}}}
    """)
    state = policy.new_state(1)
    r1 = policy.step(state, feats(policy, [[5.0, math.nan]]), ones(1, 2), "response")
    r2 = policy.step(state, feats(policy, [[50.0]]), ones(1, 1), "response")
    assert r1.fired[0, :, 0].tolist() == [True, False] and r2.fired[0, :, 0].tolist() == [False]
    assert r1.fired[0, :, 1].tolist() == [False, True] and r2.fired[0, :, 1].tolist() == [True]


def test_prompt_and_response_keep_their_own_means():
    policy = compiled(MEAN_RULE)
    state = policy.new_state(1)
    prompt = policy.step(state, feats(policy, [[9.0, 9.0, 9.0]]), ones(1, 3), "prompt")
    assert len(prompt.hits) == 1  # block at the 3rd prompt token (mean 9)
    state = policy.new_state(1)
    policy.step(state, feats(policy, [[0.0, 0.0, 0.0]]), ones(1, 3), "prompt")
    r = policy.step(state, feats(policy, [[3.0, 3.0, 3.0]]), ones(1, 3), "response")
    # The response mean starts fresh: 3 at its 3rd token, not (0+0+0+3+3+3)/6 = 1.5.
    assert [(h.scope, h.token_index, h.activation) for h in r.hits] == [("response", 2, 3.0)]


def test_float_chunking_gives_identical_decisions_and_values():
    """Arbitrary floats (not an exact grid): one call, one token per call and random chunks give
    the same firings and the same reported means, bit for bit."""
    gen = torch.Generator().manual_seed(0)
    policy = compiled("""
    - {id: a, description: d, severity: low, actions: [log],
       when: {latent: 7, above: 0.05, aggregate: {scope_mean: {min_tokens: 2}}}}
    - {id: b, description: d, severity: low, actions: [log],
       when: {latent: 7, below: -0.05, aggregate: scope_mean}}
    """)
    values = torch.randn(3, 200, generator=gen) * 3 + 0.02
    mask = torch.rand(3, 200, generator=gen) > 0.2
    x = feats(policy, values.tolist())

    def run(bounds: list[int]):
        state = policy.new_state(3)
        fired, hits = [], []
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            r = policy.step(state, x[:, lo:hi], mask[:, lo:hi], "response")
            fired.append(r.fired)
            hits += [(h.rule_id, h.row, h.token_index, h.activation) for h in r.hits]
        return torch.cat(fired, 1), sorted(hits), state.scopes["response"].mean_sum

    whole = run([0, 200])
    per_token = run(list(range(201)))
    chunks = run([0, 7, 8, 50, 51, 133, 200])
    assert whole[0].any() and (~whole[0]).any()
    for other in (per_token, chunks):
        assert torch.equal(other[0], whole[0]) and other[1] == whole[1]
        assert torch.equal(other[2], whole[2])


def test_state_tensors_are_batch_first_so_rows_concatenate():
    """Concatenating every tensor field of two one-row states along dim 0 steps exactly like the
    two states stepped on their own (what batching many requests relies on)."""
    policy = compiled(MEAN_RULE + """
- {id: win, description: d, severity: low, actions: [log],
   when: {latent: 7, above: 1.0, aggregate: {window_mean: {tokens: 4}}}}
- {id: run, description: d, severity: low, actions: [log],
   when: {latent: 7, above: 1.0, aggregate: {consecutive: {tokens: 2}}}}
""")
    rows = [[[1.0, 4.0, 0.5, 2.5]], [[3.0, 0.0, 2.0, 2.0]]]
    nxt = [[[2.0, 1.0]], [[0.0, 9.0]]]
    singles = [policy.new_state(1) for _ in rows]
    for st, v in zip(singles, rows):
        policy.step(st, feats(policy, v), ones(1, 4), "response")
    merged = policy.new_state(2)
    scope = merged.scopes["response"]
    for name, value in vars(scope).items():
        if isinstance(value, torch.Tensor):
            parts = [vars(s.scopes["response"])[name] for s in singles]
            setattr(scope, name, torch.cat(parts, 0))
    scope.tokens_seen = 4
    together = policy.step(merged, feats(policy, [n[0] for n in nxt]), ones(2, 2), "response")
    apart = [policy.step(st, feats(policy, v), ones(1, 2), "response").fired
             for st, v in zip(singles, nxt)]
    assert torch.equal(together.fired, torch.cat(apart, 0))
    assert together.fired.any()
    for name, value in vars(ScopeState.fresh(policy.programs["response"], 5,
                                             torch.device("cpu"))).items():
        if isinstance(value, torch.Tensor):
            assert value.shape[0] == 5, name


def test_file_format_bare_word_default_and_errors():
    leaf = Leaf.model_validate({"latent": 1, "above": 0.3, "aggregate": "scope_mean"})
    assert leaf.aggregate.kind == "scope_mean" and leaf.aggregate.min_tokens == 8
    assert Leaf.model_validate({"latent": 1, "above": 0.3,
                                "aggregate": {"scope_mean": {"min_tokens": 2}}}).aggregate.min_tokens == 2
    with pytest.raises(ValidationError, match="greater than or equal to 1"):
        Leaf.model_validate({"latent": 1, "above": 0.3, "aggregate": {"scope_mean": {"min_tokens": 0}}})
    with pytest.raises(ValidationError, match="tokens"):
        Leaf.model_validate({"latent": 1, "above": 0.3, "aggregate": {"scope_mean": {"tokens": 8}}})


def test_compiled_leaf_carries_min_tokens():
    policy = compiled(MEAN_RULE)
    (leaf,) = policy.rules[0].leaves
    assert (leaf.aggregate, leaf.min_tokens, leaf.threshold) == ("scope_mean", 3, 2.0)
    prog = policy.programs["response"]
    assert prog.n_mean == 1 and prog.mean_min_tokens.tolist() == [3]
    # Same feature and threshold with a different min_tokens: two leaves, not one.
    two = compiled(MEAN_RULE.replace("min_tokens: 3", "min_tokens: 4")
                   + MEAN_RULE.replace("id: mean", "id: mean2"))
    assert two.programs["response"].n_mean == 2
