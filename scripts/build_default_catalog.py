"""Evidence for the default feature catalog: which latents of the shipped SAE separate the
dev sets' categories, judged by transfer across sources (pick on one source, test on another).

    python scripts/build_default_catalog.py pool      # pooled activations of dev items (cached)
    python scripts/build_default_catalog.py rank      # transfer-ranked candidate latents per concept
    python scripts/build_default_catalog.py contexts L1 L2 ...   # top corpus contexts of latents

Work files go to runs/catalog/. The catalog itself (monitor/saes/default/catalog.yaml) is
written by hand from this evidence: every entry is read, not picked by score alone.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch

from monitor.data import read_jsonl
from monitor.discover import labeled_item, pooled_activations
from monitor.sae import load_sae
from monitor.stats import auroc

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
WORK = ROOT / "runs" / "catalog"
FILES = {
    "sven": "unsafe_code/sven_pairs.jsonl",
    "juliet": "unsafe_code/juliet_c_pairs.jsonl",
    "purplellama": "unsafe_code/purplellama_insecure_positives.jsonl",
    "backdoor_juliet": "backdoor/juliet_c_pairs.jsonl",
    "political": "sycophancy/anthropic_political_pairs.jsonl",
    "truthfulqa": "sycophancy/truthfulqa_constructed_pairs.jsonl",
}
PER_FILE = 300
FOCUS_CWES = {"CWE-078", "CWE-78", "CWE-089", "CWE-89", "CWE-502", "CWE-94", "CWE-95", "CWE-798", "CWE-295"}


def items(tokenizer):
    rng = random.Random(7)
    out = []
    for name, rel in FILES.items():
        rows = list(read_jsonl(SHARED / rel))
        rng.shuffle(rows)
        pos = [r for r in rows if r["label"] == 1][:PER_FILE // 2 if name != "purplellama" else PER_FILE]
        neg = [r for r in rows if r["label"] == 0][:PER_FILE // 2]
        chosen = pos + neg
        ids = {r["id"] for r in chosen}
        # every row of the CWEs that have catalog sub-concepts, so those subsets are not tiny
        chosen += [r for r in rows if r.get("cwe") in FOCUS_CWES and r["id"] not in ids]
        out += [(name, labeled_item(r, tokenizer)) for r in chosen]
    for r in read_jsonl(ROOT / "datasets" / "devsets" / "backdoor_prose.jsonl"):
        out.append(("backdoor_prose", labeled_item(r, tokenizer)))
    return out


def pool():
    from monitor.models import load_default_model

    model, tokenizer = load_default_model()
    model = model.to(torch.bfloat16)
    sae = load_sae("default")
    data = items(tokenizer)
    pooled = pooled_activations(model, tokenizer, [it for _, it in data], {sae.hook_point: sae.encode},
                                progress=lambda d, n: print(f"{d}/{n}", file=sys.stderr, flush=True) if d % 200 == 0 else None)
    WORK.mkdir(parents=True, exist_ok=True)
    meta = [{"set": name, "label": it.label, "cwe": it.meta.get("cwe"), "subtype": it.meta.get("subtype"),
             "language": it.meta.get("language")} for name, it in data]
    torch.save({"acts": pooled[sae.hook_point].half(), "meta": meta}, WORK / "pooled.pt")


def _auc(acts, meta, select):
    idx = [i for i, m in enumerate(meta) if select(m)]
    labels = torch.tensor([meta[i]["label"] for i in idx])
    if labels.sum() == 0 or labels.sum() == len(labels):
        return None
    return auroc(acts[idx].float(), labels)


def rank(top=8):
    saved = torch.load(WORK / "pooled.pt")
    acts, meta = saved["acts"].float(), saved["meta"]
    concepts = {
        "unsafe_code": [("sven", lambda m: m["set"] == "sven"), ("juliet", lambda m: m["set"] == "juliet")],
        "sycophancy": [("political", lambda m: m["set"] == "political"), ("truthfulqa", lambda m: m["set"] == "truthfulqa")],
        "backdoor": [("backdoor_juliet", lambda m: m["set"] == "backdoor_juliet"), ("backdoor_prose", lambda m: m["set"] == "backdoor_prose")],
        "shell_injection": [("sven_cwe78", lambda m: m["set"] == "sven" and m["cwe"] == "CWE-078"),
                            ("juliet_cwe78", lambda m: m["set"] == "juliet" and m["cwe"] == "CWE-78")],
        # single source: every SQL-injection pair in the dev data is SVEN Python
        "sql_injection": [("sven_cwe89", lambda m: m["set"] == "sven" and m["cwe"] == "CWE-089")],
        "hardcoded_credentials": [("bd_password", lambda m: m["set"] == "backdoor_juliet" and m["subtype"] in ("hard_coded_password", "hard_coded_crypto_key"))],
        "trapdoor_timebomb": [("bd_trap", lambda m: m["set"] == "backdoor_juliet" and m["subtype"] in ("trapdoor", "logic_time_bomb"))],
    }
    report = {}
    for concept, sources in concepts.items():
        aucs = [a for a in (_auc(acts, meta, sel) for _, sel in sources) if a is not None]
        if not aucs:
            continue
        worst = torch.stack(aucs).min(0).values
        best = torch.topk(worst, top)
        report[concept] = [{"latent": int(l), "min_auroc": round(float(v), 3),
                            **{name: round(float(a[l]), 3) for (name, _), a in zip(sources, aucs)}}
                           for v, l in zip(best.values, best.indices)]
        print(concept, json.dumps(report[concept][:5]))
    (WORK / "rank.json").write_text(json.dumps(report, indent=2))


def contexts(latents, n_docs=250, per=5):
    from monitor.capture import capture
    from monitor.data import render
    from monitor.models import load_default_model
    import gzip

    model, tokenizer = load_default_model()
    model = model.to(torch.bfloat16)
    sae = load_sae("default")
    enc = sae.subset_encoder(latents)
    best = {l: [] for l in latents}
    maxes = torch.zeros(len(latents))
    texts = []
    with gzip.open(SHARED / "corpus" / "corpus.jsonl.gz", "rt") as handle:
        for i, line in enumerate(handle):
            if i % 50 != 0 and len(texts) < n_docs and i % 7 == 3:
                texts.append(render(json.loads(line), tokenizer))
    dev = [it.text for _, it in items(tokenizer)][::8]
    for text in texts + dev:
        ids = tokenizer(text, return_tensors="pt", truncation=True, max_length=256)["input_ids"]
        resid = capture(model, ids, sae.hook_point)[0].float()
        a = enc(resid)
        a[0] = 0
        a[~sae.input_mask(resid)] = 0
        maxes = torch.maximum(maxes, a.max(0).values)
        for j, l in enumerate(latents):
            pos = int(a[:, j].argmax())
            val = float(a[pos, j])
            if val > 0:
                lo = max(0, pos - 12)
                ctx = tokenizer.decode(ids[0, lo:pos]) + "[[" + tokenizer.decode(ids[0, pos:pos + 1]) + "]]" + tokenizer.decode(ids[0, pos + 1:pos + 4])
                best[l].append((val, ctx))
    out = {}
    for j, l in enumerate(latents):
        top = sorted(best[l], reverse=True)[:per]
        out[l] = {"max_activation": float(maxes[j]), "contexts": top}
        print(f"\n=== latent {l} max {float(maxes[j]):.2f}")
        for v, c in top:
            print(f"  {v:6.2f}  {c!r}")
    WORK.mkdir(parents=True, exist_ok=True)
    (WORK / f"contexts_{'_'.join(map(str, latents))[:60]}.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("step", choices=["pool", "rank", "contexts"])
    parser.add_argument("latents", nargs="*", type=int)
    args = parser.parse_args()
    torch.set_num_threads(2)
    {"pool": pool, "rank": rank}.get(args.step, lambda: contexts(args.latents))()
