"""Attention-style pooling probes by leave-one-source-out (issue 14, item 3).

    python scripts/detection/attention_probe.py [--layer 15] [--steps 300] [--out runs/detection/attention.json]

The detector compare.py did not run: a probe that learns *which* tokens of a row to read. Per
row, with per-token residuals x_t of the row's in-scope tokens (standardised):

    score = sum_t softmax_t(q . x_t) * (w . x_t) + b

(the attention probe of e.g. Kantamneni et al. 2025 / McKenzie et al. 2025, one head). ``q = 0``
is exactly mean pooling, so training starts from the fold's mean-pool logistic probe (w, b)
with q = 0 and learns the attention with Adam on the same cell-weighted logistic loss (L2 on
q and w). Same folds, measures and benign halves as compare.py; results in its JSON format so
``compare.py --report-only --merge`` prints them beside the other detectors. Runs on the saved
per-token activations (scripts/detection/extract.py); no model.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import actsdb  # noqa: E402
import compare  # noqa: E402
from monitor.probes import fit_logistic  # noqa: E402


class Tokens:
    """Flat per-token residuals of every row at one layer, with the row each token belongs to."""

    def __init__(self, A: actsdb.Acts, layer: int) -> None:
        tok, off = A.tokens(actsdb.LAYERS.index(layer))
        self.x = torch.from_numpy(tok.astype(np.float32))
        self.off = off
        self.owner = torch.from_numpy(np.repeat(np.arange(len(off) - 1), np.diff(off)))

    def rows(self, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens of rows ``idx`` and, per token, its position in ``idx``."""
        sel = np.concatenate([np.arange(self.off[i], self.off[i + 1]) for i in idx])
        seg = np.repeat(np.arange(len(idx)), [self.off[i + 1] - self.off[i] for i in idx])
        return self.x[sel], torch.from_numpy(seg)


def attend(x: torch.Tensor, seg: torch.Tensor, n: int, q: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Per row: the softmax(q . x)-weighted mean of w . x over the row's tokens."""
    logit = x @ q
    top = torch.full((n,), -torch.inf).scatter_reduce(0, seg, logit, "amax", include_self=True)
    e = torch.exp(logit - top[seg])
    den = torch.zeros(n).index_add(0, seg, e)
    num = torch.zeros(n).index_add(0, seg, e * (x @ w))
    return num / den


def fit_attention(T: Tokens, meta: list[dict], y: np.ndarray, pooled: np.ndarray, train: np.ndarray,
                  steps: int, l2: float):
    x, seg = T.rows(train)
    mu, sd = x.mean(0), x.std(0).clamp_min(1e-6)
    sw = torch.from_numpy(compare.cell_weights(meta, train)).float()
    w0, b0 = fit_logistic(torch.from_numpy(pooled[train]), torch.from_numpy(y[train].astype(np.float32)),
                          sample_weight=sw, l2=compare.L2)
    z = (x - mu) / sd
    w = (w0 * sd).clone().requires_grad_(True)  # the same probe in standardised units
    b = torch.tensor(float(b0 + mu @ w0), requires_grad=True)
    q = torch.zeros_like(w, requires_grad=True)
    target = torch.from_numpy(y[train].astype(np.float32))
    opt = torch.optim.Adam([q, w, b], lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        s = attend(z, seg, len(train), q, w) + b
        loss = (sw / sw.sum() * torch.nn.functional.binary_cross_entropy_with_logits(s, target, reduction="none")).sum()
        loss = loss + 0.5 * l2 * (q.pow(2).sum() + w.pow(2).sum())
        loss.backward()
        opt.step()
    q, w, b = q.detach(), w.detach(), b.detach()

    def score(idx: np.ndarray) -> np.ndarray:
        xi, si = T.rows(idx)
        with torch.no_grad():
            return (attend((xi - mu) / sd, si, len(idx), q, w) + b).numpy()
    return score


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layer", type=int, default=15)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--l2", type=float, default=1e-2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cats", nargs="*", default=list(compare.CATS))
    ap.add_argument("--out", default=str(actsdb.ROOT / "runs/detection/attention.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    A = actsdb.load()
    meta = A.meta
    T = Tokens(A, args.layer)
    pooled = A.a["mean"][:, actsdb.LAYERS.index(args.layer)].astype(np.float32)
    y = np.array([m["label"] for m in meta])
    calib = np.array([i for i, m in enumerate(meta) if m["category"] == "benign" and actsdb.benign_half(m) == "calib"])
    benign_test = np.array([i for i, m in enumerate(meta) if m["category"] == "benign" and actsdb.benign_half(m) == "test"])
    results = []
    for benign in (False, True):
        name = f"dense L{args.layer} attention-pool" + (" + benign negatives" if benign else "")

        def fit(train: np.ndarray, benign: bool = benign):
            return fit_attention(T, meta, y, pooled, np.concatenate([train, calib]) if benign else train,
                                 args.steps, args.l2)
        for c in args.cats:
            rs = compare.loso(meta, {name: fit}, [c], benign_test)
            results += rs
            print(f"[{time.time() - t0:.0f}s] {c} {name}: mean AUROC {np.nanmean([r['auroc'] for r in rs]):.2f} "
                  f"TPR@1% {np.nanmean([r['tpr1'] for r in rs]):.2f} pair acc {np.nanmean([r['pair_acc'] for r in rs]):.2f}",
                  flush=True)
            Path(args.out).write_text(json.dumps(results, indent=1))

if __name__ == "__main__":
    main()
