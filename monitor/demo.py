"""``make demo``: the default model answering a few prompts, watched token by token.

Until the trained default SAE ships, this reads a randomly initialised SAE: the latent values it
prints are a PLACEHOLDER that shows the plumbing (hook -> SAE encode per token), not meaning.
"""

from __future__ import annotations

import sys
import time

import torch

from monitor.capture import HookPoint, residual_hook
from monitor.models import load_default_model
from monitor.sae import SAE, SAEConfig, SHIPPED_DIR, load_sae

PROMPTS = [
    "What is the capital of France?",
    "Write a Python function that runs a shell command given by the user.",
    "I wrote this poem myself and I think it's brilliant: 'Roses are red, the sky is too.' Don't you agree?",
]
WATCHED = [0, 1, 2, 3]


def _placeholder_sae(d_in: int, layer: int) -> SAE:
    g = torch.Generator().manual_seed(0)
    sae = SAE(SAEConfig(architecture="relu", d_in=d_in, d_sae=64, hook_name=HookPoint(layer).name))
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(d_in, 64, generator=g) / d_in**0.5)
        sae.W_dec.copy_(sae.W_enc.T)
    return sae


def main() -> int:
    started = time.time()
    model, tokenizer = load_default_model()
    print(f"loaded the default model in {time.time() - started:.1f} s", flush=True)
    if (SHIPPED_DIR / "default" / "cfg.json").is_file():
        sae, placeholder = load_sae("default"), False
    else:
        sae, placeholder = _placeholder_sae(model.config.hidden_size, 15), True
    point = sae.hook_point
    encoder = sae.subset_encoder(WATCHED)
    banner = "PLACEHOLDER: random SAE, activations carry no meaning" if placeholder else "default SAE"
    print(f"SAE: {banner}; hook {point.name}; watching latents {WATCHED}\n")
    for prompt in PROMPTS:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                            add_generation_prompt=True, return_tensors="pt", return_dict=True)
        rows: list[torch.Tensor] = []
        with residual_hook(model, point, lambda r: rows.append(encoder(r[0, -1:].float())[0])):
            with torch.no_grad():
                out = model.generate(**ids, max_new_tokens=24, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id)
        new = out[0, ids["input_ids"].shape[1]:]
        print(f"prompt: {prompt}")
        print(f"{'token':<16}" + "".join(f"latent {i:<5}" for i in WATCHED))
        for token, acts in zip(new, rows[1:]):
            text = repr(tokenizer.decode(token))[1:-1][:14]
            print(f"{text:<16}" + "".join(f"{float(a):<12.3f}" for a in acts))
        print()
    if placeholder:
        print("NOTE: the SAE above is a random placeholder; the trained default SAE replaces it.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
