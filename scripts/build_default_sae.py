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
from monitor.train import SHARD_WINDOWS, extract_activations, tokenize_windows

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


def compare_layers(model, tokenizer, layers=CANDIDATE_LAYERS):
    from monitor.discover import pooled_activations
    from monitor.train import TrainConfig, evaluate_reconstruction, load_activations, train_sae

    out = WORK / "compare"
    out.mkdir(parents=True, exist_ok=True)
    saes, recon = {}, {}
    for layer in layers:
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
    path = WORK / "layer_compare.json"
    report = json.loads(path.read_text()) if path.exists() else {}
    report.update({"tokens_per_sae": COMPARE_TOKENS, "dev_items": len(items)})
    report.setdefault("layers", {})
    for point, matrix in pooled.items():
        by_set, start = {}, 0
        for name in sorted(sets):
            n = len(sets[name])
            by_set[name] = (matrix[start:start + n], torch.tensor([it.label for it in sets[name]]))
            start += n
        transfers = transfer_scores(by_set)
        report["layers"][str(point.layer)] = {
            "reconstruction": recon[point.layer], "transfers": transfers,
            "mean_test_auroc": sum(t["test_auroc"] for t in transfers) / len(transfers),
            "mean_top10_test_auroc": sum(t["top10_mean_test_auroc"] for t in transfers) / len(transfers)}
    path.write_text(json.dumps(report, indent=2))
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


