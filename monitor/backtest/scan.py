"""Scanning conversations for a backtest: one teacher-forced forward per conversation, every
policy version evaluated on it, every turn evaluated as the request it was.

Second stage of a backtest (read -> **scan** -> results -> summary/diff -> report). For a batch
of conversations, :class:`Scanner` runs

1. the chat template -> token ids, turn boundaries (too-long or untemplatable -> Problem);
2. one batched forward (right-padded, so positions are unchanged), *stopped after the SAE's
   layer* (:func:`monitor.capture.forward_through`): layers above it cost nothing;
3. one encode of the *union* of the columns every policy version watches (only those latents,
   plus probes), exactly as the live monitor encodes them;
4. per policy version, two engine steps over the whole batch: the ``prompt`` scope as one row per
   conversation (every token before the last assistant turn, which is the prompt of every turn's
   request), the ``response`` scope as one row *per assistant turn* with fresh state (each turn
   was its own request). Masks match the live monitor's: special tokens, the first position and
   out-of-range residual norms are never monitored.

So the last turn is evaluated exactly as ``Monitor.scan(messages)`` evaluates it (same token ids,
same masks, same engine), and earlier turns add to it: a conversation the last-turn ``scan``
flags, the backtest flags. Steering is reported where it would trigger; its effect on later
tokens is not simulated (the logged text is what was said). Floating-point sums in a batched
forward differ from a one-row forward by rounding (~1e-6 relative): a token that close to a
threshold can flip.

Conversations longer than the model's context are *skipped with a reason* (``too_long``, with
their token count), not windowed: a window would see a different context than the model did.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from monitor.backtest.read import Conversation, Problem
from monitor.capture import forward_through
from monitor.catalog import Catalog
from monitor.data import token_ids
from monitor.policy import CompiledPolicy, Hit
from monitor.sae import SAE

DECISIONS = ("block", "steer", "alert", "log", "allow")  # most to least severe


@dataclass(frozen=True)
class Firing:
    """Where a rule first fired in a conversation, and on how many tokens in all.

    ``turn``: index of the message holding the token; ``scope`` and ``token``: as in the live
    monitor's :class:`~monitor.policy.Hit` for that turn's request (``token`` counts the scope's
    stream: from the conversation's start for ``prompt``, from the turn's first token for
    ``response``); ``position``: the token's position in the conversation. ``action``: what the
    rule does when enforced (block > steer > alert > log); ``mode``: enforce or shadow.
    """

    rule: str
    turn: int
    scope: str
    token: int
    position: int
    tokens_fired: int
    feature: str
    activation: float
    mode: str
    action: str


@dataclass(frozen=True)
class VersionResult:
    """One policy version's verdict on one conversation. ``decision``: block (an enforced block
    rule fired) > steer > alert (an enforced rule with ``alert``) > log (any rule fired, shadow
    rules included) > allow. ``first``: the firing behind the decision (None for allow)."""

    decision: str
    firings: tuple[Firing, ...]

    @property
    def first(self) -> Firing | None:
        deciding = [f for f in self.firings if _counts_as(f) == self.decision]
        return min(deciding, key=lambda f: f.position) if deciding else None


@dataclass(frozen=True)
class ScanResult:
    """A scanned conversation: its verdict under each policy version (in the scanner's order)."""

    key: str
    id: str
    source: str
    line: int
    tokens: int
    turns: int
    text_sha256: str
    versions: tuple[VersionResult, ...]


def rule_action(actions: Sequence[str]) -> str:
    """The strongest action of a rule: block > steer > alert > log."""
    for kind in ("block", "steer", "alert"):
        if kind in actions:
            return kind
    return "log"


def _counts_as(f: Firing) -> str:
    if f.mode != "enforce":
        return "log"
    return f.action


def decide(firings: Sequence[Firing]) -> str:
    """The conversation's decision from its firings (see :class:`VersionResult`)."""
    kinds = {_counts_as(f) for f in firings}
    return next((d for d in DECISIONS if d in kinds), "allow")


def messages_digest(messages: Sequence[Mapping[str, str]]) -> str:
    """``sha256:`` of the canonical JSON of the messages (as :func:`monitor.logs.text_digest`)."""
    blob = json.dumps(list(messages), sort_keys=True, ensure_ascii=False)
    return "sha256:" + hashlib.sha256(blob.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class _Prepared:
    conv: Conversation
    ids: list[int]
    prompt_end: int  # prompt scope covers [0, prompt_end)
    turn_ends: list[int]  # message i covers [turn_ends[i-1], turn_ends[i])
    responses: list[tuple[int, int, int]]  # (message index, start, end) per assistant turn


class Scanner:
    """Batched backtest scanning of conversations under several compiled policy versions.

    ``policies``: the versions, in the order their results are returned (e.g. candidate, then
    baseline). ``max_tokens``: longest conversation scanned (default: the model's context).
    ``batch_size``: conversations per forward. Holds the model and SAE; make one per worker.
    """

    def __init__(self, model: Any, tokenizer: Any, sae: SAE, policies: Sequence[CompiledPolicy],
                 catalog: Catalog | None = None, *, batch_size: int = 16, max_tokens: int | None = None,
                 include_special_tokens: bool = False) -> None:
        self.model, self.tokenizer, self.sae, self.catalog = model, tokenizer, sae, catalog
        self.policies = tuple(policies)
        self.batch_size = max(1, batch_size)
        context = getattr(getattr(model, "config", None), "max_position_embeddings", None) or 1 << 30
        self.max_tokens = min(max_tokens or context, context)
        self.device = next(model.parameters()).device
        special = [] if include_special_tokens else list(getattr(tokenizer, "all_special_ids", []) or [])
        self._special = torch.tensor(sorted(set(special)), dtype=torch.long, device=self.device)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        latents = sorted({int(i) for p in self.policies for i in p.latent_indices.tolist()})
        probes = sorted({n for p in self.policies for n in p.probe_names})
        self._latents = latents
        self._subset = sae.subset_encoder(latents)
        self._probe_names = probes
        if probes:
            if catalog is None:
                raise ValueError("the policies use probes but no catalog was given")
            pairs = [catalog.probe(n) for n in probes]
            self._P = torch.stack([d.float() for d, _ in pairs], 1).to(self.device)
            self._b = torch.tensor([b for _, b in pairs], device=self.device)
        col: dict[tuple[str, object], int] = {("latent", i): c for c, i in enumerate(latents)}
        col.update({("probe", n): len(latents) + c for c, n in enumerate(probes)})
        self._columns = [torch.tensor([col[(f.kind, f.index if f.kind == "latent" else f.name)]
                                       for f in p.features], dtype=torch.long, device=self.device)
                         for p in self.policies]

    # ------------------------------------------------------------------ tokens
    def _template(self, messages: Sequence[Mapping[str, str]], generation: bool = False) -> list[int]:
        return token_ids(self.tokenizer.apply_chat_template(list(messages), tokenize=True,
                                                            add_generation_prompt=generation))

    def prepare(self, conv: Conversation) -> _Prepared | Problem:
        """Token ids and turn boundaries, or a Problem (``template``, ``too_long``)."""
        def problem(kind: str, detail: str) -> Problem:
            return Problem(conv.key, conv.source, conv.line, kind, detail)

        msgs = list(conv.messages)
        try:
            full = self._template(msgs)
            if msgs[-1]["role"] == "assistant":  # exactly the ids Monitor.scan builds
                prompt_ids = self._template(msgs[:-1], generation=True)
                full = prompt_ids + full[len(prompt_ids):]
                prompt_end = len(prompt_ids)
            else:
                prompt_end = len(full)
            if len(full) > self.max_tokens:
                return problem("too_long", f"{len(full)} tokens, more than the model's context of "
                                           f"{self.max_tokens}; skipped (not windowed)")
            prefixes = [self._template(msgs[:k + 1]) for k in range(len(msgs) - 1)]
            if any(full[:len(q)] != q for q in prefixes):
                return problem("template", "the chat template renders earlier turns differently in "
                                           "later requests; per-turn replay needs a prefix-stable template")
            ends = [len(q) for q in prefixes] + [len(full)]
            responses = [(k, len(self._template(msgs[:k], generation=True)) if k else 0, ends[k])
                         for k, m in enumerate(msgs) if m["role"] == "assistant"]
        except Exception as exc:  # noqa: BLE001 - a template refusing a conversation is bad input
            return problem("template", f"the chat template refused this conversation ({type(exc).__name__}: {exc})")
        return _Prepared(conv, full, prompt_end, ends, responses)

    # ------------------------------------------------------------------ scanning
    def scan(self, conversations: Sequence[Conversation]) -> list[ScanResult | Problem]:
        """Results in input order; each conversation gives a ScanResult or a Problem."""
        prepared = [self.prepare(c) for c in conversations]
        out: list[ScanResult | Problem | None] = [p if isinstance(p, Problem) else None for p in prepared]
        todo = sorted((i for i, p in enumerate(prepared) if not isinstance(p, Problem)),
                      key=lambda i: len(prepared[i].ids))  # type: ignore[union-attr]
        for lo in range(0, len(todo), self.batch_size):
            chunk = todo[lo:lo + self.batch_size]
            for i, result in zip(chunk, self._scan_batch([prepared[i] for i in chunk])):  # type: ignore[misc]
                out[i] = result
        return out  # type: ignore[return-value]

    @torch.no_grad()
    def _scan_batch(self, batch: Sequence[_Prepared]) -> list[ScanResult]:
        B, T = len(batch), max(len(p.ids) for p in batch)
        ids = torch.full((B, T), self.pad_id, dtype=torch.long)
        attn = torch.zeros(B, T, dtype=torch.long)
        for b, p in enumerate(batch):
            ids[b, :len(p.ids)] = torch.tensor(p.ids)
            attn[b, :len(p.ids)] = 1
        ids, attn = ids.to(self.device), attn.to(self.device)
        captured: list[torch.Tensor] = []
        forward_through(self.model, {self.sae.hook_point: captured.append}, input_ids=ids, attention_mask=attn)
        resid = captured[0]
        feats = self._encode(resid)  # [B, T, union]
        pos = torch.arange(T, device=self.device)
        valid = attn.bool() & (pos[None, :] != 0) & self.sae.input_mask(resid)
        if self._special.numel():
            valid &= ~torch.isin(ids, self._special)
        prompt_mask = valid & (pos[None, :] < torch.tensor([p.prompt_end for p in batch], device=self.device)[:, None])
        rows = [(b, start, end) for b, p in enumerate(batch) for _, start, end in p.responses]
        width = max([end - start for _, start, end in rows] + [0])
        r_conv = torch.tensor([r[0] for r in rows], dtype=torch.long, device=self.device)
        r_start = torch.tensor([r[1] for r in rows], dtype=torch.long, device=self.device)
        r_len = torch.tensor([r[2] - r[1] for r in rows], dtype=torch.long, device=self.device)
        offs = torch.arange(width, device=self.device)
        gather_pos = (r_start[:, None] + offs[None, :]).clamp(max=T - 1)
        resp_mask = valid[r_conv[:, None], gather_pos] & (offs[None, :] < r_len[:, None])
        resp_feats = feats[r_conv[:, None], gather_pos]  # [R, W, union]
        per_version = []
        for policy, cols in zip(self.policies, self._columns):
            p_hits, p_counts = _step(policy, feats.index_select(2, cols), prompt_mask, "prompt")
            r_hits, r_counts = _step(policy, resp_feats.index_select(2, cols), resp_mask, "response")
            per_version.append((policy, p_hits, p_counts, r_hits, r_counts))
        results = []
        for b, p in enumerate(batch):
            versions = []
            for policy, p_hits, p_counts, r_hits, r_counts in per_version:
                row_ids = [k for k, r in enumerate(rows) if r[0] == b]
                versions.append(self._verdict(policy, p, p_hits.get(b, []), p_counts[b],
                                              [(rows[k], r_hits.get(k, [])) for k in row_ids],
                                              r_counts[row_ids].sum(0) if row_ids else None))
            results.append(ScanResult(p.conv.key, p.conv.id, p.conv.source, p.conv.line, len(p.ids),
                                      len(p.conv.messages), messages_digest(p.conv.messages), tuple(versions)))
        return results

    def _encode(self, resid: torch.Tensor) -> torch.Tensor:
        """The union's columns, computed as the live monitor computes them."""
        x = resid.to(self.sae.W_enc.dtype)
        latents = self._subset(x).float()
        if not self._probe_names:
            return latents
        return torch.cat([latents, x.float() @ self._P + self._b], dim=-1)

    def _verdict(self, policy: CompiledPolicy, p: _Prepared, prompt_hits: list[Hit], prompt_counts: list[int],
                 responses: list[tuple[tuple[int, int, int], list[Hit]]], resp_counts: Any) -> VersionResult:
        counts = list(prompt_counts)
        if resp_counts is not None:
            counts = [a + int(c) for a, c in zip(counts, resp_counts.tolist())]
        first: dict[str, tuple[int, str, int, Hit]] = {}  # rule -> (position, scope, turn, hit)
        for hit in prompt_hits:
            turn = next(i for i, e in enumerate(p.turn_ends) if hit.token_index < e)
            if hit.rule_id not in first or hit.token_index < first[hit.rule_id][0]:
                first[hit.rule_id] = (hit.token_index, "prompt", turn, hit)
        turn_of = {start: k for k, start, _ in p.responses}
        for (_, start, _), hits in responses:
            turn = turn_of[start]
            for hit in hits:
                position = start + hit.token_index
                if hit.rule_id not in first or position < first[hit.rule_id][0]:
                    first[hit.rule_id] = (position, "response", turn, hit)
        index = {r.id: r.index for r in policy.rules}
        firings = tuple(Firing(rule, turn, scope, hit.token_index, position, counts[index[rule]], hit.feature,
                               float(hit.activation), hit.mode, rule_action(hit.actions))
                        for rule, (position, scope, turn, hit) in sorted(first.items(), key=lambda kv: kv[1][0]))
        return VersionResult(decide(firings), firings)


def _step(policy: CompiledPolicy, feats: torch.Tensor, mask: torch.Tensor, scope: str
          ) -> tuple[dict[int, list[Hit]], Any]:
    """One engine step over all rows; hits grouped by row and firing-token counts [rows, rules]."""
    rows = feats.shape[0]
    if rows == 0:
        return {}, torch.zeros(0, len(policy.rules), dtype=torch.long)
    state = policy.new_state(rows, feats.device)
    result = policy.step(state, feats, mask, scope)  # type: ignore[arg-type]
    by_row: dict[int, list[Hit]] = {}
    for hit in result.hits:
        by_row.setdefault(hit.row, []).append(hit)
    counts = result.fired.sum(1).cpu() if result.hits else torch.zeros(rows, len(policy.rules), dtype=torch.long)
    return by_row, (counts.tolist() if scope == "prompt" else counts)
