"""Fit the shipped catalog probes on every labeled source, and calibrate their thresholds.

    python scripts/detection/ship_probes.py            # writes the probes, prints the evidence
    python scripts/detection/ship_probes.py --dry-run  # prints only

For each category, a logistic probe on the layer-15 residual (the runtime applies it as
``x @ w + b`` per token) is fitted on all sources of the category together: ``tokmax`` trains it
per token (the policy tests each token), ``window32`` trains it on mean-pooled rows (the policy
uses ``aggregate: {window_mean: {tokens: 32}}``); ``+benign`` adds the benign calibration half to
training as negatives. Rows are weighted so every (source, label) cell counts the same; up to 32
tokens a row; activations from scripts/detection/extract.py. Leave-one-source-out transfer of
the same recipes is measured by scripts/detection/compare.py; this script only fits the final
probe and calibrates:

* ``threshold_1pct``: the smallest score that at most 1% of the benign *calibration* half exceeds;
* the benign *held-apart* half's firing rate at that threshold (the number to quote);
* ``max_activation``: the 99th percentile of the positives' scores (the catalog's scale).

Writes ``monitor/saes/default/catalog.probes.safetensors`` keys ``<category>_probe`` and
``runs/detection/ship_probes.json``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import actsdb  # noqa: E402
import compare  # noqa: E402
from monitor.probes import save_probe  # noqa: E402

PROBES = actsdb.ROOT / "monitor" / "saes" / "default" / "catalog.probes.safetensors"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--layer", type=int, default=15)
    ap.add_argument("--plan", default="unsafe_code=tokmax,backdoor=tokmax,sycophancy=tokmax",
                    help="per category: tokmax | window32, optionally +benign (benign calibration "
                         "half added to training as negatives)")
    args = ap.parse_args()
    compare.TOKENS_PER_ROW = 32
    A = actsdb.load()
    meta = A.meta
    D = compare.Detectors(A, {})
    li = actsdb.LAYERS.index(args.layer)
    calib = np.array([i for i, m in enumerate(meta) if m["category"] == "benign" and actsdb.benign_half(m) == "calib"])
    test = np.array([i for i, m in enumerate(meta) if m["category"] == "benign" and actsdb.benign_half(m) == "test"])
    report = {}
    for c in compare.CATS:
        rows = [i for i, m in enumerate(meta) if m["category"] == c]
        groups = sorted({meta[i]["group"] for i in rows})
        trainable = [g for g in groups if len({meta[i]["label"] for i in rows if meta[i]["group"] == g}) == 2]
        train = np.array([i for i in rows if meta[i]["group"] in trainable])
        kind = dict(p.split("=") for p in args.plan.split(","))[c]
        factory = D.tokmax(li) if kind.startswith("tokmax") else D.windowed(li, 32)
        score = (D.plus_benign(factory) if kind.endswith("+benign") else factory)(train)
        s_cal, s_test = score(calib), score(test)
        thr = float(np.sort(s_cal)[::-1][int(0.01 * len(s_cal))])
        s_train = score(train)
        y = np.array([meta[i]["label"] for i in train])
        per_source = {}
        for g in trainable:
            sel = np.array([meta[i]["group"] == g for i in train])
            per_source[g] = {"auroc_in_sample": round(compare.auroc(s_train[sel & (y == 1)], s_train[sel & (y == 0)]), 3),
                             "fires_pos": round(float((s_train[sel & (y == 1)] > thr).mean()), 3),
                             "fires_neg": round(float((s_train[sel & (y == 0)] > thr).mean()), 3)}
        report[c] = {"key": f"{c}_probe", "layer": args.layer, "kind": kind, "n_train_rows": int(len(train)), "sources": trainable,
                     "threshold_1pct_benign_calib": round(thr, 3),
                     "benign_calib_fire_rate": round(float((s_cal > thr).mean()), 4), "n_benign_calib": int(len(calib)),
                     "benign_heldapart_fire_rate": round(float((s_test > thr).mean()), 4), "n_benign_heldapart": int(len(test)),
                     "benign_heldapart_q99": round(float(np.quantile(s_test, 0.99)), 3),
                     "threshold_max_benign_calib": round(float(s_cal.max()), 3),
                     "benign_heldapart_fire_rate_at_max": round(float((s_test > s_cal.max()).mean()), 4),
                     "max_activation_q99_pos": round(float(np.quantile(s_train[y == 1], 0.99)), 3),
                     "per_source_in_sample": per_source}
        print(json.dumps({c: report[c]}, indent=1), flush=True)
        if not args.dry_run:
            save_probe(PROBES, f"{c}_probe", torch.from_numpy(np.asarray(score.weight, np.float32)), float(score.bias))
    out = actsdb.ROOT / "runs" / "detection" / "ship_probes.json"
    out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
