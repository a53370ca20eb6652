from __future__ import annotations

import pytest
import torch

from monitor.capture import BLOCK_PATHS, HookPoint, capture, find_blocks, residual_hook
from monitor.errors import MonitorError, UnsupportedModelError
from monitor.testing import tiny_model

ARCHS = ["llama", "mistral", "qwen2", "gemma2", "gpt2", "gpt_neox", "phi3"]


@pytest.mark.parametrize("arch", ARCHS)
def test_capture_matches_output_hidden_states(arch):
    model = tiny_model(arch)
    ids = torch.randint(0, 300, (2, 10))
    with torch.no_grad():
        reference = model(input_ids=ids, output_hidden_states=True).hidden_states
    for layer in (0, 2):
        post = capture(model, ids, HookPoint(layer, "resid_post"))
        pre = capture(model, ids, HookPoint(layer, "resid_pre"))
        torch.testing.assert_close(post, reference[layer + 1])
        torch.testing.assert_close(pre, reference[layer])


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox", "qwen2"])
def test_noop_hook_leaves_generation_identical_and_sees_each_new_token(arch):
    model = tiny_model(arch)
    ids = torch.randint(1, 300, (1, 6))
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        plain = model.generate(ids, **kwargs)
    seen: list[int] = []
    with residual_hook(model, HookPoint(1), lambda r: seen.append(r.shape[1])):
        with torch.no_grad():
            hooked = model.generate(ids, **kwargs)
    assert torch.equal(plain, hooked)
    # prefill sees the prompt, each decode step one new position (KV cache)
    assert seen[0] == 6 and all(n == 1 for n in seen[1:]) and len(seen) == 5


def test_intervention_edits_residual_and_removal_restores(tiny_llama):
    ids = torch.randint(0, 300, (1, 8))
    with torch.no_grad():
        before = tiny_llama(input_ids=ids).logits

    def push(resid):
        resid += 5.0  # in place

    with residual_hook(tiny_llama, HookPoint(1), push):
        with torch.no_grad():
            edited = tiny_llama(input_ids=ids).logits
    with torch.no_grad():
        after = tiny_llama(input_ids=ids).logits
    assert not torch.allclose(before, edited)
    assert torch.equal(before, after)
    assert all(not block._forward_hooks and not block._forward_pre_hooks
               for block in find_blocks(tiny_llama))


def test_replacement_return_value_is_used(tiny_llama):
    ids = torch.randint(0, 300, (1, 4))
    with residual_hook(tiny_llama, HookPoint(0, "resid_pre"), lambda r: torch.zeros_like(r)):
        # capture's own hook is registered later, so it sees the replacement
        seen = capture(tiny_llama, ids, HookPoint(0, "resid_pre"))
    assert float(seen.abs().sum()) == 0.0


def test_unsupported_model_lists_searched_paths():
    with pytest.raises(UnsupportedModelError) as err:
        find_blocks(torch.nn.Linear(2, 2))
    assert isinstance(err.value, MonitorError)
    for path in BLOCK_PATHS:
        assert path in str(err.value)


def test_layer_out_of_range(tiny_llama):
    with pytest.raises(UnsupportedModelError, match="has 4 blocks"):
        capture(tiny_llama, torch.zeros(1, 2, dtype=torch.long), HookPoint(7))


def test_hook_point_names_roundtrip():
    assert HookPoint.parse("blocks.15.hook_resid_post") == HookPoint(15, "resid_post")
    assert HookPoint.parse(HookPoint(3, "resid_pre").name) == HookPoint(3, "resid_pre")
