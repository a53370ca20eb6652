"""Probe-fitting recipes beyond plain logistic regression, by leave-one-source-out (issue 14).

    python scripts/detection/variants.py [--layers 15] [--out runs/detection/variants.json]

Same data, sources, benign halves and measures as compare.py (AUROC on the left-out source,
TPR at 1% FPR of the benign held-apart half, pair accuracy); only pooled activations are used, so
it runs in minutes without the model. Recipes, all linear on the mean-pooled residual (what the
runtime can apply per token and read with ``scope_mean``):

* ``lr``: logistic regression (compare.py's recipe), at several L2 strengths;
* ``mass-mean``: the difference of the class means, in standardised units (Marks & Tegmark 2023
  found such directions generalise better out of distribution than logistic ones);
* ``pair-diff``: logistic regression on within-pair differences (x_pos - x_neg, and the negation
  labelled 0): what varies inside a minimal pair and nothing a source shares;
* ``centred``: each training source's mean removed before fitting, so the probe cannot separate
  sources instead of labels;
* ``+benign``: the benign calibration half added as a negative source (as shipped).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import actsdb  # noqa: E402
import compare  # noqa: E402
from monitor.probes import fit_logistic  # noqa: E402


def _weights(meta, idx):
    return compare.cell_weights(meta, idx)


def _lr(X, y, w, l2):
    wt, b = fit_logistic(torch.from_numpy(X.astype(np.float32)), torch.from_numpy(y.astype(np.float32)),
                         sample_weight=torch.from_numpy(w), l2=l2)
    return wt.numpy(), float(b)


class Recipes:
    def __init__(self, A: actsdb.Acts, feats: np.ndarray):
        self.meta, self.X = A.meta, feats
        self.y = np.array([m["label"] for m in self.meta])
        self.calib = np.array([i for i, m in enumerate(self.meta)
                               if m["category"] == "benign" and actsdb.benign_half(m) == "calib"])

    def _train(self, train, benign):
        return np.concatenate([train, self.calib]) if benign else train

    def lr(self, l2: float, benign: bool, centred: bool = False):
        def fit(train):
            idx = self._train(train, benign)
            X = self.X[idx].astype(np.float32)
            if centred:  # remove each source's mean (benign rows keep theirs: they are the contrast)
                X = X.copy()
                groups = np.array([self.meta[i]["group"] for i in idx])
                for g in set(groups) - {"benign"}:
                    X[groups == g] -= X[groups == g].mean(0)
                X[groups == "benign"] -= self.X[train].astype(np.float32).mean(0)
            w, _ = _lr(X, self.y[idx], _weights(self.meta, idx), l2)
            return lambda rows: self.X[rows].astype(np.float32) @ w
        return fit

    def mass_mean(self, benign: bool):
        def fit(train):
            idx = self._train(train, benign)
            X, y, sw = self.X[idx].astype(np.float32), self.y[idx], _weights(self.meta, idx)
            sd = X.std(0) + 1e-6
            mu1 = (sw[y == 1, None] * X[y == 1]).sum(0) / sw[y == 1].sum()
            mu0 = (sw[y == 0, None] * X[y == 0]).sum(0) / sw[y == 0].sum()
            w = (mu1 - mu0) / sd ** 2
            return lambda rows: self.X[rows].astype(np.float32) @ w
        return fit

    def pair_diff(self, l2: float, benign: bool):
        def fit(train):
            by = defaultdict(dict)
            for i in train:
                pid = self.meta[i].get("pair_id")
                if pid is not None:
                    by[pid][self.meta[i]["label"]] = i
            pairs = [(p[1], p[0]) for p in by.values() if 0 in p and 1 in p]
            D = np.stack([self.X[a] - self.X[b] for a, b in pairs]).astype(np.float32)
            Xf = np.concatenate([D, -D])
            yf = np.concatenate([np.ones(len(D)), np.zeros(len(D))])
            # each training source's pairs weigh the same
            g = [self.meta[a]["group"] for a, _ in pairs] * 2
            cnt = defaultdict(int)
            for x in g:
                cnt[x] += 1
            sw = np.array([1.0 / cnt[x] for x in g])
            if benign:  # benign rows against the mean positive: one more contrast per benign row
                pos_mean = self.X[train][self.y[train] == 1].astype(np.float32).mean(0)
                B = pos_mean - self.X[self.calib].astype(np.float32)
                Xf = np.concatenate([Xf, B, -B])
                yf = np.concatenate([yf, np.ones(len(B)), np.zeros(len(B))])
                sw = np.concatenate([sw, np.full(2 * len(B), sw.sum() / (2 * len(B)) / len(cnt))])
            w, _ = _lr(Xf, yf, sw / sw.sum(), l2)
            return lambda rows: self.X[rows].astype(np.float32) @ w
        return fit


def summary(results, sources: str | None = None) -> str:
    """Means over the left-out sources (only those matching the regex ``sources``, if given)."""
    import re
    out = ["| category | detector | mean AUROC | mean TPR@1% | mean pair acc |", "| --- | --- | ---: | ---: | ---: |"]
    by = defaultdict(list)
    for r in results:
        if sources is None or re.search(sources, r["source"]):
            by[(r["category"], r["detector"])].append(r)
    for (c, d), rs in by.items():
        m = lambda k: compare.fmt(float(np.nanmean([r[k] for r in rs])))  # noqa: E731
        out.append(f"| {c} | {d} | {m('auroc')} | {m('tpr1')} | {m('pair_acc')} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, nargs="*", default=[15])
    ap.add_argument("--pool", default="mean", help="mean | max | mean+max")
    ap.add_argument("--cats", nargs="*", default=list(compare.CATS))
    ap.add_argument("--only", nargs="*", default=None, help="recipe names to run (default: all)")
    ap.add_argument("--l2", type=float, nargs="*", default=[0.01, 1.0, 10.0])
    ap.add_argument("--sources", default=None, help="also print the means over the left-out sources "
                    "matching this regex (e.g. the sources of an earlier data version)")
    ap.add_argument("--per-source", action="store_true", help="print every left-out source's cell too")
    ap.add_argument("--out", default=str(actsdb.ROOT / "runs/detection/variants.json"))
    args = ap.parse_args()
    t0 = time.time()
    A = actsdb.load(with_tokens=False)
    lis = [actsdb.LAYERS.index(L) for L in args.layers]
    pools = args.pool.split("+")
    feats = np.concatenate([A.a[p][:, li] for li in lis for p in pools], axis=1)
    R = Recipes(A, feats)
    dets = {}
    for benign in (False, True):
        tag = " +benign" if benign else ""
        for l2 in args.l2:
            dets[f"lr l2={l2}{tag}"] = R.lr(l2, benign)
            dets[f"centred lr l2={l2}{tag}"] = R.lr(l2, benign, centred=True)
            dets[f"pair-diff lr l2={l2}{tag}"] = R.pair_diff(l2, benign)
        dets[f"mass-mean{tag}"] = R.mass_mean(benign)
    if args.only:
        dets = {k: v for k, v in dets.items() if k in args.only}
    benign_test = np.array([i for i, m in enumerate(A.meta) if m["category"] == "benign" and actsdb.benign_half(m) == "test"])
    results = compare.loso(A.meta, dets, args.cats, benign_test)
    for r in results:
        r.update(layers=args.layers, pool=args.pool)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(f"layers {args.layers}, pool {args.pool} ({time.time() - t0:.0f} s)")
    print(summary(results))
    if args.sources:
        print(f"\nOnly the left-out sources matching {args.sources!r}:")
        print(summary(results, args.sources))
    if args.per_source:
        for r in results:
            print(f"{r['category']} | {r['detector']} | {r['source']} ({r['n_pos']}/{r['n_neg']}) | "
                  f"{compare.fmt(r['auroc'])} / {compare.fmt(r['tpr1'])} / {compare.fmt(r['pair_acc'])}")


if __name__ == "__main__":
    main()
