"""Leave-one-source-out transfer of the mean-pool probe read as ``scope_mean``, from saved
activations (no model; scripts/detection/extract.py wrote them).

    python scripts/detection/scope_mean_offline.py [--min-tokens 1 4 8 16 32]

Per category and left-out source S: the layer-15 mean-pool probe + benign negatives
(compare.py's best transferring recipe) is fitted on the other sources and scored on S as the
engine reads ``aggregate: {scope_mean: {min_tokens: k}}`` (max over tokens >= k of the running
mean) and as the final mean over the scope (the pooled score it was fitted for). Cells: AUROC /
TPR at 1% of the benign held-apart half / pair accuracy, plus the decision view: the threshold
that at most 1% of the benign *calibration* half exceeds, the share of S's positives above it
(recall) and the benign held-apart share above it. Writes runs/detection/scope_mean_offline.json.
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


def calib_threshold(s_cal: np.ndarray, rate: float = 0.01) -> float:
    """The smallest score at most ``rate`` of the calibration scores exceed (strictly)."""
    return float(np.sort(s_cal)[::-1][int(rate * len(s_cal))])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--min-tokens", type=int, nargs="*", default=[1, 4, 8, 16, 32])
    ap.add_argument("--layer", type=int, default=15)
    args = ap.parse_args()
    A = actsdb.load()
    meta = A.meta
    D = compare.Detectors(A, {})
    li = actsdb.LAYERS.index(args.layer)
    benign = [i for i, m in enumerate(meta) if m["category"] == "benign"]
    calib = np.array([i for i in benign if actsdb.benign_half(meta[i]) == "calib"])
    held = np.array([i for i in benign if actsdb.benign_half(meta[i]) == "test"])
    variants = {f"scope_mean(min_tokens={k})": D.plus_benign(D.scope_mean(li, k)) for k in args.min_tokens}
    variants["final scope mean (mean-pool)"] = D.plus_benign(D.scope_mean(li, final=True))
    variants["window_mean(32) (shipped before)"] = D.plus_benign(D.windowed(li, 32))
    results = []
    for c in compare.CATS:
        rows = np.array([i for i, m in enumerate(meta) if m["category"] == c])
        groups = sorted({meta[i]["group"] for i in rows})
        trainable = [g for g in groups if len({meta[i]["label"] for i in rows if meta[i]["group"] == g}) == 2]
        for g in groups:
            test = rows[[meta[i]["group"] == g for i in rows]]
            train = rows[[meta[i]["group"] != g and meta[i]["group"] in trainable for i in rows]]
            y = np.array([meta[i]["label"] for i in test])
            for name, det in variants.items():
                score = det(train)
                s, s_h, s_c = score(test), score(held), score(calib)
                pos, neg = s[y == 1], s[y == 0]
                thr = calib_threshold(s_c)
                results.append({"category": c, "detector": name, "source": g, "n_pos": int(len(pos)),
                                "n_neg": int(len(neg)),
                                "auroc": compare.auroc(pos, neg) if len(neg) else compare.auroc(pos, s_h),
                                "tpr1": compare.tpr_at(pos, s_h), "pair_acc": compare.pair_acc(s, meta, test),
                                "recall_at_calib_thr": float((pos > thr).mean()),
                                "benign_heldapart_fire": float((s_h > thr).mean())})
            print(f"{c} {g} done", file=sys.stderr, flush=True)
    out = actsdb.ROOT / "runs" / "detection" / "scope_mean_offline.json"
    out.write_text(json.dumps(results, indent=1))
    print(summary(results))


def summary(results: list[dict]) -> str:
    lines = ["| category | detector | mean AUROC | mean TPR@1% | mean pair acc | mean recall at calib thr | "
             "mean benign held-apart fire |", "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for c in compare.CATS:
        for d in dict.fromkeys(r["detector"] for r in results):
            rs = [r for r in results if r["category"] == c and r["detector"] == d]
            m = [np.nanmean([r[k] for r in rs]) for k in ("auroc", "tpr1", "pair_acc", "recall_at_calib_thr",
                                                           "benign_heldapart_fire")]
            lines.append(f"| {c} | {d} | " + " | ".join(f"{x:.2f}" for x in m) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
