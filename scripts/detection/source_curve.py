"""Does transfer grow with the number of training sources? (issue 14: what more data would buy)

    python scripts/detection/source_curve.py [--draws 6] [--out runs/detection/source_curve.json]

For each category and each left-out source S, the shipped recipe (L15 mean-pool logistic probe,
+ the benign calibration half as negatives) is fitted on k randomly drawn other sources, for
k = 1 .. K (K: the most every left-out source has), ``--draws`` draws per k, and scored on S (AUROC, TPR at 1% benign FPR). The mean
over S and draws, per k, is the learning curve over *sources*: if it still rises at the last k,
more sources of the same kind are the lever; if it is flat, they are not. Saved activations
only (scripts/detection/extract.py); no model.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import actsdb  # noqa: E402
import compare  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--draws", type=int, default=6)
    ap.add_argument("--layer", type=int, default=15)
    ap.add_argument("--out", default=str(actsdb.ROOT / "runs/detection/source_curve.json"))
    args = ap.parse_args()
    A = actsdb.load(with_tokens=False)
    meta = A.meta
    D = compare.Detectors(A, {})
    det = D.plus_benign(D.pooled("mean", actsdb.LAYERS.index(args.layer)))
    benign_test = np.array([i for i, m in enumerate(meta) if m["category"] == "benign" and actsdb.benign_half(m) == "test"])
    rng = np.random.default_rng(0)
    out = []
    for c in compare.CATS:
        rows = np.array([i for i, m in enumerate(meta) if m["category"] == c])
        groups = sorted({meta[i]["group"] for i in rows})
        trainable = [g for g in groups if len({meta[i]["label"] for i in rows if meta[i]["group"] == g}) == 2]
        k_max = min(len([h for h in trainable if h != g]) for g in groups)  # every source reaches it
        for g in groups:
            test = rows[[meta[i]["group"] == g for i in rows]]
            y = np.array([meta[i]["label"] for i in test])
            others = [h for h in trainable if h != g]
            for k in range(1, k_max + 1):
                draws = 1 if k == len(others) else args.draws
                for _ in range(draws):
                    pick = set(rng.choice(others, k, replace=False).tolist())
                    train = rows[[meta[i]["group"] in pick for i in rows]]
                    score = det(train)
                    s, b = score(test), score(benign_test)
                    pos, neg = s[y == 1], s[y == 0]
                    out.append({"category": c, "source": g, "k": k,
                                "auroc": compare.auroc(pos, neg) if len(neg) else compare.auroc(pos, b),
                                "tpr1": compare.tpr_at(pos, b)})
    Path(args.out).write_text(json.dumps(out, indent=1))
    print("Mean over left-out sources (and draws) of the L15 mean-pool + benign probe fitted on k other sources\n")
    print("| category | k | mean AUROC | mean TPR@1% |")
    print("| --- | ---: | ---: | ---: |")
    for c in compare.CATS:
        ks = sorted({r["k"] for r in out if r["category"] == c})
        for k in ks:
            rs = [r for r in out if r["category"] == c and r["k"] == k]
            by_src: dict[str, list[dict]] = {}
            for r in rs:
                by_src.setdefault(r["source"], []).append(r)
            au = np.nanmean([np.nanmean([r["auroc"] for r in v]) for v in by_src.values()])
            tp = np.nanmean([np.nanmean([r["tpr1"] for r in v]) for v in by_src.values()])
            print(f"| {c} | {k} | {au:.2f} | {tp:.2f} |")


if __name__ == "__main__":
    main()
