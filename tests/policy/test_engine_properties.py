"""Property tests: the vectorised engine against a plain-Python reference implementation.

Activations and thresholds are drawn from a grid of quarters so every sum is exact and the
reference can use exact arithmetic: the two must agree bit for bit, whatever the chunking
(one call, one token per call, random chunks) and the mask.
"""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from monitor.policy import PolicySet, Rule, compile_policies

N_LATENTS = 4
D_SAE = 16
SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

quarters = st.integers(-4, 12).map(lambda i: i / 4)


def aggregates(kind: str | None = None) -> st.SearchStrategy:
    options = {
        "default": st.just(None),
        "each_token": st.just({"each_token": {}}),
        "window_mean": st.integers(1, 6).map(lambda n: {"window_mean": {"tokens": n}}),
        "count_in_window": st.integers(1, 6).flatmap(lambda n: st.integers(1, n).map(
            lambda k: {"count_in_window": {"tokens": n, "at_least": k}})),
        "consecutive": st.integers(1, 5).map(lambda n: {"consecutive": {"tokens": n}}),
        "scope_mean": st.one_of(st.just("scope_mean"), st.integers(1, 6).map(
            lambda n: {"scope_mean": {"min_tokens": n}})),
    }
    if kind is not None:
        return options[kind]
    return st.one_of(*options.values())


def leaves(kind: str | None = None) -> st.SearchStrategy:
    def build(latent: int, op: str, thr: float, agg: dict | None) -> dict:
        leaf = {"latent": latent, op: thr}
        if agg is not None:
            leaf["aggregate"] = agg
        return leaf
    return st.builds(build, st.integers(0, N_LATENTS - 1), st.sampled_from(["above", "below"]),
                     quarters, aggregates(kind))


conditions = st.recursive(
    leaves(),
    lambda kids: st.one_of(st.lists(kids, min_size=1, max_size=3).map(lambda c: {"any": c}),
                           st.lists(kids, min_size=1, max_size=3).map(lambda c: {"all": c}),
                           kids.map(lambda c: {"not": c})),
    max_leaves=6)


@st.composite
def streams(draw: st.DrawFn, max_tokens: int = 24) -> tuple[list, list]:
    """(acts[B][T][N_LATENTS], mask[B][T]) on the quarter grid."""
    batch = draw(st.integers(1, 3))
    tokens = draw(st.integers(1, max_tokens))
    acts = [[[draw(quarters) for _ in range(N_LATENTS)] for _ in range(tokens)]
            for _ in range(batch)]
    mask = [[draw(st.booleans()) or draw(st.booleans()) for _ in range(tokens)]
            for _ in range(batch)]
    return acts, mask


# ------------------------------------------------------------------------------- reference


def ref_leaf(leaf: dict, acts: list, mask: list) -> list[bool]:
    op = "above" if "above" in leaf else "below"
    thr = Fraction(leaf[op])

    def passes(x: Fraction) -> bool:
        return x > thr if op == "above" else x < thr

    agg = leaf.get("aggregate") or {"each_token": {}}
    kind, opts = next(iter(({agg: {}} if isinstance(agg, str) else agg).items()))
    seen: list[Fraction] = []
    out = []
    for t, valid in enumerate(mask):
        if not valid:
            out.append(False)
            continue
        seen.append(Fraction(acts[t][leaf["latent"]]))
        if kind == "each_token":
            out.append(passes(seen[-1]))
        elif kind == "window_mean":
            window = seen[-opts["tokens"]:]
            out.append(passes(sum(window) / len(window)))
        elif kind == "count_in_window":
            out.append(sum(passes(x) for x in seen[-opts["tokens"]:]) >= opts["at_least"])
        elif kind == "scope_mean":  # every monitored token so far; default min_tokens 8
            out.append(len(seen) >= opts.get("min_tokens", 8) and passes(sum(seen) / len(seen)))
        else:
            n = opts["tokens"]
            out.append(len(seen) >= n and all(passes(x) for x in seen[-n:]))
    return out


def ref_cond(cond: dict, acts: list, mask: list) -> list[bool]:
    if "any" in cond:
        parts = [ref_cond(c, acts, mask) for c in cond["any"]]
        return [any(p[t] for p in parts) for t in range(len(mask))]
    if "all" in cond:
        parts = [ref_cond(c, acts, mask) for c in cond["all"]]
        return [all(p[t] for p in parts) for t in range(len(mask))]
    if "not" in cond:
        inner = ref_cond(cond["not"], acts, mask)
        return [m and not v for m, v in zip(mask, inner)]
    return ref_leaf(cond, acts, mask)


