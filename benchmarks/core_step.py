#!/usr/bin/env python
"""The monitoring core's own work per decode step, without the model: what a token costs.

    python benchmarks/core_step.py [--steps 300] [--repeats 3] [--threads 1] [--batch 1]

Builds the shipped SAE, catalog and policies, then feeds the transformers adapter's per-call
request (:class:`monitor.runtime.hf_request.HFRequest`, the same object the forward hook calls)
a 20-token prompt and ``--steps`` single-token decode steps of random residuals with the
model's scale, timing each ``on_residual`` call: mask building, the fused encode of every
watched latent and probe, the policy engine step over all rules, the release bookkeeping.
Prints p50 and p99 in milliseconds per step for each repeat. ``benchmarks/overhead.py``
measures the same work inside real generation, against unmonitored generation.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from monitor.catalog import load_catalog
    from monitor.policy import PolicyStore
    from monitor.runtime.encoder import FeatureEncoder
    from monitor.runtime.hf_request import HFRequest
    from monitor.runtime.session import Session
    from monitor.sae import load_sae
    from monitor.shipped import SHIPPED_CATALOG, shipped_policies_dir

    sae = load_sae("default")
    catalog = load_catalog(SHIPPED_CATALOG, d_sae=sae.cfg.d_sae)
    policy = PolicyStore(shipped_policies_dir(), catalog, sae.cfg.d_sae).current
    encoder = FeatureEncoder(sae, policy, catalog)
    print(f"shipped policies: {len(policy.rules)} rules, {encoder.n_columns} columns "
          f"(fused encode: {encoder.fused}); batch {args.batch}, {args.threads} thread(s)")
    d = sae.cfg.d_in
    for repeat in range(args.repeats):
        session = Session(policy, encoder, args.batch, on_error="closed")
        request = HFRequest(session, encoder, owner=None, special_ids=torch.tensor([0, 1, 2]),
                            include_special_tokens=False, attention_mask=None)
        g = torch.Generator().manual_seed(repeat)
        request.current_ids = torch.randint(3, 1000, (args.batch, 20), generator=g)
        request.on_residual(torch.randn(args.batch, 20, d, generator=g) * 3)
        times = []
        for _ in range(args.steps):
            resid = torch.randn(args.batch, 1, d, generator=g) * 3
            request.current_ids = torch.randint(3, 1000, (args.batch, 1), generator=g)
            started = time.perf_counter()
            request.on_residual(resid)
            times.append(time.perf_counter() - started)
        times.sort()
        print(f"repeat {repeat}: p50 {statistics.median(times) * 1e3:.3f} ms/step, "
              f"p99 {times[int(0.99 * (len(times) - 1))] * 1e3:.3f} ms/step")


if __name__ == "__main__":
    main()
