#!/usr/bin/env python
"""What does monitoring cost on vLLM? Throughput with and without the monitor, in one run.

    python benchmarks/vllm_overhead.py                    # default model, shipped SAE and policies
    python benchmarks/vllm_overhead.py --tokens 32 --repeats 2 --json out.json

Run it with the vLLM environment (``tools/vllm-env.sh``). Three configurations, each at 1, 8
and 32 concurrent requests (greedy, ``--tokens`` new tokens at most, the same prompts):

* **vLLM** — a plain ``AsyncLLM`` (no worker extension, no hooks), ``enforce_eager`` and no
  prefix caching like the monitored engine, so the ratio isolates the monitor;
* **vLLM + monitor** — :class:`monitor.runtime.vllm.engine.VLLMMonitor` with the shipped
  policies (every token of prompt and response encoded and stepped; one extra decode step per
  request evaluates the last token);
* **transformers + monitor** — ``monitor.wrap(...).generate`` at batch 1, 8 and 32 (left
  padding), the path this adapter replaces.

Throughput is delivered response tokens per second of wall time for a *wave*: ``--requests``
requests (default ``max(16, 2 x concurrency)``, the prompts below in turn) driven as a closed
loop that keeps ``concurrency`` requests in flight, starting the next as one ends; so the wave
at one request is 16 requests one after the other, short and long answers alike, not one
8-token answer whose fixed costs (prefill, the report's round trip) would dominate. Both vLLM
engines are started, then driven in alternation (a plain wave, then a monitored wave of the
same prompts, ``--repeats`` times per concurrency; the best wave of each is kept), so both see
the same machine load and neither competes with the other for the CPU. Ratios are printed in
the same run; nothing is compared against numbers from another run.

Why ``--tokens`` matters: a monitored request runs one more decode step than a plain one (its
last token's activations exist only once that token is fed back; see
:mod:`monitor.runtime.vllm.engine`), so with ``n`` new tokens the ratio cannot exceed
``n / (n + 1)`` on a machine where a decode step's cost does not depend on the batch: 0.97 at
32 tokens, 0.99 at 128.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PROMPTS = [
    "What is the capital of France?", "Write a haiku about autumn.", "Explain what a hash map is.",
    "Give me three tips for better sleep.", "What does a compiler do?", "Describe the water cycle.",
    "Name three uses of copper.", "Why is the sky blue?",
]
CONCURRENCY = (1, 8, 32)


def wave(n: int) -> list[str]:
    return [PROMPTS[i % len(PROMPTS)] for i in range(n)]


def wave_size(concurrency: int, requests: int | None) -> int:
    return requests or max(16, 2 * concurrency)


async def closed_loop(prompts: list[str], concurrency: int, run_one: Any) -> list[Any]:
    """Run ``run_one(prompt)`` for every prompt with at most ``concurrency`` in flight."""
    gate = asyncio.Semaphore(concurrency)

    async def gated(prompt: str) -> Any:
        async with gate:
            return await run_one(prompt)

    return list(await asyncio.gather(*(gated(p) for p in prompts)))


def vllm_pair(model: str, tokens: int, repeats: int, max_model_len: int, requests: int | None
              ) -> tuple[dict[int, float], dict[int, float], dict[str, int], dict[str, float]]:
    """Plain and monitored vLLM, both started, driven in alternation: each repeat runs a plain
    wave then a monitored wave of the same prompts, so both see the same machine load."""
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    from monitor.runtime.vllm import MonitorConfig
    from monitor.runtime.vllm.engine import VLLMMonitor

    plain: dict[int, list[float]] = {}
    monitored: dict[int, list[float]] = {}
    outcomes: dict[str, int] = {}
    with VLLMMonitor(MonitorConfig(model=model, max_model_len=max_model_len, dtype="float32")) as mon:
        async def start_plain() -> AsyncLLM:
            return AsyncLLM.from_engine_args(AsyncEngineArgs(
                model=model, enforce_eager=True, enable_prefix_caching=False, max_model_len=max_model_len,
                dtype="float32"))

        engine = mon.submit_sync(start_plain())
        params = SamplingParams(temperature=0.0, max_tokens=tokens)

        async def one(prompt: str) -> int:
            n = 0
            async for out in engine.generate({"prompt_token_ids": mon.prompt_ids(prompt)}, params, uuid.uuid4().hex):
                n = len(out.outputs[0].token_ids)
            return n

        async def monitored_one(prompt: str) -> Any:
            return await mon.agenerate(prompt, max_tokens=tokens)

        try:
            mon.submit_sync(closed_loop(wave(2), 2, one))  # warm-up, both engines
            mon.generate(wave(2), max_tokens=tokens)
            for c in CONCURRENCY:
                prompts = wave(wave_size(c, requests))
                for _ in range(repeats):
                    started = time.perf_counter()
                    delivered = sum(mon.submit_sync(closed_loop(prompts, c, one)))
                    plain.setdefault(c, []).append(delivered / (time.perf_counter() - started))
                    started = time.perf_counter()
                    outs = mon.submit_sync(closed_loop(prompts, c, monitored_one))
                    monitored.setdefault(c, []).append(sum(len(o.token_ids) for o in outs)
                                                       / (time.perf_counter() - started))
                    for o in outs:
                        outcomes[o.report.outcome] = outcomes.get(o.report.outcome, 0) + 1
            status = mon.submit_sync(mon.engine.collective_rpc("sae_monitor_status"))[0]
        finally:
            engine.shutdown()
    return ({c: max(v) for c, v in plain.items()}, {c: max(v) for c, v in monitored.items()}, outcomes,
            {"worker_monitor_seconds": status["monitor_seconds"], "worker_steps": status["steps"]})


def delivered_tokens(new: Any, eos: int) -> int:
    """Response tokens up to and including each row's first end-of-sequence token (the rest is
    padding, which for this tokenizer is the same id)."""
    ended = (new == eos).int().cumsum(1)
    return int(((ended == 0) | ((ended == 1) & (new == eos))).sum())


def transformers_path(tokens: int, repeats: int, requests: int | None) -> dict[int, float]:
    """``monitor.wrap(...).generate`` over the same waves, ``concurrency`` prompts per batch
    (left padding), one batch after another."""
    import torch

    import monitor
    from monitor.data import token_ids

    model, tokenizer = monitor.load_default_model()
    tokenizer.padding_side = "left"
    mon = monitor.wrap(model, tokenizer)
    pad = tokenizer.pad_token_id
    results: dict[int, float] = {}

    def batch(prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [list(token_ids(tokenizer.apply_chat_template([{"role": "user", "content": p}],
                                                              add_generation_prompt=True, tokenize=True)))
                for p in prompts]
        width = max(len(r) for r in rows)
        return (torch.tensor([[pad] * (width - len(r)) + r for r in rows]),
                torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows]))

    try:
        warm, warm_mask = batch(wave(2))
        mon.generate(input_ids=warm, attention_mask=warm_mask, max_new_tokens=4, do_sample=False, pad_token_id=pad)
        for c in CONCURRENCY:
            prompts = wave(wave_size(c, requests))
            batches = [batch(prompts[i:i + c]) for i in range(0, len(prompts), c)]
            rates = []
            for _ in range(repeats):
                started = time.perf_counter()
                delivered = 0
                for ids, mask in batches:
                    out = mon.generate(input_ids=ids, attention_mask=mask, max_new_tokens=tokens,
                                       do_sample=False, pad_token_id=pad)
                    delivered += delivered_tokens(out[:, ids.shape[1]:], tokenizer.eos_token_id)
                rates.append(delivered / (time.perf_counter() - started))
            results[c] = max(rates)
    finally:
        mon.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per request (at most)")
    parser.add_argument("--repeats", type=int, default=2, help="waves per concurrency; the best is kept")
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument("--requests", type=int, default=None,
                        help="requests per wave (default: max(16, 2 x concurrency))")
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from monitor.models import default_model_cache_dir, load_default_model

    model = default_model_cache_dir()
    if not (model / "config.json").is_file():
        load_default_model()
    started = time.perf_counter()
    plain, monitored, outcomes, worker = vllm_pair(str(model), args.tokens, args.repeats, args.max_model_len, args.requests)
    print(f"vLLM tok/s by concurrency: {plain}", flush=True)  # each phase as it ends
    print(f"vLLM+monitor tok/s by concurrency: {monitored}; worker: {worker}", flush=True)
    hf = {} if args.skip_transformers else transformers_path(args.tokens, args.repeats, args.requests)
    print(f"vLLM overhead: default model, {args.tokens} new tokens per request at most, waves of "
          f"{[wave_size(c, args.requests) for c in CONCURRENCY]} requests, best of {args.repeats} waves, "
          f"CPU, enforce_eager, float32 (outcomes of monitored requests: {outcomes})")
    print(f"{'concurrent':>10} {'vLLM tok/s':>11} {'vLLM+mon tok/s':>15} {'mon/plain':>10} "
          f"{'HF+mon tok/s':>13} {'vLLM+mon/HF+mon':>16}")
    for c in CONCURRENCY:
        ratio_hf = f"{monitored[c] / hf[c]:16.2f}" if c in hf else f"{'-':>16}"
        hf_rate = f"{hf[c]:13.1f}" if c in hf else f"{'-':>13}"
        print(f"{c:>10} {plain[c]:11.1f} {monitored[c]:15.1f} {monitored[c] / plain[c]:10.3f} {hf_rate} {ratio_hf}")
    print(f"total wall time {time.perf_counter() - started:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"plain": plain, "monitored": monitored, "transformers": hf,
                                         "tokens": args.tokens, "outcomes": outcomes,
                                         "worker": worker}, indent=2))


if __name__ == "__main__":
    main()
