"""The exact recipe of the shipped default SAE (monitor/saes/default), step by step.

    python scripts/build_default_sae.py extract   # activations at the candidate layers (resumable)
    python scripts/build_default_sae.py compare   # small SAEs per candidate layer, dev-set separation
    python scripts/build_default_sae.py train --layer L   # the full SAE (resumable)

Work files go to runs/default-sae/ (git-ignored). Data: ../shared/data (corpus and dev sets) and
the Python standard library's source on this machine.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import sys
import sysconfig
import zlib
from pathlib import Path

import torch

from monitor.capture import HookPoint
from monitor.data import read_jsonl, render
from monitor.models import load_default_model
from monitor.train import extract_activations, tokenize_windows

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
WORK = ROOT / "runs" / "default-sae"
CANDIDATE_LAYERS = (9, 15)
HELD_OUT_EVERY = 50  # corpus document i with i % 50 == 0 is held out for evaluation
DEV_FILES = ("unsafe_code/sven_pairs.jsonl", "unsafe_code/juliet_c_pairs.jsonl",
             "unsafe_code/purplellama_insecure_positives.jsonl", "backdoor/juliet_c_pairs.jsonl",
             "sycophancy/anthropic_political_pairs.jsonl", "sycophancy/truthfulqa_constructed_pairs.jsonl")
BUDGET = {"corpus": 2_400_000, "dev": 450_000, "stdlib": 450_000}


def corpus_rows(held_out: bool):
    with gzip.open(SHARED / "corpus" / "corpus.jsonl.gz", "rt") as handle:
        for i, line in enumerate(handle):
            if (i % HELD_OUT_EVERY == 0) == held_out:
                yield json.loads(line)


def take(windows, budget):
    out, total = [], 0
    for w in windows:
        if total >= budget:
            break
        out.append(w)
        total += len(w) - 1
    return out, total


def build_windows(tokenizer):
    rng = random.Random(0)
    corpus = tokenize_windows((render(r, tokenizer) for r in corpus_rows(False)), tokenizer)
    corpus, n_corpus = take(corpus, BUDGET["corpus"])
    dev_texts = [render(r, tokenizer) for f in DEV_FILES for r in read_jsonl(SHARED / f)]
    rng.shuffle(dev_texts)
    dev, n_dev = take(tokenize_windows(dev_texts, tokenizer, max_windows_per_text=2), BUDGET["dev"])
    stdlib = sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py"))
    stdlib = [p for p in stdlib if "test" not in p.parts and "site-packages" not in p.parts]
    rng.shuffle(stdlib)
    code, n_code = take(tokenize_windows((p.read_text(errors="replace") for p in stdlib), tokenizer,
                                         max_windows_per_text=2), BUDGET["stdlib"])
    windows = corpus + dev + code
    rng.shuffle(windows)
    counts = {"corpus_tokens": n_corpus, "dev_tokens": n_dev, "stdlib_tokens": n_code,
              "windows": len(windows), "ctx": 256, "held_out": f"corpus docs with index % {HELD_OUT_EVERY} == 0"}
    return windows, counts


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("step", choices=["extract", "compare", "train", "heldout"])
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--epochs", type=float, default=2.0)
    args = parser.parse_args()
    torch.set_num_threads(2)
    model, tokenizer = load_default_model()
    model = model.to(torch.bfloat16)
    if args.step == "extract":
        windows, counts = build_windows(tokenizer)
        WORK.mkdir(parents=True, exist_ok=True)
        (WORK / "data_counts.json").write_text(json.dumps(counts, indent=2))
        print(counts, file=sys.stderr, flush=True)
        extract_activations(model, windows, [HookPoint(L) for L in CANDIDATE_LAYERS], WORK / "acts",
                            batch_size=16, pad_id=tokenizer.pad_token_id or 0)
    elif args.step == "compare":
        compare_layers(model, tokenizer)
    elif args.step == "train":
        train_final(args.layer, args.epochs)
    elif args.step == "heldout":
        print(write_heldout(tokenizer))


COMPARE_TOKENS = 600_000
DEV_PER_FILE = 160
TRANSFERS = [  # (category, fit on, test on)
    ("unsafe_code", "unsafe_code/sven_pairs.jsonl", "unsafe_code/juliet_c_pairs.jsonl"),
    ("unsafe_code", "unsafe_code/juliet_c_pairs.jsonl", "unsafe_code/sven_pairs.jsonl"),
    ("sycophancy", "sycophancy/anthropic_political_pairs.jsonl", "sycophancy/truthfulqa_constructed_pairs.jsonl"),
    ("sycophancy", "sycophancy/truthfulqa_constructed_pairs.jsonl", "sycophancy/anthropic_political_pairs.jsonl"),
    ("backdoor", "backdoor/juliet_c_pairs.jsonl#A", "backdoor/juliet_c_pairs.jsonl#B"),
]


def dev_sample(tokenizer):
    """Up to DEV_PER_FILE items per labeled file, half each label; backdoor split by pair."""
    from monitor.discover import labeled_item

    rng = random.Random(1)
    sets = {}
    for f in {t[1].split("#")[0] for t in TRANSFERS} | {t[2].split("#")[0] for t in TRANSFERS}:
        rows = list(read_jsonl(SHARED / f))
        rng.shuffle(rows)
        if f.startswith("backdoor"):
            halves = {"A": [], "B": []}
            for r in rows:
                halves["A" if zlib.crc32(r["pair_id"].encode()) % 2 else "B"].append(r)
            for half, hrows in halves.items():
                pos = [r for r in hrows if r["label"] == 1][:DEV_PER_FILE // 2]
                neg = [r for r in hrows if r["label"] == 0][:DEV_PER_FILE // 2]
                sets[f"{f}#{half}"] = [labeled_item(r, tokenizer) for r in pos + neg]
        else:
            pos = [r for r in rows if r["label"] == 1][:DEV_PER_FILE // 2]
            neg = [r for r in rows if r["label"] == 0][:DEV_PER_FILE // 2]
            sets[f] = [labeled_item(r, tokenizer) for r in pos + neg]
    return sets


def transfer_scores(pooled_by_set):
    """Per transfer: the best latent on the fit set (AUROC) and its AUROC on the test set."""
    from monitor.stats import auroc

    rows = []
    for category, fit, test in TRANSFERS:
        (fx, fy), (tx, ty) = pooled_by_set[fit], pooled_by_set[test]
        fit_auc = auroc(fx, fy)
        best = int(torch.argmax(fit_auc))
        top10 = torch.topk(fit_auc, 10).indices
        scale = fx[:, top10].amax(0).clamp_min(1e-6)
        combo_test = float(auroc((tx[:, top10] / scale).mean(1), ty))
        rows.append({"category": category, "fit": fit, "test": test, "latent": best,
                     "fit_auroc": float(fit_auc[best]), "test_auroc": float(auroc(tx[:, best], ty)),
                     "top10_mean_test_auroc": combo_test})
    return rows


def compare_layers(model, tokenizer):
    from monitor.discover import pooled_activations
    from monitor.train import TrainConfig, evaluate_reconstruction, load_activations, train_sae

    out = WORK / "compare"
    out.mkdir(parents=True, exist_ok=True)
    saes, recon = {}, {}
    for layer in CANDIDATE_LAYERS:
        acts = load_activations(WORK / "acts" / f"L{layer}_resid_post", max_tokens=COMPARE_TOKENS + 60_000)
        train, held = acts[:COMPARE_TOKENS], acts[COMPARE_TOKENS:]
        sae, _ = train_sae(train, TrainConfig(epochs=1.0), out=out / f"L{layer}", log_every=25)
        saes[HookPoint(layer)] = sae
        recon[layer] = evaluate_reconstruction(sae, held)
        print(f"layer {layer}: {recon[layer]}", file=sys.stderr, flush=True)
    sets = dev_sample(tokenizer)
    items = [item for name in sorted(sets) for item in sets[name]]
    pooled = pooled_activations(model, tokenizer, items, {p: s.encode for p, s in saes.items()},
                                progress=lambda d, n: print(f"dev {d}/{n}", file=sys.stderr, flush=True) if d % 80 == 0 else None)
    report = {"tokens_per_sae": COMPARE_TOKENS, "dev_items": len(items), "layers": {}}
    for point, matrix in pooled.items():
        by_set, start = {}, 0
        for name in sorted(sets):
            n = len(sets[name])
            by_set[name] = (matrix[start:start + n], torch.tensor([it.label for it in sets[name]]))
            start += n
        transfers = transfer_scores(by_set)
        report["layers"][point.layer] = {
            "reconstruction": recon[point.layer], "transfers": transfers,
            "mean_test_auroc": sum(t["test_auroc"] for t in transfers) / len(transfers),
            "mean_top10_test_auroc": sum(t["top10_mean_test_auroc"] for t in transfers) / len(transfers)}
    (WORK / "layer_compare.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


FINAL_TOKENS = 2_080_000
SHIP = ROOT / "monitor" / "saes" / "default"


def train_final(layer, epochs):
    from dataclasses import replace as dc_replace

    from monitor.train import TrainConfig, evaluate_reconstruction, load_activations, train_sae

    acts = load_activations(WORK / "acts" / f"L{layer}_resid_post", max_tokens=FINAL_TOKENS)
    held = acts[-40_000:]
    train = acts[:-40_000]
    cfg = TrainConfig(epochs=epochs, dead_tokens=500_000)
    sae, summary = train_sae(train, cfg, out=WORK / f"final-L{layer}", log_every=25)
    point = HookPoint(layer)
    sae.cfg = dc_replace(sae.cfg, model_name="SmolLM2-135M-Instruct", hook_name=point.name, hook_layer=layer,
                         metadata={**sae.cfg.metadata, "training_tokens": int(len(train)),
                                   "outliers_dropped": summary["outliers_dropped"]})
    SHIP.mkdir(parents=True, exist_ok=True)
    sae.save(SHIP, dtype=torch.float16)
    recon = evaluate_reconstruction(sae, held)
    (WORK / "final_summary.json").write_text(json.dumps({"train": {k: v for k, v in summary.items() if k != "history"},
                                                         "shard_heldout": recon, "last": summary["history"][-1]}, indent=2))
    print(json.dumps(recon), file=sys.stderr)


def write_heldout(tokenizer, n=150):
    """Held-out corpus documents (never in training) as JSONL for sae-eval."""
    path = WORK / "heldout.jsonl"
    with path.open("w") as handle:
        for i, row in enumerate(corpus_rows(True)):
            if i >= n:
                break
            handle.write(json.dumps({"text": render(row, tokenizer)}) + "\n")
    return path


if __name__ == "__main__":
    main()
