"""Builders for testing code that uses sae-monitor (as ``structlog.testing``): CPU-sized
models, tokenizers, SAEs, monitors, policies, hits and reports.

Everything here is small and deterministic (seeded), builds in milliseconds and downloads
nothing: tiny random models from configs, a byte-level tokenizer, random or *tied* SAEs (a
tied SAE's latent ``i`` reads and writes the same direction, which steering tests need), and
:func:`tiny_monitor` for a whole monitored model in one call. The project's own tests and
benchmarks use these; so can yours::

    from monitor.testing import tiny_monitor, rule_yaml
    mon = tiny_monitor(rules=rule_yaml(latent=0, above=0.5))
    mon.generate(torch.tensor([[5, 17, 42]]), max_new_tokens=4, do_sample=False)
"""

from __future__ import annotations

import tempfile
import textwrap
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from monitor.policy import CompiledPolicy, Hit
    from monitor.report import Report
    from monitor.runtime.hf import Monitor
    from monitor.sae import SAE, Architecture

TINY: dict[str, Any] = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            vocab_size=300, max_position_embeddings=128)


def tiny_model(arch: str = "llama", seed: int = 0) -> Any:
    """A randomly initialised causal LM of the given architecture, in eval mode."""
    import transformers as tf

    torch.manual_seed(seed)
    cfg: tf.PretrainedConfig
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


def tiny_tokenizer() -> Any:
    """A byte-level tokenizer built in memory (256 byte tokens + specials)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

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


def random_sae(architecture: Architecture = "relu", d_in: int = 64, d_sae: int = 256, k: int | None = 8,
               seed: int = 0, dtype: torch.dtype = torch.float32, **cfg_kwargs: Any) -> SAE:
    """A random SAE of ``architecture`` (unit-scale weights, small biases and thresholds)."""
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


def tied_sae(layer: int = 2, d_in: int = 64, d_sae: int = 16, seed: int = 1) -> SAE:
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


def rule_yaml(rule_id: str = "r", latent: int = 0, above: float = 1e9, scope: str = "response",
              actions: str = "[log, {block: {message: BLOCKED}}]", mode: str = "enforce") -> str:
    """A one-rule policy file: ``latent`` above ``above`` in ``scope`` -> ``actions``.

    A negative ``above`` (fire on every token: SAE latents are never negative) adds the
    ``allow_always_true: true`` override that such an enforce rule needs."""
    always = "    allow_always_true: true\n" if above < 0 and mode == "enforce" else ""
    return (f"version: '1'\nrules:\n  - id: {rule_id}\n    description: test\n    severity: high\n"
            f"    mode: {mode}\n    scope: {scope}\n{always}    when: {{latent: {latent}, above: {above}}}\n"
            f"    actions: {actions}\n")


def compiled_policy(yaml_text: str, d_sae: int = 16, catalog: Any = None,
                    directory: str | Path | None = None) -> CompiledPolicy:
    """Compile policy YAML text (written to ``directory``, a temporary one by default)."""
    from monitor.policy import compile_policies, load_policies

    folder = Path(directory) if directory is not None else Path(tempfile.mkdtemp(prefix="sae-monitor-test-"))
    path = folder / f"policy-{uuid.uuid4().hex[:8]}.yaml"
    path.write_text(textwrap.dedent(yaml_text), encoding="utf-8")
    return compile_policies(load_policies(path), catalog, d_sae=d_sae)


def tiny_monitor(rules: str | None = None, *, layer: int = 2, arch: str = "llama", seed: int = 0,
                 **options: Any) -> Monitor:
    """A tiny random model + byte tokenizer + tied SAE at ``layer`` under ``rules`` (policy
    YAML text; default: one block rule that never fires). Self test off."""
    from monitor.runtime.hf import Monitor

    sae = tied_sae(layer)
    policy = compiled_policy(rules if rules is not None else rule_yaml(), d_sae=sae.cfg.d_sae)
    options.setdefault("self_test", False)
    return Monitor(tiny_model(arch, seed=seed), tiny_tokenizer(), sae=sae, policies=policy, **options)


def make_hit(rule_id: str = "r", *, row: int = 0, token_index: int = 0, scope: str = "response",
             mode: str = "enforce", severity: str = "high", actions: tuple[str, ...] = ("block",),
             feature: str = "latent:0", activation: float = 1.0) -> Hit:
    """A :class:`~monitor.policy.Hit` with test defaults."""
    from monitor.policy import Hit

    return Hit(rule_id, row, token_index, scope, mode, severity, actions, feature, activation)  # type: ignore[arg-type]


def make_report(*, hits: list[Hit] | None = None, blocked: dict[int, tuple[str, str]] | None = None,
                policy_version: str = "v-test", request_id: str | None = None, **fields: Any) -> Report:
    """A :class:`~monitor.report.Report`; ``blocked`` maps row -> (rule id, message) and
    takes the token index from that row's first hit of the rule (0 without one)."""
    from monitor.report import BlockInfo, Report

    hits = list(hits or [])
    blocks = {}
    for row, (rule_id, message) in (blocked or {}).items():
        first = next((h for h in hits if h.row == row and h.rule_id == rule_id), None)
        blocks[row] = BlockInfo(row, rule_id, message, first.scope if first else "response",
                                first.token_index if first else 0)
    return Report(request_id=request_id or uuid.uuid4().hex, policy_version=policy_version,
                  hits=hits, blocks=blocks, **fields)


def first_new_maximum(trace: torch.Tensor, prompt_len: int) -> int | None:
    """The first response token (index from 1) whose value of ``trace`` exceeds every earlier
    response token and is positive, or None."""
    response = trace[prompt_len:]
    for i in range(1, len(response) - 1):
        if response[i] > response[:i].max() and response[i] > 0:
            return i
    return None


def monitor_blocking_at(model: Any, tokenizer: Any, sequence: torch.Tensor, prompt_len: int, *,
                        layer: int = 2, **options: Any) -> tuple[Monitor, int, float] | None:
    """A monitor on a tied SAE whose block rule (latent 0 above a threshold) first fires at
    response token ``index`` of the greedy ``sequence[1, L]``; returns ``(monitor, index,
    threshold)``, or None when no response token makes a new maximum for this seed."""
    from monitor.capture import HookPoint, capture
    from monitor.runtime.hf import Monitor

    sae = tied_sae(layer)
    with torch.no_grad():
        trace = sae.encode(capture(model, sequence, HookPoint(layer)))[0, :, 0]
    index = first_new_maximum(trace, prompt_len)
    if index is None:
        return None
    response = trace[prompt_len:]
    threshold = float((response[:index].max() + response[index]) / 2)
    policy = compiled_policy(rule_yaml(above=threshold), d_sae=sae.cfg.d_sae)
    options.setdefault("self_test", False)
    return Monitor(model, tokenizer, sae=sae, policies=policy, **options), index, threshold


def failing_sae(kind: str = "raise", layer: int = 2) -> SAE:
    """A tied SAE whose encoder fails: ``"raise"`` raises ``RuntimeError("SAE exploded")``,
    ``"nan"`` returns NaN activations. For testing ``on_error`` handling."""
    from monitor.sae import SAE as BaseSAE

    class Failing(BaseSAE):
        def subset_encoder(self, latents: Any) -> Any:
            if kind == "nan":
                return lambda x: torch.full(x.shape[:-1] + (len(latents),), float("nan"))

            def boom(x: torch.Tensor) -> torch.Tensor:
                raise RuntimeError("SAE exploded")
            return boom

    template = tied_sae(layer)
    sae = Failing(template.cfg)
    sae.load_state_dict(template.state_dict())
    return sae
