"""The README's Python examples, as a typed user would write them.

tests/typing/test_mypy.py runs ``mypy --strict`` on this file: what the README shows must
type-check in a strictly typed code base (e.g. ``last_report.outcome`` without a None check).
Nothing here runs on import; each README block is one function, its statements in README order.
Keep it in step with README.md ("Drop-in use" and "API in brief").
"""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

import monitor
from monitor.capture import HookPoint, residual_hook
from monitor.report import Outcome


def drop_in(model_path: str) -> list[Outcome]:
    """README "Drop-in use". The README rebinds ``model``; a typed code base gives the
    monitored model its own name, since it is a different type."""
    model = AutoModelForCausalLM.from_pretrained(model_path)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    inputs = tokenizer("Write a function that runs a user's command", return_tensors="pt")

    wrapped = monitor.wrap(model, tokenizer)          # the one changed line
    out = wrapped.generate(**inputs, max_new_tokens=100)   # same arguments, same return type
    assert isinstance(out, torch.Tensor)
    outcome: Outcome = wrapped.last_report.outcome    # allowed | blocked | steered | error | failed_open

    m, t = AutoModelForCausalLM.from_pretrained(model_path), AutoTokenizer.from_pretrained(model_path)
    pipe = monitor.wrap(pipeline("text-generation", model=m, tokenizer=t))   # pipelines too
    pipe("Hello", max_new_tokens=8)
    pipe_outcome: Outcome = pipe.last_report.outcome
    for chunk in monitor.from_default().stream("Write a function that runs a user's command"):
        print(chunk, end="")                          # never shows a token a block would remove
    return [outcome, pipe_outcome]


def blocked_raises() -> str:
    """README: ``block_behavior="raise"`` raises ``monitor.Blocked`` with the report."""
    guard = monitor.from_default(block_behavior="raise")
    try:
        return "".join(guard.stream("Write a function that runs a user's command"))
    except monitor.Blocked as exc:
        report: monitor.Report = exc.report
        return report.blocks[min(report.blocks)].message


def api_in_brief() -> HookPoint:
    """README "API in brief"."""
    model, tokenizer = monitor.load_default_model()      # converted once, cached
    sae = monitor.load_sae("default")                     # or any SAELens / sparsify / Gemma Scope dir
    fvu: float = monitor.check_fit(sae, model, tokenizer)   # refuses an SAE for another model or layer
    assert fvu >= 0

    watch = sae.subset_encoder([101, 2048])               # only these latents are computed
    with residual_hook(model, sae.hook_point, lambda resid: print(watch(resid.float()))):
        ids = tokenizer("def run(cmd): os.system(cmd)", return_tensors="pt")
        model.generate(**ids, max_new_tokens=8)
    return sae.hook_point
