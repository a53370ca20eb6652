"""Scanning conversations for a backtest: one teacher-forced forward per conversation, every
policy version evaluated on it, every turn evaluated as the request it was.

Second stage of a backtest (read -> **scan** -> results -> summary/diff -> report). For a batch
of conversations, :class:`Scanner` runs

1. :func:`monitor.backtest.replay.plan`: token ids and turn boundaries; one forward row per
   conversation when every turn's request is a token prefix of it, else one row per turn
   (too-long or untemplatable conversations become a Problem);
2. one forward over a length bucket of rows (:func:`monitor.runtime.scan.length_buckets`,
   right-padded, no attention mask when no row is padded), *stopped after the deepest layer a
   version reads* (the SAE's, or a catalog probe's own ``layer``;
   :func:`monitor.capture.forward_through`): layers above it cost nothing;
3. per policy version, the live monitor's :class:`~monitor.runtime.encoder.FeatureEncoder`
   (only the watched latents and probes) and two engine steps over the whole batch: the
   ``prompt`` scope as one stream per row (every token before the row's last assistant turn,
   whose prefixes are the prompts of the earlier turns: the engine is causal, so a prefix's
   hits are the stream's hits on it), the ``response`` scope as one row *per assistant turn*
   with fresh state (each turn was its own request). Masks are the live monitor's
   (:func:`monitor.runtime.scan.monitor_mask` and the SAE's input range).

So every turn is evaluated exactly as ``Monitor.scan(messages[:k + 1])`` evaluates it (same
token ids, masks, encoder and engine): a conversation any per-turn ``scan`` flags, the
backtest flags, and the last-turn ``scan`` is one of those. Steering is reported where it
would trigger; its effect on later tokens is not simulated (the logged text is what was said).
Floating-point sums in a batched forward differ from a one-row forward by rounding (~1e-6
relative): a token that close to a threshold can flip.

Precision (``dtype``): ``float32`` (the default) runs the forward as ``Monitor.scan`` does, so
the guarantee above holds. ``bfloat16`` runs the forward under ``torch.autocast`` (matmuls in
bfloat16, the residual stream and norms in float32; 2-3x faster on CPUs with native bfloat16
and on GPUs); the hooked residual is cast to float32 and the SAE/probe encode runs in float32
outside autocast. Its activations differ from float32 by bfloat16 rounding (about 1e-2
relative), so tokens near a threshold can flip: the last-turn guarantee holds only between a
backtest and a ``scan`` at the same precision (docs/backtest.md, "Precision").
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from monitor.backtest.read import Conversation, Problem
from monitor.backtest.replay import Replay, Row, plan
from monitor.capture import HookPoint, forward_through
from monitor.catalog import Catalog
from monitor.policy import CompiledPolicy, Hit
from monitor.runtime.encoder import FeatureEncoder
from monitor.runtime.scan import (DTYPES, DtypeError, check_dtype, forward_precision, length_buckets, monitor_mask,
                                  pad_batch)
from monitor.sae import SAE

DECISIONS = ("block", "steer", "alert", "log", "allow")  # most to least severe
__all__ = ["DTYPES", "DtypeError", "Firing", "ScanResult", "Scanner", "VersionResult", "check_dtype", "decide",
           "forward_precision", "messages_digest", "rule_action"]
MAX_BATCH_TOKENS = 4096  # padded tokens per forward (see docs/backtest.md, "Measured here")


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
    """A scanned conversation: its verdict under each policy version (in the scanner's order).
    ``replay``: ``one_forward`` or ``per_turn`` (see :mod:`monitor.backtest.replay`)."""

    key: str
    id: str
    source: str
    line: int
    tokens: int
    turns: int
    text_sha256: str
    versions: tuple[VersionResult, ...]
    replay: str = "one_forward"


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
class _Found:
    """What one policy version found in one forward row: prompt-stream hits (``token_index`` is
    the row position) and fired-token counts per rule, hits per response span
    ``(message index, start, hits)`` and the spans' summed counts."""

    prompt_hits: list[Hit]
    prompt_counts: list[int]
    responses: list[tuple[int, int, list[Hit]]]
    response_counts: list[int]


class Scanner:
    """Batched backtest scanning of conversations under several compiled policy versions.

    ``policies``: the versions, in the order their results are returned (e.g. candidate, then
    baseline). ``max_tokens``: longest conversation scanned (default: the model's context).
    ``batch_size``: forward rows per batch, at most ``max_batch_tokens`` padded tokens (rows are
    bucketed by length: :func:`monitor.runtime.scan.length_buckets`). ``one_forward=False``
    scans every turn as its own forward row (the reference; see :mod:`monitor.backtest.replay`).
    ``dtype``: the forward's precision, one of :data:`DTYPES` (see the module doc).
    Holds the model and SAE; make one per worker.
    """

    def __init__(self, model: Any, tokenizer: Any, sae: SAE, policies: Sequence[CompiledPolicy],
                 catalog: Catalog | None = None, *, batch_size: int = 16, max_tokens: int | None = None,
                 max_batch_tokens: int = MAX_BATCH_TOKENS, one_forward: bool = True,
                 include_special_tokens: bool = False, dtype: str = "float32") -> None:
        self.dtype = check_dtype(dtype)
        self.model, self.tokenizer, self.sae, self.catalog = model, tokenizer, sae, catalog
        self.policies = tuple(policies)
        self.encoders = [FeatureEncoder(sae, p, catalog) for p in self.policies]
        # every layer a version's catalog probes read besides the SAE's (one forward serves all)
        self.extra_layers = tuple(sorted({layer for e in self.encoders for layer in e.extra_layers}))
        self.batch_size = max(1, batch_size)
        self.max_batch_tokens = max_batch_tokens
        self.one_forward = one_forward
        context = getattr(getattr(model, "config", None), "max_position_embeddings", None) or 1 << 30
        self.max_tokens = min(max_tokens or context, context)
        self.device = next(model.parameters()).device
        self.include_special_tokens = include_special_tokens
        self._special = torch.tensor(sorted(set(getattr(tokenizer, "all_special_ids", []) or [])), dtype=torch.long)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def scan(self, conversations: Sequence[Conversation]) -> list[ScanResult | Problem]:
        """Results in input order; each conversation gives a ScanResult or a Problem."""
        plans = [plan(self.tokenizer, c, self.max_tokens, one_forward=self.one_forward) for c in conversations]
        rows = [(i, j) for i, p in enumerate(plans) if isinstance(p, Replay) for j in range(len(p.rows))]
        lengths = [len(plans[i].rows[j].ids) for i, j in rows]  # type: ignore[union-attr]
        found: dict[tuple[int, int], list[_Found]] = {}
        for bucket in length_buckets(lengths, self.batch_size, self.max_batch_tokens):
            batch = [rows[n] for n in bucket]
            for key, per_version in zip(batch, self._scan_rows([plans[i].rows[j] for i, j in batch])):  # type: ignore[union-attr]
                found[key] = per_version
        out: list[ScanResult | Problem] = []
        for i, p in enumerate(plans):
            if isinstance(p, Problem):
                out.append(p)
                continue
            per_row = [found[(i, j)] for j in range(len(p.rows))]
            versions = tuple(_verdict(policy, p, [f[v] for f in per_row]) for v, policy in enumerate(self.policies))
            c = p.conv
            out.append(ScanResult(c.key, c.id, c.source, c.line, p.tokens, len(c.messages),
                                  messages_digest(c.messages), versions, p.mode))
        return out

    @torch.no_grad()
    def _scan_rows(self, rows: Sequence[Row]) -> list[list[_Found]]:
        """One forward (stopped after the SAE's layer) over ``rows``; per row, per version."""
        ids, attention = pad_batch([r.ids for r in rows], self.pad_id)
        mask = monitor_mask(ids, attention.sum(1), self._special, self.include_special_tokens).to(self.device)
        ids = ids.to(self.device)
        captured: dict[HookPoint, torch.Tensor] = {}
        points = [self.sae.hook_point] + [HookPoint(layer) for layer in self.extra_layers]
        # unpadded: no mask, so the model keeps its fast causal attention path (see runtime.scan)
        with forward_precision(self.dtype, self.device):
            forward_through(self.model, {p: partial(captured.__setitem__, p) for p in points}, input_ids=ids,
                            attention_mask=None if bool(attention.all()) else attention.to(self.device))
        resid = captured[self.sae.hook_point].float()  # encode in float32 on float32 inputs, outside autocast
        extra = {layer: captured[HookPoint(layer)].float() for layer in self.extra_layers}
        valid = mask & self.encoders[0].content_mask(resid)
        T = ids.shape[1]
        pos = torch.arange(T, device=self.device)
        ends = torch.tensor([r.prompt_end for r in rows], device=self.device)
        prompt_mask = valid & (pos[None, :] < ends[:, None])
        spans = [(b, k, start, end) for b, r in enumerate(rows) for k, start, end in r.responses]
        width = max([end - start for _, _, start, end in spans] + [0])
        s_row = torch.tensor([s[0] for s in spans], dtype=torch.long, device=self.device)
        s_start = torch.tensor([s[2] for s in spans], dtype=torch.long, device=self.device)
        s_len = torch.tensor([s[3] - s[2] for s in spans], dtype=torch.long, device=self.device)
        offs = torch.arange(width, device=self.device)
        gather = (s_start[:, None] + offs[None, :]).clamp(max=T - 1)
        resp_mask = valid[s_row[:, None], gather] & (offs[None, :] < s_len[:, None])
        out: list[list[_Found]] = [[] for _ in rows]
        for policy, encoder in zip(self.policies, self.encoders):
            feats = encoder.encode(resid, extra)  # exactly the live monitor's columns for this version
            p_hits, p_counts = _step(policy, feats, prompt_mask, "prompt")
            r_hits, r_counts = _step(policy, feats[s_row[:, None], gather], resp_mask, "response")
            zero = [0] * len(policy.rules)
            for b in range(len(rows)):
                mine = [n for n, s in enumerate(spans) if s[0] == b]
                counts = [sum(c) for c in zip(zero, *(r_counts[n] for n in mine))]
                out[b].append(_Found(p_hits.get(b, []), p_counts[b],
                                     [(spans[n][1], spans[n][2], r_hits.get(n, [])) for n in mine], counts))
        return out


def _verdict(policy: CompiledPolicy, replay: Replay, found: Sequence[_Found]) -> VersionResult:
    """One version's verdict from its findings in each of the conversation's rows. A rule's
    firing is its earliest (turn, position, prompt before response); ``tokens_fired`` counts the
    last row's prompt stream (the whole history) plus every turn's response."""
    counts = list(found[-1].prompt_counts)
    for f in found:
        counts = [a + b for a, b in zip(counts, f.response_counts)]
    first: dict[str, tuple[tuple[int, int, int], str, Hit]] = {}
    for row, f in zip(replay.rows, found):
        last_turn = row.responses[-1][0] if row.responses else len(replay.turn_ends) - 1
        candidates = [((min(replay.turn_at(h.token_index), last_turn), h.token_index, 0), "prompt", h)
                      for h in f.prompt_hits]
        candidates += [((k, start + h.token_index, 1), "response", h) for k, start, hits in f.responses for h in hits]
        for key, scope, hit in candidates:
            if hit.rule_id not in first or key < first[hit.rule_id][0]:
                first[hit.rule_id] = (key, scope, hit)
    index = {r.id: r.index for r in policy.rules}
    firings = tuple(Firing(rule, turn, scope, hit.token_index, position, counts[index[rule]], hit.feature,
                           float(hit.activation), hit.mode, rule_action(hit.actions))
                    for rule, ((turn, position, _), scope, hit) in sorted(first.items(), key=lambda kv: kv[1][0]))
    return VersionResult(decide(firings), firings)


def _step(policy: CompiledPolicy, feats: torch.Tensor, mask: torch.Tensor, scope: str
          ) -> tuple[dict[int, list[Hit]], list[list[int]]]:
    """One engine step over all rows, fresh state; hits by row and fired-token counts [row][rule]."""
    rows = feats.shape[0]
    if rows == 0:
        return {}, []
    state = policy.new_state(rows, feats.device)
    result = policy.step(state, feats, mask, scope)  # type: ignore[arg-type]
    by_row: dict[int, list[Hit]] = {}
    for hit in result.hits:
        by_row.setdefault(hit.row, []).append(hit)
    if not result.hits:
        return by_row, [[0] * len(policy.rules) for _ in range(rows)]
    return by_row, result.fired.sum(1).cpu().tolist()
