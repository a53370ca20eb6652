"""Per rule: how many rows of datasets/benign.jsonl it fires on (shipped policies, scan_many),
and the top peaks of the features the enforce rules read (to set a threshold at the 1% budget).

    python scripts/detection/benign_rates.py
"""
import json
import torch
import monitor
from monitor.runtime.scan import ScanItem

rows = [json.loads(l) for l in open("datasets/benign.jsonl")]
items = [r["messages"] if r.get("messages") else ScanItem(r["text"]) for r in rows]
mon = monitor.from_default()
reports = mon.scan_many(items)
rules = {}
for rep in reports:
    for rid in {h.rule_id for h in rep.hits}:
        rules[rid] = rules.get(rid, 0) + 1
print(json.dumps({"n": len(rows), "fired": {k: v for k, v in sorted(rules.items())}}, indent=1))
feats = list(reports[0].features)
for name in ("unsafe_code.string_concat_query", "unsafe_code.shell_command", "unsafe_code.code_execution", "sycophancy.agrees_with_user", "backdoor.concealment"):
    if name in feats:
        j = feats.index(name)
        peaks = torch.tensor([max(float(r.peaks.get("response", torch.full((1, len(feats)), float("-inf")))[0, j]), float(r.peaks.get("prompt", torch.full((1, len(feats)), float("-inf")))[0, j])) for r in reports])
        q = torch.quantile(peaks[torch.isfinite(peaks)], torch.tensor([0.95, 0.99, 1.0]))
        print(name, "peak quantiles 95/99/100:", [round(float(x), 2) for x in q])
for name, scopes in (("unsafe_code.string_concat_query", ("response",)), ("backdoor.concealment", ("prompt", "response"))):
    j = feats.index(name)
    vals = []
    for r in reports:
        v = [float(r.peaks[s][0, j]) for s in scopes if s in r.peaks]
        vals.append(max(v) if v else float("-inf"))
    print(name, "top 6 peaks:", [round(x, 3) for x in sorted(vals, reverse=True)[:6]])
