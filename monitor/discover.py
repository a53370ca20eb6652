"""Finding the latents that mean something (``sae-monitor discover``).

Discovery compares two sets of texts (labeled 1 and 0) in the SAE's latent basis. Each text
is reduced to one number per latent: the maximum activation over the tokens its scope covers
(the response of a dialogue, the changed lines of a code fix, else the whole text, always
without position 0). Latents are then ranked by how well that number separates the sets.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from monitor.capture import HookPoint, residual_hook
from monitor.data import read_jsonl, render

Encoder = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class LabeledText:
    """One labeled item; ``spans`` are the character ranges that count (empty: all text)."""

    text: str
    label: int
    category: str = ""
    source: str = ""
    spans: tuple[tuple[int, int], ...] = ()
    meta: Mapping[str, Any] = field(default_factory=dict)


def _line_spans(text: str, lines: Iterable[str]) -> list[tuple[int, int]]:
    spans = []
    for line in lines:
        line = line.strip()
        if not line:
            continue
        at = text.find(line)
        if at >= 0:
            spans.append((at, at + len(line)))
    return spans


def labeled_item(row: Mapping[str, Any], tokenizer: Any = None, *, scope: str = "auto") -> LabeledText:
    """Build a :class:`LabeledText` from a row in the format of the dev sets.

    ``scope``: ``auto`` (response if the row has one, else changed lines, else all), ``all``.
    """
    text = render(dict(row), tokenizer)
    spans: list[tuple[int, int]] = []
    if scope == "auto":
        response = row.get("response")
        if isinstance(response, str) and response.strip():
            at = text.rfind(response.strip())
            if at >= 0:
                spans = [(at, at + len(response.strip()))]
        elif row.get("changed_lines"):
            spans = _line_spans(text, row["changed_lines"])
    return LabeledText(text=text, label=int(row.get("label", 0)), category=str(row.get("category", "")),
                       source=str(row.get("source", "")).split(":")[0], spans=tuple(spans),
                       meta={k: row[k] for k in ("id", "pair_id", "subtype", "cwe", "language") if k in row})


def load_labeled(path: str | Path, tokenizer: Any = None, *, scope: str = "auto") -> list[LabeledText]:
    return [labeled_item(row, tokenizer, scope=scope) for row in read_jsonl(path)]


def _token_window(item: LabeledText, tokenizer: Any, ctx: int) -> tuple[list[int], list[bool]]:
    enc = tokenizer(item.text, add_special_tokens=True, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    if item.spans:
        in_scope = [any(s < e_tok and s_tok < e for s, e in item.spans) and e_tok > s_tok
                    for s_tok, e_tok in offsets]
    else:
        in_scope = [True] * len(ids)
    in_scope[0] = False
    if not any(in_scope):  # spans not found after tokenization: fall back to the whole text
        in_scope = [True] * len(ids)
        in_scope[0] = False
    first = in_scope.index(True)
    start = 0 if first < ctx else max(0, first - ctx // 4)
    window_ids, window_scope = ids[start:start + ctx], in_scope[start:start + ctx]
    if start > 0:
        window_scope[0] = False
    return window_ids, window_scope


class _Stop(Exception):
    pass


@torch.no_grad()
def pooled_activations(model: nn.Module, tokenizer: Any, items: Sequence[LabeledText],
                       encoders: Mapping[HookPoint, Encoder], *, ctx: int = 256, batch_size: int = 8,
                       progress: Callable[[int, int], None] | None = None) -> dict[HookPoint, torch.Tensor]:
    """Per item, the max over in-scope tokens of each encoder's output: ``{point: [n, D]}``.

    The forward pass stops after the deepest hooked block. Items are batched by length.
    """
    windows = [_token_window(item, tokenizer, ctx) for item in items]
    order = sorted(range(len(items)), key=lambda i: len(windows[i][0]))
    results: dict[HookPoint, list[tuple[int, torch.Tensor]]] = {p: [] for p in encoders}
    deepest = max(encoders, key=lambda p: (p.layer, p.site == "resid_post"))
    for b in range(0, len(order), batch_size):
        batch = order[b:b + batch_size]
        width = max(len(windows[i][0]) for i in batch)
        ids = torch.full((len(batch), width), tokenizer.pad_token_id or 0, dtype=torch.long)
        attn = torch.zeros_like(ids)
        scope = torch.zeros(ids.shape, dtype=torch.bool)
        for r, i in enumerate(batch):
            w_ids, w_scope = windows[i]
            ids[r, :len(w_ids)] = torch.tensor(w_ids)
            attn[r, :len(w_ids)] = 1
            scope[r, :len(w_ids)] = torch.tensor(w_scope)
        hooks = []
        for point, encode in encoders.items():
            def grab(resid: torch.Tensor, point: HookPoint = point, encode: Encoder = encode) -> None:
                acts = encode(resid.float())
                acts = acts.masked_fill(~scope[..., None], float("-inf")).amax(dim=1)
                results[point].extend(zip(batch, acts.clamp_min(0)))
                if point == deepest:
                    raise _Stop
            hooks.append(residual_hook(model, point, grab))
        for h in hooks:
            h.__enter__()
        try:
            model(input_ids=ids, attention_mask=attn, use_cache=False)
        except _Stop:
            pass
        finally:
            for h in reversed(hooks):
                h.__exit__(None, None, None)
        if progress:
            progress(min(b + batch_size, len(order)), len(order))
    out = {}
    for point, pairs in results.items():
        pairs.sort(key=lambda pair: pair[0])
        out[point] = torch.stack([t for _, t in pairs])
    return out
