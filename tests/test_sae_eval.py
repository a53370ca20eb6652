from __future__ import annotations

import pytest
import torch

from monitor.sae import SAE, SAEConfig
from monitor.sae_eval import evaluate_sae
from monitor.testing import tiny_model

TEXTS = ["hello world, this is a test of the evaluation", "def f(x):\n    return x * 2\n",
         "User: hi\nAssistant: hello, how can I help?"]


def identity_sae(d: int) -> SAE:
    """relu(x) - relu(-x) = x: reconstructs anything exactly, with 2*d latents."""
    sae = SAE(SAEConfig(architecture="relu", d_in=d, d_sae=2 * d, hook_name="blocks.1.hook_resid_post"))
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))
    return sae


def test_identity_sae_recovers_everything(tiny_tokenizer):
    model = tiny_model("llama")
    seen = []
    result = evaluate_sae(model, tiny_tokenizer, identity_sae(64), TEXTS, batch_size=2,
                          progress=lambda done, total: seen.append((done, total)))
    assert seen[-1][0] == seen[-1][1] and [d for d, _ in seen] == sorted(d for d, _ in seen)
    assert result.fvu == pytest.approx(0.0, abs=1e-6)
    assert result.ce_spliced == pytest.approx(result.ce_clean, abs=1e-4)
    assert result.ce_recovered == pytest.approx(1.0, abs=1e-3)
    # each coordinate is nonzero in exactly one of the two latents that carry it
    assert result.l0 == pytest.approx(64, abs=0.5)
    n_tokens = sum(len(tiny_tokenizer(t)["input_ids"]) - 1 for t in TEXTS)
    assert result.tokens == n_tokens


def test_zero_sae_is_zero_ablation(tiny_tokenizer):
    model = tiny_model("llama")
    zero = SAE(SAEConfig(architecture="relu", d_in=64, d_sae=16, hook_name="blocks.1.hook_resid_post"))
    result = evaluate_sae(model, tiny_tokenizer, zero, TEXTS, batch_size=3)
    assert result.ce_spliced == pytest.approx(result.ce_zero, abs=1e-5)
    assert result.ce_recovered == pytest.approx(0.0, abs=1e-3)
    assert result.l0 == 0 and result.dead_fraction == 1.0
    assert result.fvu >= 1.0
