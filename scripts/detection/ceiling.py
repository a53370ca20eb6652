"""In-source ceiling: how well a dense probe separates a source's labels when it is fitted on
that same source (issue 14, item 3).

    python scripts/detection/ceiling.py [--seeds 4] [--out runs/detection/ceiling.json]

Leave-one-source-out asks whether a detector transfers to a source it never saw. This asks the
prior question: is the concept linearly readable *at all* in this model's residual for that
source? Each source's minimal pairs are split in two halves by a hash of ``pair_id`` (``--seeds``
different splits); an L2 logistic probe (compare.py's, l2 = 0.01) is fitted on one half and
scored on the other, for mean / max / last-token pooling at layers 9-21. A source where even
this stays near 0.5 is beyond any linear probe on this model, whatever the training data.
Only the saved pooled activations are used (scripts/detection/extract.py); no model runs.
"""
from __future__ import annotations

import argparse
import json
import sys
import zlib
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import actsdb  # noqa: E402
import compare  # noqa: E402
from monitor.probes import fit_logistic  # noqa: E402

POOLS = ("mean", "max", "last")


def in_source_auroc(X: np.ndarray, y: np.ndarray, pair_ids: list[str], seeds: int) -> float:
    """Mean over ``seeds`` pair-disjoint half splits of the held-out half's AUROC."""
    out = []
    for seed in range(seeds):
        half = np.array([zlib.crc32(f"{p}/{seed}".encode()) % 2 for p in pair_ids])
        tr, te = half == 0, half == 1
        w, b = fit_logistic(torch.from_numpy(X[tr]), torch.from_numpy(y[tr].astype(np.float32)), l2=compare.L2)
        s = X[te] @ w.numpy()
        out.append(compare.auroc(s[y[te] == 1], s[y[te] == 0]))
    return float(np.mean(out))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--out", default=str(actsdb.ROOT / "runs/detection/ceiling.json"))
    args = ap.parse_args()
    A = actsdb.load(with_tokens=False)
    meta = A.meta
    y_all = np.array([m["label"] for m in meta])
    sources = sorted({(m["category"], m["group"]) for m in meta if m["category"] in compare.CATS})
    results = []
    for category, source in sources:
        rows = np.array([i for i, m in enumerate(meta) if m["group"] == source and m["category"] == category])
        if len(set(y_all[rows])) < 2:
            continue
        pair_ids = [str(meta[i].get("pair_id", meta[i]["id"])) for i in rows]
        cells = {}
        for pool in POOLS:
            for layer in actsdb.LAYERS:
                X = A.a[pool][rows, actsdb.LAYERS.index(layer)].astype(np.float32)
                cells[f"{pool} L{layer}"] = in_source_auroc(X, y_all[rows], pair_ids, args.seeds)
        best = max(cells, key=lambda k: cells[k])
        results.append({"category": category, "source": source, "rows": int(len(rows)), "cells": cells,
                        "best": best, "best_auroc": cells[best], "mean_L15": cells["mean L15"]})
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(f"In-source AUROC (fit on half of a source's pairs, tested on the other half; mean of {args.seeds} splits)\n")
    print("| category | source | rows | mean-pool L15 | best (pooling, layer) |")
    print("| --- | --- | ---: | ---: | --- |")
    for r in results:
        print(f"| {r['category']} | {r['source']} | {r['rows']} | {r['mean_L15']:.2f} | {r['best_auroc']:.2f} ({r['best']}) |")


if __name__ == "__main__":
    main()
