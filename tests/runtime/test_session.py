"""The engine-agnostic core's many-request step: ``observe_many`` against each session alone."""

from __future__ import annotations

import pytest
import torch

from monitor.runtime.encoder import FeatureEncoder
from monitor.runtime.session import NOTHING, Session, observe_many
from monitor.testing import compiled_policy, random_sae

RULES = """\
version: '1'
rules:
  - id: hot
    description: latent 3 high for two tokens
    severity: high
    scope: both
    when: {latent: 3, above: 0.6, aggregate: {consecutive: {tokens: 2}}}
    actions: [log, {block: {message: BLOCKED}}]
  - id: calm
    description: latent 5 high on average
    severity: low
    scope: response
    when: {latent: 5, above: 0.4, aggregate: {window_mean: {tokens: 3}}}
    actions: [{steer: {latent: 5, scale: 0.5}}]
"""


def report_view(session: Session) -> tuple:
    report = session.finish()
    return (report.hits, dict(report.blocks), report.steers, report.row_outcomes,
            {k: v.tolist() for k, v in report.peaks.items()}, dict(report.tokens_monitored),
            {k: v.tolist() for k, v in report.sums.items()}, {k: v.tolist() for k, v in report.counts.items()},
            session.stopped.tolist())


@pytest.mark.parametrize("seed", range(6))
def test_observe_many_equals_each_session_alone(seed: int) -> None:
    sae = random_sae(d_in=16, d_sae=16, k=None, seed=seed)
    policy = compiled_policy(RULES, d_sae=16)
    encoder = FeatureEncoder(sae, policy, None)
    g = torch.Generator().manual_seed(seed)
    n, steps = 5, 12
    resid = torch.randn(n, steps, 16, generator=g) * 2
    mask = torch.rand(n, steps, generator=g) > 0.2
    starts = torch.randint(0, 5, (n,), generator=g).tolist()
    alone = [Session(policy, encoder, 1) for _ in range(n)]
    together = [Session(policy, encoder, 1) for _ in range(n)]
    for clock in range(steps + 5):
        active = [i for i in range(n) if starts[i] <= clock < starts[i] + steps - 4]
        if not active:
            continue
        scope = "prompt" if clock - min(starts) < 2 else "response"
        pos = [clock - starts[i] for i in active]
        feats = encoder.encode(torch.stack([resid[i, p:p + 1] for i, p in zip(active, pos)]))
        step_mask = torch.stack([mask[i, p:p + 1] for i, p in zip(active, pos)])
        many = observe_many([together[i] for i in active], feats, scope, step_mask)
        for k, i in enumerate(active):
            assert many[k] == alone[i].observe_features(feats[k:k + 1], scope, step_mask[k:k + 1])
    views = [report_view(s) for s in together]
    assert views == [report_view(s) for s in alone]
    assert any(v[0] for v in views), "the random activations should fire at least one rule"


def test_a_stopped_or_failed_session_is_not_stepped_and_a_fault_fails_each_session() -> None:
    sae = random_sae(d_in=16, d_sae=16, k=None)
    policy = compiled_policy(RULES, d_sae=16)
    encoder = FeatureEncoder(sae, policy, None)
    open_, closed, failed = (Session(policy, encoder, 1, on_error="open"),
                             Session(policy, encoder, 1, on_error="closed"), Session(policy, encoder, 1))
    failed.fail(RuntimeError("earlier fault"))
    feats = torch.full((3, 1, len(policy.features)), float("nan"))
    out = observe_many([open_, closed, failed], feats, "response", torch.ones(3, 1, dtype=torch.bool))
    assert out == [NOTHING] * 3
    assert open_.report.failed_open and open_.disabled and not open_.refused
    assert closed.refused and bool(closed.stopped[0]) and "non-finite" in (closed.report.error or "")
    assert failed.report.error == "RuntimeError: earlier fault"


def test_observe_many_refuses_mixed_policies() -> None:
    sae = random_sae(d_in=16, d_sae=16, k=None)
    a, b = compiled_policy(RULES, d_sae=16), compiled_policy(RULES, d_sae=16)
    sessions = [Session(a, FeatureEncoder(sae, a, None), 1), Session(b, FeatureEncoder(sae, b, None), 1)]
    with pytest.raises(ValueError, match="one CompiledPolicy"):
        observe_many(sessions, torch.zeros(2, 1, len(a.features)), "response", torch.ones(2, 1, dtype=torch.bool))