def reference(conds: list[dict], acts: list, mask: list) -> torch.Tensor:
    """Bool[B, T, R] fired by the reference implementation."""
    out = [[ref_cond(c, acts[b], mask[b]) for c in conds] for b in range(len(acts))]
    return torch.tensor(out, dtype=torch.bool).permute(0, 2, 1).reshape(
        len(acts), len(mask[0]), len(conds))


# ------------------------------------------------------------------------------- engine runs


def compile_conditions(conds: list[dict]):
    # Activations here range over negative values too (the engine takes any column), so
    # thresholds below zero are meaningful: allow what the loader refuses for SAE latents.
    rules = [Rule.model_validate({"id": f"r{i}", "description": "property test",
                                  "severity": "low", "when": c, "actions": ["log"],
                                  "allow_always_true": True})
             for i, c in enumerate(conds)]
    return compile_policies(PolicySet.from_rules(rules), None, d_sae=D_SAE)


def run_chunks(policy, acts: list, mask: list, cuts: list[int], scope: str = "response"):
    feats = torch.tensor(acts, dtype=torch.float32).index_select(-1, policy.latent_indices)
    mask_t = torch.tensor(mask, dtype=torch.bool)
    state = policy.new_state(len(acts))
    bounds = [0, *sorted(set(cuts)), mask_t.shape[1]]
    fired, hits = [], 0
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        if hi > lo:
            result = policy.step(state, feats[:, lo:hi], mask_t[:, lo:hi], scope)
            fired.append(result.fired)
            hits += len(result.hits)
    out = torch.cat(fired, 1)
    assert hits == int(out.sum())
    return out


def check(conds: list[dict], acts: list, mask: list, cuts: list[int]) -> None:
    policy = compile_conditions(conds)
    expected = reference(conds, acts, mask)
    tokens = len(mask[0])
    whole = run_chunks(policy, acts, mask, [])
    assert torch.equal(whole, expected), (conds, acts, mask)
    per_token = run_chunks(policy, acts, mask, list(range(1, tokens)))
    assert torch.equal(per_token, expected)
    chunked = run_chunks(policy, acts, mask, [c for c in cuts if 0 < c < tokens])
    assert torch.equal(chunked, expected)


# ------------------------------------------------------------------------------- properties


@pytest.mark.parametrize("kind", ["each_token", "window_mean", "count_in_window", "consecutive",
                                  "scope_mean"])
@SETTINGS
@given(data=st.data())
def test_each_aggregation_matches_reference(kind: str, data: st.DataObject) -> None:
    conds = data.draw(st.lists(leaves(kind), min_size=1, max_size=3))
    acts, mask = data.draw(streams())
    cuts = data.draw(st.lists(st.integers(0, 24), max_size=6))
    check(conds, acts, mask, cuts)


@SETTINGS
@given(data=st.data())
def test_condition_trees_match_reference(data: st.DataObject) -> None:
    conds = data.draw(st.lists(conditions, min_size=1, max_size=3))
    acts, mask = data.draw(streams())
    cuts = data.draw(st.lists(st.integers(0, 24), max_size=6))
    check(conds, acts, mask, cuts)


@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_scopes_keep_separate_windows(data: st.DataObject) -> None:
    """Interleaving prompt and response chunks equals evaluating each stream on its own."""
    conds = data.draw(st.lists(conditions, min_size=1, max_size=2))
    acts, mask = data.draw(streams(max_tokens=16))
    policy = compile_conditions(conds)
    feats = torch.tensor(acts).index_select(-1, policy.latent_indices)
    mask_t = torch.tensor(mask)
    tokens = mask_t.shape[1]
    labels = data.draw(st.lists(st.sampled_from(["prompt", "response"]), min_size=tokens,
                                max_size=tokens))
    state = policy.new_state(len(acts))
    got: dict[str, list[torch.Tensor]] = {"prompt": [], "response": []}
    for t, scope in enumerate(labels):
        got[scope].append(policy.step(state, feats[:, t:t + 1], mask_t[:, t:t + 1], scope).fired)
    for scope in ("prompt", "response"):
        idx = [t for t, s in enumerate(labels) if s == scope]
        if not idx:
            continue
        sub_acts = [[row[t] for t in idx] for row in acts]
        sub_mask = [[row[t] for t in idx] for row in mask]
        assert torch.equal(torch.cat(got[scope], 1), reference(conds, sub_acts, sub_mask))
        assert state.tokens_seen(scope) == len(idx)  # type: ignore[arg-type]
