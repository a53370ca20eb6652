"""End to end on the real default model, SAE, catalog and shipped policies: the base against
itself is a no-op (no false alarm), with both the greedy and the fixed-seed sampled pass."""

from __future__ import annotations

import torch

from monitor.drift import Options, drift
from monitor.drift.inputs import default_prompts, default_texts


def test_default_model_against_itself_reports_every_rule_unchanged(default_model):
    prompts = default_prompts()
    picked = [prompts[0], prompts[4], prompts[16], prompts[20]]      # two code requests, two questions
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = drift("default", ["default"], prompts=picked, texts=default_texts()[:4],
                       models={"default": default_model},
                       options=Options(max_new_tokens=12, batch_size=4, contexts=0, kl_tokens=8))
    finally:
        torch.set_num_threads(threads)
    cand = result.candidates[0]
    assert len(cand.rules) >= 9                       # the shipped policies' rules
    assert all(r.verdict == "unchanged" and r.delta == 0 for r in cand.rules)
    assert all(f.verdict == "unchanged" for f in cand.features) and len(cand.features) >= 9
    assert cand.n_latents_up == cand.n_latents_down == 0 and cand.drift_score == 0.0
    assert cand.kl.mean == 0.0 and cand.lens.norm == 0.0
    assert 0.0 < cand.fvu.base < 0.5 and cand.fvu.candidate == cand.fvu.base
    assert result.exit_code == 0
    # the sampled pass really sampled (with the fixed seed both models gave the same answers)
    assert result.base_responses[0] != result.base_responses[1] or len(set(result.base_responses[1])) > 1
