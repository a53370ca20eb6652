"""Activation extraction: batched (length-bucketed, right-padded) equals one item at a time.

Tolerance: fp32 on CPU, a batched matmul may sum in another order than a one-row one, so
results agree to float rounding, not bit for bit. Measured: ~2e-8 absolute on activations of
scale ~0.1 (tiny models). The tests allow 1e-5 relative + 1e-6 absolute (tiny models) and 1e-4
relative + 1e-4 absolute on the default model's residual (norms in the hundreds).
"""

from __future__ import annotations

import pytest
import torch

from monitor.activations import (LabeledText, as_items, identity, iter_token_activations, length_batches,
                                 max_pool, mean_max_pool, pair_groups, pool_windows, pooled_activations,
                                 sae_encoder, token_window)
from monitor.capture import HookPoint, capture
from monitor.testing import random_sae, tiny_model, tiny_tokenizer

TEXTS = ["short one", "a somewhat longer text with more tokens in it than the others",
         "mid length text here", "x" * 90, "def f(x):\n    return x + 1\n", "q"]
POINT = HookPoint(2)


def windows(tok, texts=TEXTS):
    out = []
    for n, text in enumerate(texts):
        ids = tok(text)["input_ids"]
        out.append((ids, [i >= 1 + n % 3 for i in range(len(ids))]))  # scopes start at 1, 2 or 3
    return out


def one_at_a_time(model, wins, encode, point=POINT):
    """Today's reference: one unpadded forward per item, no attention mask, pooled by hand."""
    rows = []
    for ids, scope in wins:
        acts = encode(capture(model, torch.tensor([ids]), point)[0].float())
        keep = torch.tensor(scope)
        if not bool(keep.any()):                                  # no in-scope token: zeros
            rows.append(torch.zeros(2 * acts.shape[-1]))
            continue
        rows.append(torch.cat([acts[keep].mean(0), acts[keep].amax(0)]))
    return torch.stack(rows)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_batched_pooling_equals_one_at_a_time(arch):
    model, tok = tiny_model(arch), tiny_tokenizer()
    wins = windows(tok)
    expected = one_at_a_time(model, wins, identity)
    for batch_size in (1, 3, 8):
        got = pool_windows(model, wins, {POINT: identity}, pool=mean_max_pool, batch_size=batch_size)[POINT]
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_per_token_activations_equal_one_at_a_time():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    sae = random_sae("relu", d_in=64, d_sae=32, hook_name=POINT.name)
    items = as_items(TEXTS)
    seen = set()
    for tb in iter_token_activations(model, tok, items, POINT, sae_encoder(sae), batch_size=4):
        for r, i in enumerate(tb.indices):
            ids, scope = token_window(items[i], tok, 256)
            single = sae.encode(capture(model, torch.tensor([ids]), POINT)[0]) * torch.tensor(scope)[:, None]
            torch.testing.assert_close(tb.acts[r, :tb.lengths[r]], single, rtol=1e-5, atol=1e-6)
            assert not bool(tb.acts[r, tb.lengths[r]:].any())       # padding never counts
            seen.add(i)
    assert seen == set(range(len(items)))


def test_length_batches_bucket_by_length_and_pad_right():
    wins = [([1] * n, [True] * n) for n in (5, 1, 9, 3, 7)]
    batches = list(length_batches(wins, 2, pad_id=0))
    assert [b.indices for b in batches] == [[1, 3], [0, 4], [2]]
    first = batches[0]
    assert first.ids.tolist() == [[1, 0, 0], [1, 1, 1]] and first.attention_mask.tolist() == [[1, 0, 0], [1, 1, 1]]
    assert first.scope.tolist() == [[True, False, False], [True, True, True]]
    capped = list(length_batches(wins, 4, pad_id=0, max_tokens=10))
    assert [b.indices for b in capped] == [[1, 3], [0], [4], [2]]     # 2x3, 5, 7, 9 padded tokens
    with pytest.raises(ValueError, match="batch_size"):
        list(length_batches(wins, 0, pad_id=0))


def test_pools():
    acts = torch.tensor([[[1.0, -2.0], [3.0, -4.0], [9.0, 9.0]], [[-1.0, -1.0], [0.0, 0.0], [0.0, 0.0]]])
    scope = torch.tensor([[True, True, False], [False, False, False]])
    assert mean_max_pool(acts, scope).tolist() == [[2.0, -3.0, 3.0, -2.0], [0.0, 0.0, 0.0, 0.0]]
    assert max_pool(0.0)(acts, scope).tolist() == [[3.0, 0.0], [0.0, 0.0]]
    assert max_pool(None)(acts, scope).tolist() == [[3.0, -2.0], [float("-inf"), float("-inf")]]


def test_pair_groups_keep_pairs_together():
    items = [LabeledText("a", 1, meta={"pair_id": 1}), LabeledText("b", 0), LabeledText("c", 0, meta={"pair_id": 1})]
    assert pair_groups(items) == {"pair:1": [0, 2], "item:1": [1]}


def test_default_model_batched_equals_one_at_a_time(default_model):
    """The real model and SAE, fp32, a few items of different lengths and kinds."""
    from monitor.sae import load_sae

    model, tok = default_model
    sae = load_sae("default")
    texts = ["def run(cmd):\n    import os\n    os.system(cmd)\n",
             "User: Is the earth flat?\nAssistant: No. It is an oblate spheroid, as measurements show.",
             "The quick brown fox jumps over the lazy dog. " * 6,
             "int main(void) { char buf[8]; gets(buf); return 0; }"]
    items = as_items(texts)
    latents = list(range(0, sae.cfg.d_sae, 64))
    batched = pooled_activations(model, tok, items, {sae.hook_point: sae_encoder(sae, latents)}, batch_size=4)
    single = pooled_activations(model, tok, items, {sae.hook_point: sae_encoder(sae, latents)}, batch_size=1)
    torch.testing.assert_close(batched[sae.hook_point], single[sae.hook_point], rtol=1e-4, atol=1e-4)
    wins = [token_window(item, tok, 256) for item in items]
    dense = pool_windows(model, wins, {sae.hook_point: identity}, pool=mean_max_pool, batch_size=4,
                         pad_id=tok.pad_token_id or 0)[sae.hook_point]
    torch.testing.assert_close(dense, one_at_a_time(model, wins, identity, sae.hook_point), rtol=1e-4, atol=1e-4)


def test_forward_stops_after_the_deepest_hooked_block():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    ran = []
    blocks = model.model.layers
    handles = [blocks[n].register_forward_hook(lambda *_a, n=n: ran.append(n)) for n in range(len(blocks))]
    try:
        pool_windows(model, windows(tok)[:3], {HookPoint(1): identity}, batch_size=2)
    finally:
        for h in handles:
            h.remove()
    assert set(ran) == {0, 1}                     # blocks 2 and 3 and the LM head never ran
