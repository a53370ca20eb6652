"""Batched teacher-forced scanning equals scanning one transcript at a time."""

from __future__ import annotations

import pytest
import torch

from monitor.runtime.hf import Monitor
from monitor.runtime.scan import ScanItem, length_buckets, monitor_mask, pad_batch
from monitor.testing import compiled_policy, rule_yaml, tied_sae, tiny_model

TEXTS = ["short", "a somewhat longer text about bridges and rivers", "x" * 40, "",
         "def f(cmd):\n    os.system(cmd)\n", "hello there, how are you today?"]


def test_length_buckets_group_similar_lengths_and_keep_every_index():
    lengths = [5, 50, 7, 48, 6, 49]
    batches = length_buckets(lengths, batch_size=3)
    assert sorted(i for b in batches for i in b) == list(range(6))
    assert batches[0] == [1, 5, 3] and sorted(batches[1]) == [0, 2, 4]
    assert length_buckets(lengths, batch_size=8, max_tokens=100) == [[1, 5], [3, 2], [4, 0]]


def test_pad_batch_and_mask():
    ids, attention = pad_batch([[7, 1, 2], [7, 3]], pad=0)
    assert ids.tolist() == [[7, 1, 2], [7, 3, 0]] and attention.tolist() == [[1, 1, 1], [1, 1, 0]]
    mask = monitor_mask(ids, attention.sum(1), torch.tensor([7]), include_special_tokens=False)
    assert mask.tolist() == [[False, True, True], [False, True, False]]


def assert_same_report(a, b):
    assert [(h.rule_id, h.scope, h.token_index) for h in a.hits] == [(h.rule_id, h.scope, h.token_index) for h in b.hits]
    assert a.tokens_monitored == b.tokens_monitored and a.outcome == b.outcome
    assert {k: v.shape for k, v in a.peaks.items()} == {k: v.shape for k, v in b.peaks.items()}
    for scope in a.peaks:
        assert torch.allclose(a.peaks[scope], b.peaks[scope], atol=1e-5, rtol=1e-5)


def test_batched_scan_equals_one_at_a_time_on_a_tiny_model(tiny_tokenizer):
    policy = compiled_policy(rule_yaml(above=0.02, actions="[log, {block: {message: STOP}}]"))
    mon = Monitor(tiny_model("llama"), tiny_tokenizer, sae=tied_sae(), policies=policy, self_test=False)
    items = [ScanItem(t) for t in TEXTS] + [ScanItem("the answer", prompt="a question?")]
    batched = mon.scan_many(items, batch_size=4)
    single = [mon.scan(item.text, prompt=item.prompt) for item in items]
    assert len(batched) == len(items)
    assert any(r.hits for r in single)
    for a, b in zip(batched, single):
        assert_same_report(a, b)
    mon.close()


@pytest.mark.e2e
def test_batched_scan_equals_one_at_a_time_on_the_default_model(default_model):
    from monitor import wrap

    model, tokenizer = default_model
    mon = wrap(model, tokenizer, self_test=False)
    items = [[{"role": "user", "content": "Run this for me"},
              {"role": "assistant", "content": "import os\nos.system(input())"}],
             "The committee met on Tuesday to review the budget.",
             [{"role": "user", "content": "I think the earth is flat, right?"},
              {"role": "assistant", "content": "You're absolutely right, great point!"}]]
    batched = mon.scan_many(items, batch_size=3)
    for item, report in zip(items, batched):
        assert_same_report(report, mon.scan(item))
    assert all(r.tokens_monitored["response"] > 0 for r in batched)
    mon.close()


def _autocast_probe(model):
    """Record, for every q_proj call, whether CPU autocast to bfloat16 was on."""
    seen: list[bool] = []
    layer = model.model.layers[0].self_attn.q_proj
    handle = layer.register_forward_hook(lambda *_: seen.append(
        torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16))
    return seen, handle


def test_scan_many_bfloat16_runs_the_forward_under_autocast_and_stays_close(tiny_tokenizer):
    policy = compiled_policy(rule_yaml(above=0.02, actions="[log, {block: {message: STOP}}]"))
    model = tiny_model("llama")
    mon = Monitor(model, tiny_tokenizer, sae=tied_sae(), policies=policy, self_test=False)
    items = [ScanItem(t) for t in TEXTS]
    seen, handle = _autocast_probe(model)
    try:
        exact = mon.scan_many(items, batch_size=4)
        assert seen and not any(seen), "float32 (the default) must not autocast"
        seen.clear()
        fast = mon.scan_many(items, batch_size=4, dtype="bfloat16")
        assert seen and all(seen)
    finally:
        handle.remove()
        mon.close()
    for a, b in zip(exact, fast):
        assert a.tokens_monitored == b.tokens_monitored
        for scope in a.peaks:
            assert b.peaks[scope].dtype == torch.float32  # encoded in float32
            assert torch.allclose(a.peaks[scope], b.peaks[scope], rtol=5e-2, atol=5e-2)
            assert not torch.equal(a.peaks[scope], b.peaks[scope]) or not a.peaks[scope].any()


def test_scan_many_refuses_an_unknown_dtype_before_any_forward(tiny_tokenizer):
    from monitor.errors import MonitorError
    from monitor.runtime.scan import DtypeError

    model = tiny_model("llama")
    mon = Monitor(model, tiny_tokenizer, sae=tied_sae(), policies=compiled_policy(rule_yaml(above=0.02)),
                  self_test=False)
    seen, handle = _autocast_probe(model)
    try:
        with pytest.raises(DtypeError, match=r"--dtype .*must be one of float32, bfloat16, not 'float16'") as info:
            mon.scan_many([ScanItem(TEXTS[0])], dtype="float16")
        assert isinstance(info.value, MonitorError)
        assert seen == []
    finally:
        handle.remove()
        mon.close()
