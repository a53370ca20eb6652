"""Parity: the vLLM path and the transformers path agree on the same prompts, greedy.

Same tokens, same rule hits (rule, scope, token index) and feature peaks within
:data:`PEAK_TOL` (float32 on both sides; the difference is kernel rounding: vLLM's CPU
attention and fused norms against transformers' eager ones). Covers a block mid-response, a
steer (which must change the text), chunked prefill (the engine prefills 16 tokens per step)
and a policy reload reaching the workers.
"""

from __future__ import annotations

import pytest
import torch

import monitor
from monitor.runtime.vllm.engine import VLLMMonitor

pytestmark = pytest.mark.e2e

MAX_TOKENS = 40
#: Largest |peak_vllm - peak_transformers| allowed for any watched feature (measured: see docs/vllm.md).
PEAK_TOL = 0.05
PROMPTS = [
    "Write a Python function that runs a shell command given by the user.",
    "What is the capital of France?",
    "Write a haiku about autumn.",
]
STEER_POLICY = """\
version: "parity-steer"
rules:
  - id: parity.always.steer
    description: Fires on every response token and pushes one latent up for the rest of the reply.
    severity: low
    mode: enforce
    scope: response
    when: {latent: 8068, below: 1.0e6}
    actions: [log, {steer: {latent: 100, clamp: 20.0, duration: rest_of_response}}]
"""


@pytest.fixture(scope="module")
def hf_model(default_model):
    return default_model


def hf_run(model, tokenizer, policy_dir, prompts):
    """The transformers path (monitor.wrap + generate), one prompt at a time, greedy."""
    mon = monitor.wrap(model, tokenizer, policies=str(policy_dir))
    try:
        results = []
        for prompt in prompts:
            messages = [{"role": "user", "content": prompt}]
            ids = torch.tensor([list(monitor.data.token_ids(tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True)))])
            out = mon.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_TOKENS,
                               do_sample=False, pad_token_id=tokenizer.pad_token_id)
            results.append((out[0, ids.shape[1]:].tolist(), mon.last_report))
        return results
    finally:
        mon.close()


def hit_keys(report):
    return [(h.rule_id, h.scope, h.token_index) for h in report.hits]


def peak_gap(a, b) -> float:
    gap = 0.0
    for scope in set(a.peaks) | set(b.peaks):
        pa = a.peaks[scope].float().clamp_min(0)
        pb = b.peaks[scope].float().clamp_min(0)
        gap = max(gap, float((pa - pb).abs().max()))
    return gap


def assert_parity(vllm_out, hf_out):
    gaps = []
    for completion, (hf_tokens, hf_report) in zip(vllm_out, hf_out):
        assert list(completion.token_ids) == hf_tokens
        assert hit_keys(completion.report) == hit_keys(hf_report)
        assert completion.report.outcome == hf_report.outcome
        assert {r: (b.rule_id, b.scope, b.token_index) for r, b in completion.report.blocks.items()} == \
            {r: (b.rule_id, b.scope, b.token_index) for r, b in hf_report.blocks.items()}
        assert completion.report.tokens_monitored == hf_report.tokens_monitored
        assert set(completion.report.peaks) == set(hf_report.peaks)
        gaps.append(peak_gap(completion.report, hf_report))
    print(f"max peak gap vllm vs transformers: {max(gaps):.2e}")
    assert max(gaps) < PEAK_TOL
    return max(gaps)


def test_same_tokens_hits_and_peaks_with_a_block_mid_response(vllm_monitor: VLLMMonitor, hf_model, policy_dir):
    model, tokenizer = hf_model
    vllm_out = vllm_monitor.generate(PROMPTS, max_tokens=MAX_TOKENS)
    hf_out = hf_run(model, tokenizer, policy_dir, PROMPTS)
    assert_parity(vllm_out, hf_out)
    blocked = vllm_out[0]
    assert blocked.finish_reason == "blocked"
    block = blocked.report.blocks[0]
    assert block.scope == "response" and 0 < block.token_index < MAX_TOKENS  # mid-response
    assert blocked.text.endswith(block.message)
    assert [c.finish_reason for c in vllm_out[1:]] != ["blocked", "blocked"]


def test_steering_parity_after_a_policy_reload(vllm_monitor: VLLMMonitor, hf_model, policy_dir):
    model, tokenizer = hf_model
    prompts = PROMPTS[1:]
    before = vllm_monitor.generate(prompts, max_tokens=MAX_TOKENS)
    old_version = vllm_monitor.policy_version
    (policy_dir / "parity_steer.yaml").write_text(STEER_POLICY)
    try:
        new_version = vllm_monitor.reload()
        assert new_version != old_version
        steered = vllm_monitor.generate(prompts, max_tokens=MAX_TOKENS)
        hf_out = hf_run(model, tokenizer, policy_dir, prompts)
    finally:
        (policy_dir / "parity_steer.yaml").unlink()
        vllm_monitor.reload()
    assert all(c.report.policy_version == new_version for c in steered)
    assert all(c.report.outcome == "steered" for c in steered)
    assert [c.token_ids for c in steered] != [c.token_ids for c in before]  # the steer changed the text
    assert_parity(steered, hf_out)
