"""Linear probes for the default catalog: fit on one dev source, measured on another.

    python scripts/build_default_probes.py     # writes runs/catalog/probes.json and the probes file

Each shipped probe is the one fitted on the `fit` source, so its transfer AUROC on the `test`
source is a measurement on data it never saw.
"""
import json
import random
import sys
from pathlib import Path

import torch

from monitor.data import read_jsonl
from monitor.discover import labeled_item
from monitor.models import load_default_model
from monitor.probes import fit_probe, probe_scores, save_probe
from monitor.sae import load_sae
from monitor.stats import auroc

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
OUT = ROOT / "monitor" / "saes" / "default" / "catalog.probes.safetensors"
PLAN = {  # name: (fit file, test file)
    "unsafe_code": ("unsafe_code/sven_pairs.jsonl", "unsafe_code/juliet_c_pairs.jsonl"),
    "backdoor": ("backdoor/juliet_c_pairs.jsonl", ROOT / "datasets/devsets/backdoor_prose.jsonl"),
    "sycophancy": ("sycophancy/truthfulqa_constructed_pairs.jsonl", "sycophancy/anthropic_political_pairs.jsonl"),
}
N = 240


def sample(path, tokenizer):
    rows = list(read_jsonl(path if isinstance(path, Path) else SHARED / path))
    random.Random(5).shuffle(rows)
    pos = [r for r in rows if r["label"] == 1][:N // 2]
    neg = [r for r in rows if r["label"] == 0][:N // 2]
    return [labeled_item(r, tokenizer) for r in pos + neg]


def main():
    torch.set_num_threads(2)
    model, tokenizer = load_default_model()
    model = model.to(torch.bfloat16)
    point = load_sae("default").hook_point
    report = {}
    for name, (fit_file, test_file) in PLAN.items():
        fit_items, test_items = sample(fit_file, tokenizer), sample(test_file, tokenizer)
        probe = fit_probe(model, tokenizer, fit_items, point, l2=1e-2)
        scores = probe_scores(model, tokenizer, test_items, point, probe.weight, probe.bias)
        labels = torch.tensor([it.label for it in test_items])
        train_scores = probe_scores(model, tokenizer, fit_items, point, probe.weight, probe.bias)
        key = f"{name}_probe"
        save_probe(OUT, key, probe.weight, probe.bias)
        report[name] = {"key": key, "fit": str(fit_file), "test": str(test_file), **probe.evidence,
                        "transfer_auroc": round(float(auroc(scores, labels)), 3),
                        "max_score_fit_set": round(float(train_scores.max()), 3),
                        "score_q99_fit_negatives": round(float(torch.quantile(train_scores[torch.tensor([it.label for it in fit_items]) == 0], 0.99)), 3)}
        print(name, report[name], file=sys.stderr, flush=True)
    (ROOT / "runs" / "catalog").mkdir(parents=True, exist_ok=True)
    (ROOT / "runs" / "catalog" / "probes.json").write_text(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
