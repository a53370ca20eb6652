"""Finding the latents that mean something (``sae-monitor discover``).

Discovery compares two sets of texts (labeled 1 and 0) in the SAE's latent basis. Each text
is reduced to one number per latent: the maximum activation over the tokens its scope covers
(the response of a dialogue, the changed lines of a code fix, else the whole text, always
without position 0). Latents are then ranked by how well that number separates the sets.

Every latent is scored at once: :func:`score_latents` is a few tensor operations over the
``[n_texts, d_sae]`` matrix, so discovery costs one forward pass per text, truncated after the
SAE's layer. Numbers measured on the texts used to pick latents are optimistic; :func:`transfer`
picks latents on one group (a source, a language, a CWE) and scores them on the others, which
is the number to trust before a latent guards anything.

Flow: :func:`load_discovery_items` -> :func:`discover` -> :class:`DiscoveryResult` (table,
:func:`transfer`) -> :func:`to_catalog_entries` (+ :func:`max_activations`) -> catalog.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

# labeled_item and load_labeled stay importable from here, where they lived before
# monitor.activations existed (scripts use them).
from monitor.activations import labeled_item, load_labeled  # noqa: F401
from monitor.activations import LabeledText, Progress, as_items, pair_groups, pooled_activations, sae_encoder
from monitor.capture import HookPoint
# Catalog entries from a discovery live in monitor.catalog_entries; importable from here too.
from monitor.catalog_entries import merge_into_catalog, to_catalog_entries  # noqa: F401
from monitor.errors import DataError
from monitor.stats import auroc

Direction = Literal["positive", "negative", "both"]


def load_discovery_items(tokenizer: Any = None, *, data: Sequence[str | Path] = (),
                         category: str | None = None, positive: Sequence[str | Path] = (),
                         negative: Sequence[str | Path] = (), per_label: int | None = None,
                         seed: int = 0, scope: str = "auto") -> list[LabeledText]:
    """The items to discover on: labeled ``data`` files (optionally one ``category``), or
    ``positive`` and ``negative`` files whose rows are labeled 1 and 0 whatever they say.

    ``per_label`` keeps a random sample of at most that many items of each label (seeded).
    Raises :class:`DataError` when the result lacks either label.
    """
    if bool(data) == bool(positive or negative):
        raise DataError("give either labeled data files (--data) or --positive and --negative files")
    items: list[LabeledText] = []
    for path in data:
        items += load_labeled(path, tokenizer, scope=scope)
    for path in positive:
        items += load_labeled(path, tokenizer, scope=scope, label=1)
    for path in negative:
        items += load_labeled(path, tokenizer, scope=scope, label=0)
    if category is not None:
        have = sorted({item.category for item in items})
        items = [item for item in items if item.category == category]
        if not items:
            raise DataError(f"no rows with category '{category}'; categories present: "
                            f"{', '.join(repr(c) for c in have) or 'none'}")
    if per_label is not None:
        items = _sample(items, per_label, seed)
    counts = Counter(item.label for item in items)
    if not counts[1] or not counts[0]:
        raise DataError(f"discovery needs texts of both labels; got {counts[1]} labeled 1 and "
                        f"{counts[0]} labeled 0")
    return items


def _sample(items: Sequence[LabeledText], per_label: int, seed: int) -> list[LabeledText]:
    """At most ``per_label`` items of each label, drawn at random but keeping minimal pairs
    (same ``pair_id``) together so that pair statistics stay available."""
    groups = {key: [items[i] for i in idx] for key, idx in pair_groups(items).items()}
    keys = list(groups)
    random.Random(seed).shuffle(keys)
    counts: Counter[int] = Counter()
    kept = []
    for key in keys:
        for item in groups[key]:
            if counts[item.label] < per_label:
                counts[item.label] += 1
                kept.append(item)
    return kept


# ------------------------------------------------------------------ scoring


@dataclass(frozen=True)
class LatentScores:
    """Separation statistics of every latent; each tensor is ``[d_sae]``.

    ``auroc``: P(max activation on a positive text > on a negative one), ties half.
    ``fire_pos`` / ``fire_neg``: fraction of texts where the latent fires (max > 0).
    ``mean_pos`` / ``mean_neg``: mean of the per-text max. ``pair_win``: over minimal pairs
    (same ``pair_id``), the fraction where the positive side is higher, ties half (None
    without pairs).
    """

    auroc: torch.Tensor
    fire_pos: torch.Tensor
    fire_neg: torch.Tensor
    mean_pos: torch.Tensor
    mean_neg: torch.Tensor
    n_pos: int
    n_neg: int
    pair_win: torch.Tensor | None = None
    n_pairs: int = 0

    @property
    def gap(self) -> torch.Tensor:
        """``mean_pos - mean_neg``."""
        return self.mean_pos - self.mean_neg

    def rank(self, top: int, direction: Direction = "positive") -> torch.Tensor:
        """The ``top`` latent indices, best first.

        ``positive``: latents that fire more on label 1 (AUROC high); ``negative``: more on
        label 0; ``both``: farthest from 0.5. Ties are broken by the mean gap, then by index.
        """
        if direction == "positive":
            key, second = self.auroc, self.gap
        elif direction == "negative":
            key, second = 1 - self.auroc, -self.gap
        elif direction == "both":
            key, second = (self.auroc - 0.5).abs(), self.gap.abs()
        else:
            raise ValueError(f"direction must be 'positive', 'negative' or 'both', not {direction!r}")
        order = torch.sort(second, descending=True, stable=True).indices
        order = order[torch.sort(key[order], descending=True, stable=True).indices]
        return order[:top]


def score_latents(pooled: torch.Tensor, labels: torch.Tensor | Sequence[int],
                  pair_ids: Sequence[str | None] | None = None, *, chunk: int = 2048) -> LatentScores:
    """Score every column of ``pooled [n_texts, d_sae]`` against binary ``labels``.

    Vectorised over latents (AUROC in column chunks of ``chunk`` to bound memory).
    """
    pooled = torch.as_tensor(pooled).float()
    labels = torch.as_tensor(labels).bool()
    if pooled.dim() != 2 or pooled.shape[0] != labels.shape[0]:
        raise ValueError(f"pooled must be [n_texts, d] with one label per text; got "
                         f"{tuple(pooled.shape)} and {labels.shape[0]} labels")
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if not n_pos or not n_neg:
        raise DataError(f"scoring needs texts of both labels; got {n_pos} labeled 1 and {n_neg} labeled 0")
    auc = torch.cat([auroc(pooled[:, c:c + chunk], labels).float()
                     for c in range(0, pooled.shape[1], chunk)])
    fires = pooled > 0
    pair_win, n_pairs = None, 0
    if pair_ids is not None:
        pos_of: dict[str, int] = {}
        neg_of: dict[str, int] = {}
        for i, pid in enumerate(pair_ids):
            if pid is None or pid == "":
                continue
            (pos_of if labels[i] else neg_of).setdefault(str(pid), i)
        both = [pid for pid in pos_of if pid in neg_of]
        if both:
            diff = pooled[[pos_of[p] for p in both]] - pooled[[neg_of[p] for p in both]]
            pair_win = ((diff > 0).float() + 0.5 * (diff == 0).float()).mean(dim=0)
            n_pairs = len(both)
    return LatentScores(auroc=auc, fire_pos=fires[labels].float().mean(0),
                        fire_neg=fires[~labels].float().mean(0), mean_pos=pooled[labels].mean(0),
                        mean_neg=pooled[~labels].mean(0), n_pos=n_pos, n_neg=n_neg,
                        pair_win=pair_win, n_pairs=n_pairs)


def _pair_ids(items: Sequence[LabeledText]) -> list[str | None] | None:
    ids = [item.meta.get("pair_id") for item in items]
    return ids if any(i is not None for i in ids) else None


@dataclass
class DiscoveryResult:
    """What :func:`discover` found. ``pooled [n_texts, d_sae]`` is kept for :func:`transfer`
    and for picking examples; ``ranked`` holds the best latents, best first."""

    point: HookPoint
    items: list[LabeledText]
    pooled: torch.Tensor
    scores: LatentScores
    ranked: torch.Tensor
    direction: Direction = "positive"

    @property
    def labels(self) -> torch.Tensor:
        return torch.tensor([item.label for item in self.items], dtype=torch.bool)

    def rows(self, latents: Sequence[int] | torch.Tensor | None = None) -> list[dict[str, Any]]:
        """One dict per latent (default: the ranked ones): the numbers of the table."""
        latents = self.ranked if latents is None else torch.as_tensor(latents, dtype=torch.long)
        s = self.scores
        rows = []
        for rank, j in enumerate(latents.tolist(), 1):
            row: dict[str, Any] = {
                "rank": rank, "latent": j, "auroc": round(float(s.auroc[j]), 4),
                "fire_pos": round(float(s.fire_pos[j]), 4), "fire_neg": round(float(s.fire_neg[j]), 4),
                "mean_pos": round(float(s.mean_pos[j]), 4), "mean_neg": round(float(s.mean_neg[j]), 4),
                "gap": round(float(s.gap[j]), 4)}
            if s.pair_win is not None:
                row["pair_win"] = round(float(s.pair_win[j]), 4)
            rows.append(row)
        return rows

    def table(self, fmt: Literal["markdown", "terminal"] = "markdown",
              latents: Sequence[int] | torch.Tensor | None = None) -> str:
        """The ranked latents as a Markdown or plain aligned table."""
        columns = [("rank", "#", "{}"), ("latent", "latent", "{}"), ("auroc", "AUROC", "{:.3f}")]
        if self.scores.pair_win is not None:
            columns.append(("pair_win", "pair win", "{:.3f}"))
        columns += [("fire_pos", "fires on 1", "{:.1%}"), ("fire_neg", "fires on 0", "{:.1%}"),
                    ("mean_pos", "mean max 1", "{:.3f}"), ("mean_neg", "mean max 0", "{:.3f}"),
                    ("gap", "gap", "{:+.3f}")]
        body = [[fmt_.format(row[key]) for key, _, fmt_ in columns] for row in self.rows(latents)]
        head = [title for _, title, _ in columns]
        caption = (f"{self.scores.n_pos} texts labeled 1, {self.scores.n_neg} labeled 0"
                   + (f", {self.scores.n_pairs} pairs" if self.scores.n_pairs else "")
                   + f"; SAE at {self.point.name}; per-text max over in-scope tokens")
        if fmt == "markdown":
            lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---:" for _ in head) + "|"]
            lines += ["| " + " | ".join(r) + " |" for r in body]
            return "\n".join(lines) + f"\n\n{caption}\n"
        if fmt != "terminal":
            raise ValueError(f"fmt must be 'markdown' or 'terminal', not {fmt!r}")
        widths = [max(len(h), *(len(r[c]) for r in body)) if body else len(h) for c, h in enumerate(head)]
        lines = ["  ".join(h.rjust(w) for h, w in zip(head, widths))]
        lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in body]
        return "\n".join(lines) + f"\n{caption}\n"

    def top_items(self, latent: int, k: int = 3, label: int | None = 1) -> list[int]:
        """Indices of the ``k`` items (of ``label``; None: any) where ``latent`` is highest."""
        values = self.pooled[:, latent].clone()
        if label is not None:
            values[self.labels != bool(label)] = float("-inf")
        order = torch.sort(values, descending=True, stable=True).indices[:k]
        return [i for i in order.tolist() if values[i] > 0]

    def to_dict(self) -> dict[str, Any]:
        s = self.scores
        return {"hook": self.point.name, "n_pos": s.n_pos, "n_neg": s.n_neg, "n_pairs": s.n_pairs,
                "direction": self.direction, "latents": self.rows()}


@torch.no_grad()
def discover(model: nn.Module, tokenizer: Any, sae: Any, items: Sequence[LabeledText], *,
             top: int = 20, direction: Direction = "positive", ctx: int = 256, batch_size: int = 8,
             point: HookPoint | None = None,
             progress: Progress | None = None) -> DiscoveryResult:
    """Score every latent of ``sae`` on ``items`` and rank the best ``top``.

    One forward pass per text, stopped after the SAE's block; run the model in bfloat16 on CPU
    for speed (the residual is cast to float32 before encoding). Memory: ``n_texts * d_sae``
    floats for the pooled matrix.
    """
    items = list(items)
    point = point or sae.hook_point
    pooled = pooled_activations(model, tokenizer, items, {point: sae_encoder(sae)}, ctx=ctx,
                                batch_size=batch_size, progress=progress)[point]
    labels = torch.tensor([item.label for item in items], dtype=torch.bool)
    scores = score_latents(pooled, labels, _pair_ids(items))
    ranked = scores.rank(top, direction)
    return DiscoveryResult(point=point, items=items, pooled=pooled, scores=scores, ranked=ranked,
                           direction=direction)


@torch.no_grad()
def max_activations(model: nn.Module, tokenizer: Any, sae: Any, texts: Sequence[str | LabeledText],
                    latents: Sequence[int] | torch.Tensor, *, ctx: int = 256, batch_size: int = 8,
                    point: HookPoint | None = None,
                    progress: Progress | None = None) -> dict[int, float]:
    """``{latent: largest activation}`` over every in-scope token of ``texts`` (position 0 and
    out-of-range tokens excluded, as when monitoring). Only ``latents`` are encoded."""
    latents = [int(j) for j in torch.as_tensor(latents, dtype=torch.long).tolist()]
    if not latents:
        return {}
    point = point or sae.hook_point
    pooled = pooled_activations(model, tokenizer, as_items(texts), {point: sae_encoder(sae, latents)},
                                ctx=ctx, batch_size=batch_size, progress=progress)[point]
    peak = pooled.amax(dim=0) if len(pooled) else torch.zeros(len(latents))
    return dict(zip(latents, peak.tolist()))


# ------------------------------------------------------------------ generalisation


def group_of(item: LabeledText, key: str) -> str:
    """The value of ``key`` for ``item``: ``source``, ``category`` or a ``meta`` field."""
    if key == "source":
        return item.source
    if key == "category":
        return item.category
    value = item.meta.get(key)
    return "" if value is None else str(value)


@dataclass(frozen=True)
class TransferReport:
    """Latents picked on group ``fit`` and their AUROC on each other group.

    ``test_auroc[g]`` is ``[top]``, aligned with ``latents``; ``oracle[g]`` is the best any
    latent reaches on ``g`` (what picking on ``g`` itself would promise).
    """

    key: str
    fit: str
    latents: torch.Tensor
    fit_auroc: torch.Tensor
    test_auroc: dict[str, torch.Tensor]
    oracle: dict[str, tuple[int, float]]
    skipped: dict[str, str]

    def table(self) -> str:
        groups = list(self.test_auroc)
        head = ["latent", f"{self.key}={self.fit} (fit)"] + groups
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---:" for _ in head) + "|"]
        for r, j in enumerate(self.latents.tolist()):
            cells = [str(j), f"{float(self.fit_auroc[r]):.3f}"]
            cells += [f"{float(self.test_auroc[g][r]):.3f}" for g in groups]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("| mean | " + f"{float(self.fit_auroc.mean()):.3f} | "
                     + " | ".join(f"{float(self.test_auroc[g].mean()):.3f}" for g in groups) + " |")
        lines.append("| best on test (oracle) | | "
                     + " | ".join(f"{self.oracle[g][1]:.3f} (latent {self.oracle[g][0]})" for g in groups)
                     + " |")
        notes = [f"skipped {g}: {why}" for g, why in self.skipped.items()]
        return "\n".join(lines + ([""] + notes if notes else [])) + "\n"

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "fit": self.fit, "latents": self.latents.tolist(),
                "fit_auroc": [round(v, 4) for v in self.fit_auroc.tolist()],
                "test_auroc": {g: [round(v, 4) for v in t.tolist()] for g, t in self.test_auroc.items()},
                "oracle": {g: {"latent": j, "auroc": round(a, 4)} for g, (j, a) in self.oracle.items()},
                "skipped": self.skipped}


def transfer(result: DiscoveryResult, fit: str, *, key: str = "source",
             test: Sequence[str] | None = None, top: int = 10,
             direction: Direction | None = None) -> TransferReport:
    """Pick the ``top`` latents on the items whose ``key`` is ``fit``; score them on the others.

    Uses the pooled activations already in ``result``: no model run. ``test`` defaults to every
    other group that holds both labels. In-distribution AUROC overstates what a latent does on
    new text; a latent worth naming keeps most of its AUROC here.
    """
    direction = direction or result.direction
    groups = [group_of(item, key) for item in result.items]
    counts: dict[str, Counter[int]] = {}
    for g, item in zip(groups, result.items):
        counts.setdefault(g, Counter())[item.label] += 1
    listing = ", ".join(f"{g or '(empty)'!r} ({c[1]}/{c[0]})" for g, c in sorted(counts.items()))
    if fit not in counts or not counts[fit][0] or not counts[fit][1]:
        raise DataError(f"cannot fit on {key}={fit!r}: it needs texts of both labels. Groups "
                        f"(label 1/label 0): {listing}")
    group_tensor = {g: torch.tensor([x == g for x in groups]) for g in counts}
    labels = result.labels
    fit_mask = group_tensor[fit]
    fit_scores = score_latents(result.pooled[fit_mask], labels[fit_mask])
    latents = fit_scores.rank(top, direction)
    wanted = [g for g in counts if g != fit] if test is None else list(test)
    test_auroc: dict[str, torch.Tensor] = {}
    oracle: dict[str, tuple[int, float]] = {}
    skipped: dict[str, str] = {}
    for g in wanted:
        if g not in counts:
            raise DataError(f"no texts with {key}={g!r}; groups: {listing}")
        if not counts[g][0] or not counts[g][1]:
            skipped[g] = f"needs both labels, has {counts[g][1]} labeled 1 and {counts[g][0]} labeled 0"
            continue
        mask = group_tensor[g]
        all_auc = score_latents(result.pooled[mask], labels[mask]).auroc
        test_auroc[g] = all_auc[latents]
        best = int(torch.argmax(all_auc if direction != "negative" else -all_auc))
        oracle[g] = (best, float(all_auc[best]))
    return TransferReport(key=key, fit=fit, latents=latents, fit_auroc=fit_scores.auroc[latents],
                          test_auroc=test_auroc, oracle=oracle, skipped=skipped)
