"""Activation extraction: labeled texts in, residual-stream read-outs out.

The first research stage. Every reader of whole texts (discovery, explain pages, probes,
evaluation baselines) goes through here, so they all see the same tokenisation, scope and
truncation, and the same batching:

* :class:`LabeledText` and its readers (:func:`labeled_item`, :func:`load_labeled`,
  :func:`as_items`, :func:`pair_groups`): what an item is;
* :func:`token_window`: the token ids of one item and which positions count (its scope);
* :func:`length_batches`: windows sorted by length and right-padded into batches;
* :func:`pool_windows`, :func:`pooled_activations` (one vector per item) and
  :func:`iter_token_activations` (per token): the forward passes.

Batching is exact in the sense that matters: the model is causal and padding goes on the
right, so a real position never attends to a pad and keeps its position id; per-item results
equal a one-item forward up to floating-point reassociation in the batched matmuls (fp32 on
CPU: differences ~1e-6 of the activation scale; ``tests/test_activations.py`` checks it).
Every forward stops after the deepest hooked block (:func:`monitor.capture.forward_through`).

Progress: functions take ``progress(done, total)``, a callback the caller supplies (a CLI
line, a tqdm's ``update``); nothing here prints.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from monitor.capture import HookPoint, forward_through
from monitor.data import read_jsonl, render

Encoder = Callable[[torch.Tensor], torch.Tensor]
Progress = Callable[[int, int], None]
Pool = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Window = tuple[list[int], list[bool]]


@dataclass(frozen=True)
class LabeledText:
    """One labeled item; ``spans`` are the character ranges that count (empty: all text)."""

    text: str
    label: int
    category: str = ""
    source: str = ""
    spans: tuple[tuple[int, int], ...] = ()
    meta: Mapping[str, Any] = field(default_factory=dict)


META_FIELDS = ("id", "pair_id", "subtype", "cwe", "language")


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
                       meta={k: row[k] for k in META_FIELDS if k in row})


def load_labeled(path: str | Path, tokenizer: Any = None, *, scope: str = "auto",
                 label: int | None = None) -> list[LabeledText]:
    """Items of a labeled JSONL file; ``label`` overrides every row's label (for P/N files)."""
    rows = read_jsonl(path)
    if label is not None:
        rows = ({**row, "label": label} for row in rows)
    return [labeled_item(row, tokenizer, scope=scope) for row in rows]


def as_items(texts: Sequence[str | LabeledText]) -> list[LabeledText]:
    """``texts`` as :class:`LabeledText`; a plain string becomes an unlabeled (0) whole text."""
    return [t if isinstance(t, LabeledText) else LabeledText(text=t, label=0) for t in texts]


def pair_groups(items: Sequence[LabeledText]) -> dict[str, list[int]]:
    """Indices of ``items`` grouped so both sides of a minimal pair (same ``pair_id``) stay
    together; an item without a pair is a group of its own. Keys in first-seen order."""
    groups: dict[str, list[int]] = {}
    for i, item in enumerate(items):
        pid = item.meta.get("pair_id")
        groups.setdefault(f"pair:{pid}" if pid is not None else f"item:{i}", []).append(i)
    return groups


# ------------------------------------------------------------------ tokens and batches


