"""Behavioural pass: one model answers the prompts under the SAE and policies.

Each model answers every prompt twice (greedy, and sampled with a fixed seed per batch, so two
identical models give identical answers), in left-padded batches, under monitored generation
(:class:`monitor.runtime.hf.Monitor`). The policies run in **shadow** mode here: a drift check
observes what each model would do; a block or a steer would cut or change the answer and
hide later behaviour. Per answer we record which rules fired and, given the watched feature
columns, their mean and peak over the answer's tokens, read from the residuals the model
computes while generating (each answer token is fed back once, at the next decode step or the
monitor's final step), so the answers need no second, teacher-forced pass.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from monitor.capture import residual_hook
from monitor.catalog import Catalog
from monitor.data import token_ids
from monitor.drift.teacher import Columns
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
    answer_features: AnswerFeatures | None = None


@dataclass(frozen=True)
class AnswerFeatures:
    """Per non-empty answer (all passes, in ``transcripts`` order), each watched feature
    column's mean and peak over the answer's tokens (special tokens and tokens outside the
    SAE's input range left out; 0 where none is left)."""

    feature_mean: torch.Tensor   # [answers, F]
    feature_peak: torch.Tensor   # [answers, F]


class _StepFeatures:
    """Collects the watched columns of every position fed after the prefill of one batch."""

    def __init__(self, encode: Callable[[torch.Tensor], torch.Tensor], sae: SAE) -> None:
        self.encode, self.sae = encode, sae
        self.calls = 0
        self.steps: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __call__(self, resid: torch.Tensor) -> None:
        self.calls += 1
        if self.calls > 1:      # the first call is the prompt's prefill
            self.steps.append((self.encode(resid).detach(), self.sae.input_mask(resid.detach()).cpu()))

    def pooled(self, responses: Sequence[Sequence[int]], special: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean, peak)`` per row over the first ``len(responses[r])`` fed positions."""
        if not self.steps:
            zeros = torch.zeros(len(responses), 0)
            return zeros, zeros
        feats = torch.cat([f for f, _ in self.steps], dim=1).float()          # [B, S, F]
        keep = torch.cat([m for _, m in self.steps], dim=1)                    # [B, S]
        width = feats.shape[1]
        ids = torch.tensor([list(r[:width]) + [-1] * (width - len(r[:width])) for r in responses])
        keep &= (ids >= 0) & ~torch.isin(ids, special)
        m = keep[..., None].float()
        mean = (feats * m).sum(1) / m.sum(1).clamp_min(1.0)
        peak = feats.masked_fill(~keep[..., None], float("-inf")).amax(1).clamp_min(0.0)
        return mean, peak


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
           temperature: float = 0.8, columns: Columns | None = None,
           progress: Progress | None = None) -> Behaviour:
    """Answer ``prompts`` with ``model`` under ``policy`` (use :func:`shadow_policy`); with
    ``columns``, also measure them over each answer (:class:`AnswerFeatures`)."""
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
    encode = columns.encoder(sae) if columns is not None else None
    special = torch.tensor(sorted({int(i) for i in getattr(tokenizer, "all_special_ids", []) or []}),
                           dtype=torch.long)
    pooled: list[list[tuple[torch.Tensor, torch.Tensor] | None]] = [[None] * len(prompts) for _ in passes]
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
                steps = _StepFeatures(encode, sae) if encode is not None else None
                with residual_hook(model, sae.hook_point, steps) if steps is not None else nullcontext():
                    sequences = monitor.generate(input_ids=ids, attention_mask=mask, **options)
                report = monitor.last_report
                assert report is not None
                for hit in report.hits:
                    fired[p_index, rows[hit.row], column[hit.rule_id]] = True
                responses = []
                for r, i in enumerate(rows):
                    response = sequences[r, width:].tolist()
                    cut = next((k for k, t in enumerate(response) if t in stops), len(response))
                    responses.append(response[:cut])
                    out[p_index][i] = Transcript(tuple(rendered[i]), tuple(responses[-1]),
                                                 tokenizer.decode(responses[-1], skip_special_tokens=True))
                if steps is not None:
                    mean, peak = steps.pooled(responses, special)
                    for r, i in enumerate(rows):
                        pooled[p_index][i] = (mean[r], peak[r])
                if progress is not None:
                    progress(len(rows))
    finally:
        monitor.close()
    transcripts = tuple(tuple(t for t in row if t is not None) for row in out)
    features = None
    if columns is not None:
        kept = [pair for p, row in enumerate(transcripts) for i, t in enumerate(row)
                if t.response_ids and (pair := pooled[p][i]) is not None]
        width = len(columns.names)
        features = AnswerFeatures(
            torch.stack([m for m, _ in kept]) if kept else torch.zeros(0, width),
            torch.stack([k for _, k in kept]) if kept else torch.zeros(0, width))
    return Behaviour(tuple(passes), rule_ids, fired, transcripts, features)
