"""Linear probes on the residual stream, as catalog features beside SAE latents.

A probe is a direction ``w`` and bias ``b`` at the SAE's hook point. At run time the monitor
scores each token ``x @ w + b`` and a text's score is the maximum over its in-scope tokens,
exactly like an SAE latent; so probes and latents share policies, thresholds and evidence.
When no single latent separates a concept, a probe trained on the same labeled texts often
does, and it costs one dot product per token.

On disk a probe is two tensors in a safetensors file, ``<key>.weight [d_in]`` and
``<key>.bias []`` (see :mod:`monitor.catalog`); :func:`save_probe` writes them and keeps the
other probes already in the file.
"""

from __future__ import annotations

import os
import random
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from monitor.capture import HookPoint
from monitor.activations import (LabeledText, Progress, as_items, identity, iter_token_activations, pair_groups,
                                 pooled_activations)
from monitor.errors import CatalogError, DataError
from monitor.stats import auroc


@dataclass(frozen=True)
class Probe:
    """A fitted probe: per-token score ``x @ weight + bias`` on the residual at ``point``."""

    weight: torch.Tensor            # [d_in] float32, in the residual's own units
    bias: float
    point: HookPoint
    evidence: dict[str, Any] = field(default_factory=dict)

    def score(self, resid: torch.Tensor) -> torch.Tensor:
        """Per-token scores ``[...]`` for residual activations ``[..., d_in]``."""
        return resid.float() @ self.weight + self.bias


