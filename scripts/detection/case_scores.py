"""Score policy-test candidates with the scope_mean probes, to choose cases that test them.

    python scripts/detection/case_scores.py CASES.yaml [policies/*.tests.yaml ...] [--min-tokens 8]

Every case (``messages``, ``text`` or ``prompt`` + ``response``, as in ``*.tests.yaml``) is
scanned with ``Monitor.scan`` (the default model, float32) on a diagnostic shadow policy that reads
the ``<category>.final`` probes of scripts/detection/scope_mean_engine.py's catalog as
``scope_mean`` over the response; printed per case: the highest running scope mean from the
``min_tokens``-th token on (what a rule compares with its threshold), per category.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1]))

from scope_mean_engine import OUT, shadow_rule  # noqa: E402

from monitor.catalog import load_catalog  # noqa: E402
from monitor.policy import PolicySet, compile_policies  # noqa: E402

CATS = ("unsafe_code", "backdoor", "sycophancy")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("files", nargs="+")
    ap.add_argument("--min-tokens", type=int, default=8)
    args = ap.parse_args()
    from monitor.models import load_default_model
    from monitor.runtime.hf import Monitor
    from monitor.sae import load_sae

    catalog = load_catalog(OUT / "catalog.yaml")
    rules = [shadow_rule(f"{c}.diag", f"{c}.final", -1e9, args.min_tokens) for c in CATS]
    policy = compile_policies(PolicySet.from_rules(rules), catalog, d_sae=8192)
    model, tokenizer = load_default_model()
    mon = Monitor(model, tokenizer, sae=load_sae("default"), policies=policy, catalog=catalog, self_test=False)
    out = []
    for path in args.files:
        for case in yaml.safe_load(Path(path).read_text())["cases"]:
            if "messages" in case:
                report = mon.scan(case["messages"])
            elif "text" in case:
                report = mon.scan(case["text"])
            else:
                report = mon.scan(case["response"], prompt=case.get("prompt"))
            best = {c: max((h.activation for h in report.hits if h.rule_id == f"{c}.diag"), default=None)
                    for c in CATS}
            out.append({"file": path, "name": case["name"], **best})
            print(json.dumps(out[-1]), flush=True)
    (OUT / "case_scores.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