def token_window(item: LabeledText, tokenizer: Any, ctx: int) -> Window:
    """``(ids, in_scope)`` of ``item``: at most ``ctx`` tokens, starting a quarter window
    before the first in-scope token when the text is longer. Position 0 never counts (the
    attention sink); spans that vanish in tokenisation fall back to the whole text."""
    enc = tokenizer(item.text, add_special_tokens=True, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    if item.spans:
        in_scope = [any(s < e_tok and s_tok < e for s, e in item.spans) and e_tok > s_tok
                    for s_tok, e_tok in offsets]
    else:
        in_scope = [True] * len(ids)
    if not ids:
        return [], []
    in_scope[0] = False
    if not any(in_scope):
        in_scope = [True] * len(ids)
        in_scope[0] = False
    first = in_scope.index(True) if any(in_scope) else 0
    start = 0 if first < ctx else max(0, first - ctx // 4)
    window_ids, window_scope = ids[start:start + ctx], in_scope[start:start + ctx]
    if start > 0:
        window_scope[0] = False
    return window_ids, window_scope


@dataclass(frozen=True)
class PaddedBatch:
    """Windows of similar length, right-padded: ``ids``/``attention_mask``/``scope`` ``[b, t]``."""

    indices: list[int]            # window index of each row
    ids: torch.Tensor
    attention_mask: torch.Tensor
    scope: torch.Tensor           # bool; False on padding


def length_batches(windows: Sequence[Window], batch_size: int, pad_id: int,
                   max_tokens: int | None = None) -> Iterator[PaddedBatch]:
    """Batches of at most ``batch_size`` windows, shortest first (length buckets: rows of one
    batch have neighbouring lengths, so little compute goes to padding) and, with
    ``max_tokens``, at most that many padded tokens (a longer window goes alone)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, not {batch_size}")
    order = sorted(range(len(windows)), key=lambda i: len(windows[i][0]))
    groups: list[list[int]] = []
    for i in order:
        group = groups[-1] if groups else None
        if group is None or len(group) >= batch_size or (
                max_tokens is not None and len(windows[i][0]) * (len(group) + 1) > max_tokens):
            groups.append([i])
        else:
            group.append(i)
    for batch in groups:
        width = max(1, max(len(windows[i][0]) for i in batch))
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        attn = torch.zeros_like(ids)
        scope = torch.zeros(ids.shape, dtype=torch.bool)
        for r, i in enumerate(batch):
            w_ids, w_scope = windows[i]
            ids[r, :len(w_ids)] = torch.tensor(w_ids, dtype=torch.long)
            attn[r, :len(w_ids)] = 1
            scope[r, :len(w_ids)] = torch.tensor(w_scope, dtype=torch.bool)
        yield PaddedBatch(batch, ids, attn, scope)


# ------------------------------------------------------------------ pooling


def max_pool(floor: float | None = 0.0) -> Pool:
    """Per row, the max over in-scope positions, clamped below at ``floor`` (None: no clamp;
    a row without in-scope positions is then ``-inf``)."""
    def pool(acts: torch.Tensor, scope: torch.Tensor) -> torch.Tensor:
        out = acts.masked_fill(~scope[..., None], float("-inf")).amax(dim=1)
        return out if floor is None else out.clamp_min(floor)
    return pool


def mean_max_pool(acts: torch.Tensor, scope: torch.Tensor) -> torch.Tensor:
    """Per row, ``[mean, max]`` over in-scope positions concatenated: ``[b, 2D]``; zeros for a
    row without in-scope positions."""
    keep = scope[..., None]
    count = keep.sum(dim=1).clamp_min(1)
    mean = (acts * keep).sum(dim=1) / count
    peak = acts.masked_fill(~keep, float("-inf")).amax(dim=1)
    out = torch.cat([mean, peak], dim=-1)
    return torch.where(scope.any(dim=1)[:, None], out, torch.zeros_like(out))


def progress_callback(progress: Progress | bool | None) -> Progress | None:
    """``progress`` if it is a callback, else None: the old ``progress=True/False`` flags of
    the research functions (which printed) now mean no progress; pass a callback instead."""
    return progress if callable(progress) else None


def identity(resid: torch.Tensor) -> torch.Tensor:
    """The residual itself, as float32 (an :data:`Encoder` for dense read-outs)."""
    return resid.float()


@torch.no_grad()
def pool_windows(model: nn.Module, windows: Sequence[Window], encoders: Mapping[HookPoint, Encoder], *,
                 pad_id: int = 0, pool: Pool | None = None, batch_size: int = 8,
                 max_tokens: int | None = None, progress: Progress | None = None) -> dict[HookPoint, torch.Tensor]:
    """``{point: [n, D']}``: per window, ``pool(encode(resid), scope)`` at each point.

    Windows go through in length-sorted, right-padded batches; the forward stops after the
    deepest hooked block. Rows come back in the order of ``windows``. ``pool`` defaults to
    :func:`max_pool` (floor 0); ``max_tokens`` caps the padded tokens of a batch.
    """
    pool = pool or max_pool()
    results: dict[HookPoint, list[tuple[int, torch.Tensor]]] = {p: [] for p in encoders}
    done = 0
    for batch in length_batches(windows, batch_size, pad_id, max_tokens):
        def grab(point: HookPoint, encode: Encoder, batch: PaddedBatch = batch) -> Callable[[torch.Tensor], None]:
            def hook(resid: torch.Tensor) -> None:
                results[point].extend(zip(batch.indices, pool(encode(resid.float()).float(), batch.scope)))
            return hook

        forward_through(model, {p: grab(p, e) for p, e in encoders.items()},
                        input_ids=batch.ids, attention_mask=batch.attention_mask)
        done += len(batch.indices)
        if progress:
            progress(done, len(windows))
    out = {}
    for point, pairs in results.items():
        pairs.sort(key=lambda pair: pair[0])
        out[point] = torch.stack([t for _, t in pairs]) if pairs else torch.zeros(0)
    return out


def pooled_activations(model: nn.Module, tokenizer: Any, items: Sequence[LabeledText],
                       encoders: Mapping[HookPoint, Encoder], *, ctx: int = 256, batch_size: int = 8,
                       progress: Progress | None = None,
                       floor: float | None = 0.0) -> dict[HookPoint, torch.Tensor]:
    """Per item, the max over in-scope tokens of each encoder's output: ``{point: [n, D]}``.

    Results are clamped below at ``floor`` (0 suits SAE latents; pass None for signed scores
    such as probes: an item without in-scope tokens is then ``-inf``).
    """
    windows = [token_window(item, tokenizer, ctx) for item in items]
    return pool_windows(model, windows, encoders, pad_id=tokenizer.pad_token_id or 0,
                        pool=max_pool(floor), batch_size=batch_size, progress=progress)


@dataclass(frozen=True)
class TokenBatch:
    """Per-token encoder outputs of one batch; ``acts`` is zero wherever ``scope`` is False."""

    indices: list[int]        # item index of each row
    ids: torch.Tensor         # [b, t] token ids (padding beyond each item's length)
    lengths: list[int]        # tokens per row
    scope: torch.Tensor       # [b, t] bool: positions that count
    acts: torch.Tensor        # [b, t, D] float32


@torch.no_grad()
def iter_token_activations(model: nn.Module, tokenizer: Any, items: Sequence[LabeledText],
                           point: HookPoint, encode: Encoder, *, ctx: int = 256,
                           batch_size: int = 8, progress: Progress | None = None) -> Iterator[TokenBatch]:
    """Stream per-token activations of ``encode`` at ``point``, one length-sorted batch at a time.

    The tokenisation, scope and truncation are those of :func:`pooled_activations`, so a
    per-token maximum here equals the pooled value there.
    """
    windows = [token_window(item, tokenizer, ctx) for item in items]
    done = 0
    for batch in length_batches(windows, batch_size, tokenizer.pad_token_id or 0):
        captured: list[torch.Tensor] = []
        forward_through(model, {point: lambda resid: captured.append(encode(resid.float()).float())},
                        input_ids=batch.ids, attention_mask=batch.attention_mask)
        acts = captured[0] * batch.scope[..., None]
        done += len(batch.indices)
        if progress:
            progress(done, len(items))
        yield TokenBatch(batch.indices, batch.ids, [len(windows[i][0]) for i in batch.indices],
                         batch.scope, acts)


def sae_encoder(sae: Any, latents: Sequence[int] | torch.Tensor | None = None) -> Encoder:
    """Encode residuals as the monitor does: ``latents`` only (all if None), float32, and zero
    at tokens outside the SAE's input range (``sae.input_mask``: massive-norm positions)."""
    encode = sae.encode if latents is None else sae.subset_encoder(latents)
    input_mask = getattr(sae, "input_mask", None)

    def run(resid: torch.Tensor) -> torch.Tensor:
        acts = encode(resid).float()
        if input_mask is not None:
            acts = acts * input_mask(resid)[..., None]
        return acts

    return run