def write_card():
    counts = json.loads((WORK / "data_counts.json").read_text())
    compare = json.loads((WORK / "layer_compare.json").read_text())
    final = json.loads((WORK / "final_summary.json").read_text())
    ev = json.loads((WORK / "sae_eval_heldout.json").read_text())
    cfg = json.loads((SHIP / "cfg.json").read_text())
    tc = cfg["metadata"]["train_config"]
    rows = []
    for layer, info in sorted(compare["layers"].items(), key=lambda kv: int(kv[0])):
        rows.append(f"| {layer} | {info['reconstruction']['fvu']:.3f} | "
                    + " | ".join(f"{x['test_auroc']:.3f} / {x['top10_mean_test_auroc']:.3f}" for x in info["transfers"])
                    + f" | {info['mean_test_auroc']:.3f} / {info['mean_top10_test_auroc']:.3f} |")
    header = " | ".join(f"{x['category']} {x['fit'].split('/')[-1].split('.')[0]}→{x['test'].split('/')[-1].split('.')[0]}"
                        for x in next(iter(compare["layers"].values()))["transfers"])
    text = f"""# Default SAE for SmolLM2-135M-Instruct, layer 15 residual stream

A BatchTopK sparse autoencoder trained by the sae-monitor project on the embedded default
model, because none exists to download. SAELens layout (`cfg.json` + `sae_weights.safetensors`);
SAELens reads it as a JumpReLU SAE with one global threshold, which is exactly how a BatchTopK
SAE runs at inference.

| | |
| --- | --- |
| hook | `blocks.15.hook_resid_post` (output of decoder block 15 of 30; `hidden_states[16]`) |
| width | 8192 latents (d_in 576, 14.2x), k = {tc['k']} (training), threshold {float(__import__('safetensors.torch', fromlist=['load_file']).load_file(str(SHIP / 'sae_weights.safetensors'))['threshold'][0]):.4f} (inference) |
| weights | float16, {(SHIP / 'sae_weights.safetensors').stat().st_size / 1e6:.1f} MB |
| excluded inputs | position 0 and tokens with residual norm > {cfg['metadata']['max_input_norm']:.0f} (10x the median: "massive activations" of attention sinks, ~100x the median norm); {cfg['metadata'].get('outliers_dropped', 0)} such tokens were dropped from training |

## Quality on held-out text

Measured with `sae-monitor sae-eval --texts runs/default-sae/heldout.jsonl --json` on
{ev['tokens']:,} tokens of 150 corpus documents that training never saw (every 50th document of
`../shared/data/corpus`, which the extraction skipped), model in float32:

| measure | ours | bar | Gemma Scope / SAELens for comparison |
| --- | ---: | --- | --- |
| FVU (fraction of variance unexplained) | {ev['fvu']:.3f} | ≤ 0.25 | Gemma Scope 16k residual SAEs: roughly 0.1–0.3 depending on layer and L0 |
| CE loss recovered | {ev['ce_recovered']:.3f} | ≥ 0.90 | typically 0.9–0.99 for SAELens/Gemma Scope residual SAEs |
| mean L0 | {ev['l0']:.1f} | 16–64 | Gemma Scope L0 ranges from ~10 to ~150 |
| dead latents (never active on this text) | {ev['dead_fraction']:.1%} | ≤ 10% | — |
| CE clean / spliced / zero-ablated | {ev['ce_clean']:.3f} / {ev['ce_spliced']:.3f} / {ev['ce_zero']:.3f} | | |

On 40,000 held-out activation tokens from the training mix (the last ones extracted):
FVU {final['shard_heldout']['fvu']:.3f}, L0 {final['shard_heldout']['l0']:.1f}, dead {final['shard_heldout']['dead_fraction']:.1%}.
The comparison figures are the ranges those projects report for their own models; they are
context, not a like-for-like benchmark.

## Recipe (exact)

Reproduce with `scripts/build_default_sae.py extract`, `compare`, `train --layer 15 --epochs 1.25`, `heldout`, `card`.

- Text: windows of at most 256 tokens (at most 4 per document), position 0 of each window dropped.
  - `../shared/data/corpus/corpus.jsonl.gz` minus every 50th document: {counts['corpus_tokens']:,} tokens
    (chat rows rendered with the model's chat template);
  - the labeled dev sets in `../shared/data` (all six files, shuffled, ≤ 2 windows per text): {counts['dev_tokens']:,} tokens;
  - the Python 3.11 standard library's source (no tests, ≤ 2 windows per file): {counts['stdlib_tokens']:,} tokens.
- Activations: model in bfloat16, extraction stopped after {FINAL_TOKENS:,} tokens (shuffled windows, so a prefix is a random sample);
  the last 40,000 held out; {cfg['metadata'].get('training_tokens', 0):,} training tokens.
- Training: BatchTopK, k = {tc['k']}, {tc['epochs']} epochs, batch {tc['batch_tokens']} tokens, Adam lr {tc['lr']}
  (warm-up {tc['warmup_steps']} steps, linear decay over the last 20%), unit-norm decoder rows, inputs scaled to mean
  squared norm d_in (the scale {cfg['metadata']['activation_scale']:.4f} is folded into the saved weights), AuxK loss
  (k_aux {tc['aux_k']}, coefficient {tc['aux_coef']:.4f}) for latents silent for {tc['dead_tokens']:,} tokens, sparse gradients.
  Final training FVU {final['last']['fvu']:.3f}; {final['train']['steps']} steps at ~7,600 tokens/s on 2 CPU cores.

## Why layer 15

Small SAEs (8192 latents, k 32, {compare['tokens_per_sae']:,} tokens each) were trained at layers 9, 15 and 21, and
each was scored on how well its latents separate the dev sets' categories *across sources*:
the best latent (by AUROC) on one source, tested on another; and the mean of the top-10 latents
(scaled by their maxima), tested the same way ({compare['dev_items']} dev items, max over each text's
scoped tokens: the response of a dialogue, the changed lines of a code fix). Cells are test AUROC,
single latent / top-10 mean.

| layer | held-out FVU | {header} | mean |
| --- | ---: | {' | '.join('---:' for _ in next(iter(compare['layers'].values()))['transfers'])} | ---: |
{chr(10).join(rows)}

(The layer-15 FVU of the small SAE was inflated by a handful of massive-activation tokens that
were not yet excluded at that point; after excluding them the final layer-15 SAE reaches the
figures above.) Transfer is weak at every layer: single latents picked on one source are near
chance on the other for sycophancy, and only the backdoor split (same source, disjoint pairs)
transfers well. Layers 9 and 15 were compared first and are within noise of each other; 15 was
kept for its better top-10 transfer (0.617 vs 0.598) and trained. Layer 21, measured afterwards
(`scripts/build_default_sae.py extra-layer --layer 21`), has the best single-latent transfer
(0.595, from unsafe code at 0.58-0.59 where 9 and 15 are at ~0.5) but the worst top-10 transfer
(0.578; sycophancy top-10 below chance) and the hardest reconstruction (FVU 0.292 vs 0.246 at
layer 9). The standard error of an AUROC near 0.5 on 80 + 80 items is about 0.045
(Hanley–McNeil), larger than most of these gaps: no layer is clearly better,
so the shipped SAE stays at 15. (The backdoor A/B split of the layer-21 row uses a stable hash;
the earlier rows used Python's per-process string hash, so that one column is not the same split.)
"""
    (SHIP / "README.md").write_text(text)
    print(text)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("step", choices=["extract", "compare", "train", "heldout", "card", "extra-layer"])
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--epochs", type=float, default=2.0)
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.step == "card":
        write_card()
        return
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
    elif args.step == "extra-layer":
        # a later candidate, on the same first windows as the comparison used
        windows, _ = build_windows(tokenizer)
        extract_activations(model, windows[:SHARD_WINDOWS * 17], [HookPoint(args.layer)], WORK / "acts",
                            batch_size=16, pad_id=tokenizer.pad_token_id or 0)
        compare_layers(model, tokenizer, layers=(args.layer,))
    elif args.step == "train":
        train_final(args.layer, args.epochs)
    elif args.step == "heldout":
        print(write_heldout(tokenizer))


if __name__ == "__main__":
    main()
