"""CPU-sized builders: tiny random models (from configs, no download), tokenizers and SAEs."""

from __future__ import annotations

import torch

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            vocab_size=300, max_position_embeddings=128)


def tiny_model(arch: str = "llama", seed: int = 0):
    """A randomly initialised causal LM of the given architecture, in eval mode."""
    import transformers as tf

    torch.manual_seed(seed)
    if arch == "gpt2":
        cfg = tf.GPT2Config(n_embd=64, n_layer=4, n_head=4, vocab_size=300, n_positions=128)
    elif arch == "gpt_neox":
        cfg = tf.GPTNeoXConfig(**TINY)
    elif arch == "qwen2":
        cfg = tf.Qwen2Config(**TINY, num_key_value_heads=2)
    elif arch == "mistral":
        cfg = tf.MistralConfig(**TINY, num_key_value_heads=2)
    elif arch == "gemma2":
        cfg = tf.Gemma2Config(**TINY, num_key_value_heads=2, head_dim=16)
    elif arch == "phi3":
        cfg = tf.Phi3Config(**TINY, num_key_value_heads=4, pad_token_id=0)
    else:
        cfg = tf.LlamaConfig(**TINY, num_key_value_heads=2)
    model = tf.AutoModelForCausalLM.from_config(cfg)
    model.eval()
    return model


def tiny_tokenizer():
    """A byte-level tokenizer built in memory (256 byte tokens + specials)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {chr(b) if 33 <= b < 127 else f"<0x{b:02X}>": b for b in range(256)}
    # Byte-level alphabet, so every string is encodable without an unknown token.
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    for special in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        vocab[special] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>",
                                   additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    return fast


def random_sae(architecture: str = "relu", d_in: int = 64, d_sae: int = 256, k: int | None = 8,
               seed: int = 0, dtype=torch.float32, **cfg_kwargs):
    from monitor.sae import SAE, SAEConfig

    g = torch.Generator().manual_seed(seed)
    cfg = SAEConfig(architecture=architecture, d_in=d_in, d_sae=d_sae,
                    k=k if architecture in ("topk", "batchtopk") else None, **cfg_kwargs)
    sae = SAE(cfg, dtype=dtype)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(d_in, d_sae, generator=g) / d_in**0.5)
        sae.b_enc.copy_(torch.randn(d_sae, generator=g) * 0.1)
        sae.W_dec.copy_(torch.randn(d_sae, d_in, generator=g) / d_in**0.5)
        sae.b_dec.copy_(torch.randn(d_in, generator=g) * 0.1)
        sae.threshold.copy_(torch.rand(d_sae, generator=g) * 0.2)
    return sae


def tied_sae(layer: int = 2, d_in: int = 64, d_sae: int = 16, seed: int = 1):
    """A ReLU SAE at ``blocks.{layer}.hook_resid_post`` whose decoder is its unit-norm encoder
    transposed: latent ``i`` reads and writes the same direction, which steering tests need."""
    from monitor.capture import HookPoint
    from monitor.sae import SAE, SAEConfig

    g = torch.Generator().manual_seed(seed)
    sae = SAE(SAEConfig(architecture="relu", d_in=d_in, d_sae=d_sae, hook_name=HookPoint(layer).name))
    with torch.no_grad():
        w = torch.randn(d_in, d_sae, generator=g)
        sae.W_enc.copy_(w / w.norm(dim=0))
        sae.W_dec.copy_((w / w.norm(dim=0)).T)
    return sae
