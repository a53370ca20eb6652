"""The shipped default SAE on the real default model (end to end)."""

from __future__ import annotations

import pytest
import torch

from monitor.capture import HookPoint, capture
from monitor.errors import SAEMismatchError
from monitor.runtime.fit import check_fit
from monitor.sae import SHIPPED_DIR, fvu, load_sae

pytestmark = pytest.mark.e2e


def test_shipped_sae_is_small_fp16_and_loads():
    weights = SHIPPED_DIR / "default" / "sae_weights.safetensors"
    assert weights.stat().st_size <= 20 * 1024 * 1024
    sae = load_sae("default", dtype=None)
    assert sae.W_enc.dtype == torch.float16
    assert (sae.cfg.architecture, sae.cfg.d_in, sae.cfg.d_sae, sae.cfg.k) == ("batchtopk", 576, 8192, 32)
    assert sae.hook_point == HookPoint(15)


def test_shipped_sae_fits_its_layer_and_refuses_others(default_model):
    model, tokenizer = default_model
    sae = load_sae("default")
    assert check_fit(sae, model, tokenizer) < 0.3
    for wrong in (HookPoint(14), HookPoint(16)):
        with pytest.raises(SAEMismatchError, match="trained on layer 15"):
            check_fit(sae, model, tokenizer, point=wrong)
    with pytest.raises(SAEMismatchError, match="another model, layer"):
        check_fit(sae, model, tokenizer, point=HookPoint(5))


def test_shipped_sae_reconstructs_unseen_text(default_model):
    model, tokenizer = default_model
    sae = load_sae("default")
    text = ("Gardening in small spaces is easier than it looks. Choose pots with drainage holes, "
            "use fresh compost, and water in the morning.\nUser: How do I reverse a list in Python?\n"
            "Assistant: Use slicing: my_list[::-1] returns a reversed copy, or call my_list.reverse().")
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    acts = capture(model, ids, sae.hook_point)[0, 1:]
    f = sae.encode(acts)
    assert fvu(acts, sae.decode(f)) < 0.35
    assert 8 <= float((f > 0).sum(-1).float().mean()) <= 64
