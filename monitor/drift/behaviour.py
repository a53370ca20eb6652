"""Behavioural pass: one model answers the prompts under the SAE and policies.

Each model answers every prompt twice (greedy, and sampled with a fixed seed per batch, so two
identical models give identical answers), in left-padded batches, under monitored generation
(:class:`monitor.runtime.hf.Monitor`). The policies run in **shadow** mode here: a drift check
observes what each model would do; a block or a steer would cut or change the answer and
hide later behaviour. Per answer we record which rules fired; the catalog features' mean and
peak over the answer's tokens are measured by :mod:`monitor.drift.teacher` on the transcripts
this pass returns.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from monitor.catalog import Catalog
from monitor.data import token_ids
from monitor.policy import CompiledPolicy, PolicySet, compile_policies
from monitor.sae import SAE

Progress = Callable[[int], None]


@dataclass(frozen=True)
class Transcript:
    """One answer: the prompt's token ids, the response's token ids and text."""

    prompt_ids: tuple[int, ...]
    response_ids: tuple[int, ...]
    text: str

    @property
    def ids(self) -> list[int]:
        return [*self.prompt_ids, *self.response_ids]


@dataclass(frozen=True)
class Behaviour:
    """What one model did on the prompts. ``fired[pass, prompt, rule]``; passes are
    ``("greedy", "sampled")`` (or a subset); ``transcripts[pass][prompt]``."""

    passes: tuple[str, ...]
    rule_ids: tuple[str, ...]
    fired: torch.Tensor
    transcripts: tuple[tuple[Transcript, ...], ...]


def shadow_policy(policy_set: PolicySet, catalog: Catalog | None, d_sae: int) -> CompiledPolicy:
    """The same rules with every mode set to shadow: evaluated and reported, never acting."""
    rules = [r.model_copy(update={"mode": "shadow"}) for r in policy_set.rules]
    shadow = PolicySet(tuple(rules), policy_set.sources, policy_set.files, policy_set.version_id + "-shadow")
    return compile_policies(shadow, catalog, d_sae=d_sae)


def render_prompt(tokenizer: Any, messages: Sequence[dict[str, str]]) -> list[int]:
    """Token ids of a prompt: the chat template with the generation prompt when the tokenizer
    has one, else the turns' text joined by newlines."""
    if getattr(tokenizer, "chat_template", None):
        return token_ids(tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True))
    return list(tokenizer("\n".join(m["content"] for m in messages), add_special_tokens=True)["input_ids"])


def _stop_ids(tokenizer: Any) -> set[int]:
    ids = {tokenizer.eos_token_id, tokenizer.pad_token_id}
    return {int(i) for i in ids if i is not None}


def _batches(order: Sequence[int], size: int) -> list[list[int]]:
    return [list(order[i:i + size]) for i in range(0, len(order), size)]


@torch.no_grad()
def answer(model: Any, tokenizer: Any, sae: SAE, policy: CompiledPolicy, catalog: Catalog | None,
           prompts: Sequence[Sequence[dict[str, str]]], *, max_new_tokens: int = 64,
           passes: Sequence[str] = ("greedy", "sampled"), seed: int = 0, batch_size: int = 16,
           temperature: float = 0.8, progress: Progress | None = None) -> Behaviour:
    """Answer ``prompts`` with ``model`` under ``policy`` (use :func:`shadow_policy`)."""
    from monitor.runtime.hf import Monitor

    monitor = Monitor(model, tokenizer, sae=sae, policies=policy, catalog=catalog, on_error="closed",
                      self_test=False)
    rule_ids = tuple(r.id for r in policy.rules)
    column = {rid: i for i, rid in enumerate(rule_ids)}
    rendered = [render_prompt(tokenizer, p) for p in prompts]
    order = sorted(range(len(rendered)), key=lambda i: len(rendered[i]))  # similar lengths together
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stops = _stop_ids(tokenizer)
    fired = torch.zeros(len(passes), len(prompts), len(rule_ids), dtype=torch.bool)
    out: list[list[Transcript | None]] = [[None] * len(prompts) for _ in passes]
    try:
        for p_index, mode in enumerate(passes):
            for b_index, rows in enumerate(_batches(order, batch_size)):
                width = max(len(rendered[i]) for i in rows)
                ids = torch.tensor([[pad] * (width - len(rendered[i])) + rendered[i] for i in rows])
                mask = torch.tensor([[0] * (width - len(rendered[i])) + [1] * len(rendered[i]) for i in rows])
                options: dict[str, Any] = dict(max_new_tokens=max_new_tokens, pad_token_id=pad)
                if mode == "sampled":
                    torch.manual_seed(seed * 100_003 + b_index)
                    options.update(do_sample=True, temperature=temperature, top_p=1.0, top_k=0)
                else:
                    options.update(do_sample=False)
                sequences = monitor.generate(input_ids=ids, attention_mask=mask, **options)
                report = monitor.last_report
                assert report is not None
                for hit in report.hits:
                    fired[p_index, rows[hit.row], column[hit.rule_id]] = True
                for r, i in enumerate(rows):
                    response = sequences[r, width:].tolist()
                    cut = next((k for k, t in enumerate(response) if t in stops), len(response))
                    response = response[:cut]
                    out[p_index][i] = Transcript(tuple(rendered[i]), tuple(response),
                                                 tokenizer.decode(response, skip_special_tokens=True))
                if progress is not None:
                    progress(len(rows))
    finally:
        monitor.close()
    transcripts = tuple(tuple(t for t in row if t is not None) for row in out)
    return Behaviour(tuple(passes), rule_ids, fired, transcripts)