def fit_logistic(x: torch.Tensor, y: torch.Tensor, *, sample_weight: torch.Tensor | None = None,
                 l2: float = 1e-3, max_iter: int = 200) -> tuple[torch.Tensor, float]:
    """L2-regularised logistic regression; returns ``(w, b)`` for the raw features.

    Features are standardised first (residual streams have a few huge dimensions, which make
    the problem ill-conditioned), the penalty ``l2/2 * |w_z|^2`` applies in standardised units,
    and the result is folded back: ``w = w_z / sd``, ``b = b_z - (mean / sd) @ w_z``, so
    ``x @ w + b`` equals the standardised model's logit. ``sample_weight`` is normalised to sum
    to one. Full-batch L-BFGS with a strong-Wolfe line search: deterministic.
    """
    x = torch.as_tensor(x).float()
    y = torch.as_tensor(y).float()
    if x.dim() != 2 or y.shape != (x.shape[0],):
        raise ValueError(f"x must be [n, d] and y [n]; got {tuple(x.shape)} and {tuple(y.shape)}")
    sw = torch.ones(len(x)) if sample_weight is None else torch.as_tensor(sample_weight).float()
    sw = sw / sw.sum()
    mean = sw @ x
    sd = (sw @ (x - mean).pow(2)).sqrt().clamp_min(1e-6)
    z = (x - mean) / sd
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros((), requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=20,
                            tolerance_grad=1e-8, tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = (sw * nn.functional.binary_cross_entropy_with_logits(z @ w + b, y, reduction="none")).sum()
        loss = loss + 0.5 * l2 * w.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    w_z, b_z = w.detach(), float(b.detach())
    weight = w_z / sd
    return weight.contiguous(), b_z - float((mean / sd) @ w_z)


def holdout_split(items: Sequence[LabeledText], holdout: float, seed: int) -> tuple[list[int], list[int]]:
    """Train and held-out indices; both sides of a ``pair_id`` land on the same side."""
    groups = pair_groups(items)
    keys = sorted(groups)
    random.Random(seed).shuffle(keys)
    n_test = round(len(keys) * holdout)
    test = sorted(i for k in keys[:n_test] for i in groups[k])
    train = sorted(i for k in keys[n_test:] for i in groups[k])
    return train, test


@torch.no_grad()
def _token_rows(model: nn.Module, tokenizer: Any, items: Sequence[LabeledText], point: HookPoint, *,
                tokens_per_item: int, ctx: int, batch_size: int, seed: int,
                progress: Progress | None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Residuals of up to ``tokens_per_item`` random in-scope tokens per item, their item's
    label, and a weight per token that gives every item the same total weight."""
    g = torch.Generator().manual_seed(seed)
    xs, ys, ws = [], [], []
    for tb in iter_token_activations(model, tokenizer, items, point, identity, ctx=ctx,
                                     batch_size=batch_size, progress=progress):
        for r, i in enumerate(tb.indices):
            positions = tb.scope[r].nonzero().squeeze(1)
            if not len(positions):
                continue
            if len(positions) > tokens_per_item:
                positions = positions[torch.randperm(len(positions), generator=g)[:tokens_per_item]]
            xs.append(tb.acts[r, positions].float())
            ys.append(torch.full((len(positions),), float(items[i].label)))
            ws.append(torch.full((len(positions),), 1.0 / len(positions)))
    if not xs:
        raise DataError("no in-scope tokens to train a probe on")
    return torch.cat(xs), torch.cat(ys), torch.cat(ws)


def fit_probe(model: nn.Module, tokenizer: Any, items: Sequence[LabeledText], point: HookPoint, *,
              l2: float = 1e-3, holdout: float = 0.25, tokens_per_item: int = 64, ctx: int = 256,
              batch_size: int = 8, seed: int = 0,
              progress: Progress | None = None) -> Probe:
    """Fit a logistic-regression probe on residual activations at ``point``.

    **Per-token training**, each in-scope token labeled with its text's label, rather than
    mean-pooled texts: the monitor applies a probe per token (``x @ w + b``) and takes the max
    over tokens, so the probe must be trained on the distribution it is applied to. A probe fit
    on means puts its bias where text averages sit; the max over a hundred tokens of a negative
    text lies far above that, so its scale and threshold would not carry over. The label noise
    this brings (not every token of a positive text shows the concept) blurs the probe
    somewhat, but the max at run time needs only one clearly positive token. Each text gets
    equal weight (tokens are subsampled to ``tokens_per_item`` and weighted ``1/k``) and each
    class half of the total, so long texts and unbalanced sets do not dominate.

    ``holdout`` of the items (whole ``pair_id`` pairs together) are kept out of training and
    scored with the run-time rule; their AUROC is ``evidence["auroc_heldout"]``.
    """
    items = list(items)
    train_idx, test_idx = holdout_split(items, holdout, seed) if holdout > 0 else (list(range(len(items))), [])
    train = [items[i] for i in train_idx]
    labels = torch.tensor([item.label for item in train])
    if not (labels == 1).any() or not (labels == 0).any():
        raise DataError(f"a probe needs training texts of both labels; got {int((labels == 1).sum())} "
                        f"labeled 1 and {int((labels == 0).sum())} labeled 0")
    x, y, w = _token_rows(model, tokenizer, train, point, tokens_per_item=tokens_per_item, ctx=ctx,
                          batch_size=batch_size, seed=seed, progress=progress)
    for value in (0.0, 1.0):  # each class carries half the weight
        w[y == value] = w[y == value] / (2 * w[y == value].sum())
    weight, bias = fit_logistic(x, y, sample_weight=w, l2=l2)
    evidence: dict[str, Any] = {"hook": point.name, "method": "per-token logistic regression, max over tokens",
                                "l2": l2, "n_train": len(train), "n_train_tokens": len(x),
                                "n_heldout": len(test_idx)}
    if test_idx:
        test = [items[i] for i in test_idx]
        test_labels = torch.tensor([item.label for item in test])
        if (test_labels == 1).any() and (test_labels == 0).any():
            scores = probe_scores(model, tokenizer, test, point, weight, bias, ctx=ctx,
                                  batch_size=batch_size)
            evidence["auroc_heldout"] = round(float(auroc(scores, test_labels)), 4)
    return Probe(weight=weight, bias=bias, point=point, evidence=evidence)


@torch.no_grad()
def probe_scores(model: nn.Module, tokenizer: Any, items: Sequence[str | LabeledText], point: HookPoint,
                 weight: torch.Tensor, bias: float, *, ctx: int = 256, batch_size: int = 8,
                 progress: Progress | None = None) -> torch.Tensor:
    """Per text, the max over in-scope tokens of ``x @ weight + bias`` (the run-time rule): ``[n]``."""
    weight = torch.as_tensor(weight).float()

    def encode(resid: torch.Tensor) -> torch.Tensor:
        return (resid.float() @ weight + bias)[..., None]

    pooled = pooled_activations(model, tokenizer, as_items(items), {point: encode}, ctx=ctx,
                                batch_size=batch_size, progress=progress, floor=None)[point]
    return pooled[:, 0]


def save_probe(path: str | Path, key: str, weight: torch.Tensor, bias: float) -> Path:
    """Write probe ``key`` (``<key>.weight`` [d_in] float32, ``<key>.bias`` scalar) to the
    safetensors file ``path``, keeping any other probes in it; replaced atomically."""
    from safetensors.torch import load_file, save_file

    weight = torch.as_tensor(weight).detach().float().contiguous()
    if not key or weight.dim() != 1:
        raise CatalogError(f"a probe needs a non-empty key and a 1-D weight; got key {key!r} and "
                           f"shape {tuple(weight.shape)}")
    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    if path.exists():
        try:
            tensors = load_file(str(path))
        except Exception as exc:  # safetensors raises its own error types
            raise CatalogError(f"cannot add probe '{key}' to {path}: not a readable safetensors "
                               f"file ({exc})") from None
    tensors[f"{key}.weight"] = weight
    tensors[f"{key}.bias"] = torch.tensor(float(bias), dtype=torch.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def probe_entry(name: str, key: str, probe: Probe, *, max_activation: float | None = None,
                description: str = "", probes_file: str | None = None) -> Any:
    """A catalog :class:`monitor.catalog.FeatureEntry` for a saved probe, with its evidence."""
    from monitor.catalog import FeatureEntry

    try:
        return FeatureEntry(name=name, probe=key, probes_file=probes_file, description=description,
                            max_activation=round(max_activation, 4)
                            if max_activation is not None and max_activation > 0 else None,
                            evidence=dict(probe.evidence))
    except ValueError as exc:
        raise CatalogError(f"cannot make a catalog entry for probe {key!r} named {name!r}: {exc}") from None
