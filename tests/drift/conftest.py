"""Tiny models with known drift: a base, an identical copy, and a candidate whose weights make
one chosen latent of a tied SAE fire more (a multiple of that latent's encoder direction is
added to the bias of the MLP output of the block below the SAE's hook)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from monitor import testing as builders

LAYER = 2          # the SAE reads blocks.2.hook_resid_post
LATENT = 5         # the latent the "unsafe" candidate pushes up
OTHER = 9          # a latent nobody touches
PUSH = 6.0         # how far: residual norms of the tiny model are ~0.2


def tiny_biased(seed: int = 0, **overrides):
    """A tiny llama whose MLPs have biases (so a bias can carry a direction), in eval mode."""
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(**{**builders.TINY, "num_key_value_heads": 2, "mlp_bias": True, **overrides})
    model = tf.AutoModelForCausalLM.from_config(cfg)
    model.eval()
    return model


def save(model, tokenizer, path: Path) -> Path:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_policy(path: Path, *, latent_rule_mode: str = "enforce", threshold: float = 2.0) -> Path:
    path.write_text(
        "version: '1'\nrules:\n"
        f"  - id: pushed.fires\n    description: the pushed latent fires\n    severity: high\n"
        f"    mode: {latent_rule_mode}\n    scope: response\n"
        f"    when: {{feature: test.pushed, above: {threshold}}}\n    actions: [log, {{block: {{message: blocked}}}}]\n"
        f"  - id: other.fires\n    description: an untouched latent fires\n    severity: low\n"
        f"    mode: shadow\n    scope: response\n"
        f"    when: {{feature: test.other, above: {threshold}}}\n    actions: [log]\n")
    return path


def write_catalog(path: Path) -> Path:
    path.write_text(f"sae: tiny\nlayer: {LAYER}\nfeatures:\n"
                    f"  - name: test.pushed\n    latent: {LATENT}\n    max_activation: 8.0\n"
                    f"  - name: test.other\n    latent: {OTHER}\n    max_activation: 8.0\n")
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Directories for base, same (identical copy), pushed (latent LATENT up), SAE, catalog, policy."""
    root = tmp_path_factory.mktemp("drift")
    tok = builders.tiny_tokenizer()
    sae = builders.tied_sae(LAYER, d_in=64, d_sae=16)
    base = tiny_biased()
    save(base, tok, root / "base")
    save(base, tok, root / "same")
    pushed = tiny_biased()
    with torch.no_grad():
        pushed.model.layers[LAYER - 1].mlp.down_proj.bias += PUSH * sae.W_enc[:, LATENT]
    save(pushed, tok, root / "pushed")
    sae.save(root / "sae")
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"question number {i}: what is {i} plus {i}?"}) + "\n"
                               for i in range(12)))
    texts = root / "texts.jsonl"
    texts.write_text("".join(json.dumps({"text": f"An unrelated sentence about item {i} and the weather."}) + "\n"
                             for i in range(12)))
    return {"root": root, "base": root / "base", "same": root / "same", "pushed": root / "pushed",
            "sae": root / "sae", "catalog": write_catalog(root / "catalog.yaml"),
            "policy": write_policy(root / "policy.yaml"), "prompts": prompts, "texts": texts}
