"""One request's monitoring state inside a vLLM worker (third stage: the pure policy engine).

A :class:`RequestTracker` receives the encoded feature columns of each span of its request
(see :mod:`monitor.runtime.vllm.batch`), steps the policy engine for that request, and keeps
what the front end needs to build the request's report: hits, the block (rule, message,
token), steering directives, per-scope peaks and token counts. It never touches the model:
it returns the steering directives to apply at the span's last row, and the worker applies
them. It follows the transformers adapter (``monitor.wrapper``) rule for rule, so that the
two engines give the same report for the same tokens:

* masked tokens (special tokens, position 0, positions the SAE cannot read) count in
  ``token_index`` but never fire and never count as monitored;
* a block stops the request: later spans are ignored and the worker forces it to end;
* steering in force is applied at the last position of a span, but inside the prompt only at
  the prompt's last token (so chunked prefill steers exactly where a whole-prompt prefill
  does); every applied edit is recorded by position so a recomputation (preemption) applies
  it again.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal

import torch

from monitor.policy import CompiledPolicy, Hit, SteerDirective
from monitor.runtime.vllm.batch import Span

OnError = Literal["open", "closed"]


@dataclass(frozen=True)
class BlockRecord:
    """The first block of a request: rule, message, scope and the scope's token index."""

    rule_id: str
    message: str
    scope: str
    token_index: int


@dataclass
class Summary:
    """What a worker hands back for one finished request (picklable, no tensors)."""

    req_id: str
    policy_version: str
    features: tuple[str, ...]
    hits: list[Hit] = field(default_factory=list)
    block: BlockRecord | None = None
    steers: list[SteerDirective] = field(default_factory=list)
    steered: bool = False
    peaks: dict[str, list[float]] = field(default_factory=dict)
    tokens_monitored: dict[str, int] = field(default_factory=lambda: {"prompt": 0, "response": 0})
    monitored_upto: int = 0
    error: str | None = None
    failed_open: bool = False
    refused: bool = False
    monitor_seconds: float = 0.0


class RequestTracker:
    """Per-request engine state and report; see the module docstring."""

    def __init__(self, req_id: str, policy: CompiledPolicy, prompt_len: int, on_error: OnError) -> None:
        self.policy = policy
        self.prompt_len = prompt_len
        self.on_error = on_error
        self.state = policy.new_state(1)
        self.summary = Summary(req_id, policy.version_id, tuple(f.label for f in policy.features))
        self.edits: dict[int, list[SteerDirective]] = {}  # position -> directives applied there
        self._peaks: dict[str, torch.Tensor] = {}

    @property
    def stopped(self) -> bool:
        """True once the request must end: blocked, or refused after a monitoring fault."""
        return self.summary.block is not None or self.summary.refused

    @property
    def active(self) -> bool:
        """False when nothing more is monitored (stopped, or failed open)."""
        return not (self.stopped or self.summary.failed_open)

    def step(self, span: Span, feats: torch.Tensor, mask: torch.Tensor) -> list[SteerDirective]:
        """Step the engine over ``feats[T, F]`` / ``mask[T]`` of ``span``; return the steering
        directives to apply at the span's last row (row index 0 = this request)."""
        summary = self.summary
        summary.monitored_upto = max(summary.monitored_upto, span.position + span.length)
        if not self.active:
            return []
        started = time.perf_counter()
        try:
            return self._step(span, feats, mask)
        except Exception as exc:  # noqa: BLE001 - every monitoring fault goes through on_error
            self.fail(exc)
            return []
        finally:
            summary.monitor_seconds += time.perf_counter() - started

    def _step(self, span: Span, feats: torch.Tensor, mask: torch.Tensor) -> list[SteerDirective]:
        summary = self.summary
        if not bool(torch.isfinite(feats).all()):
            raise FloatingPointError("non-finite SAE activation")
        if self.state.device != feats.device:
            self.state = self.policy.new_state(1, feats.device)
        scope = span.scope
        summary.tokens_monitored[scope] += int(mask.sum())
        peak = feats.float().masked_fill(~mask[:, None], float("-inf")).amax(dim=0)
        previous = self._peaks.get(scope)
        self._peaks[scope] = peak if previous is None else torch.maximum(previous, peak)
        result = self.policy.step(self.state, feats[None], mask[None], scope)
        for hit in result.hits:
            summary.hits.append(hit)
            if hit.mode == "enforce" and "steer" in hit.actions:
                summary.steered = True
        if result.block_messages and summary.block is None:
            rule_id, message = result.block_messages[0]
            first = next(h for h in result.hits if h.rule_id == rule_id and "block" in h.actions)
            summary.block = BlockRecord(rule_id, message, scope, first.token_index)
            return []
        if not result.steer:
            return []
        seen = {(d.rule_id, d.latent, d.probe) for d in summary.steers}
        summary.steers.extend(d for d in result.steer if (d.rule_id, d.latent, d.probe) not in seen)
        if scope == "prompt" and not span.ends_prompt:
            return []  # a whole-prompt prefill steers only at the prompt's last token
        last = span.position + span.length - 1
        self.edits[last] = list(result.steer)
        return list(result.steer)

    def replay(self, position: int) -> list[SteerDirective]:
        """The directives applied at ``position`` when it was first computed (or none)."""
        return self.edits.get(position, [])

    def fail(self, exc: BaseException) -> None:
        """Record a monitoring fault: fail open (stop monitoring) or closed (stop the request)."""
        self.summary.error = f"{type(exc).__name__}: {exc}"
        if self.on_error == "open":
            self.summary.failed_open = True
        else:
            self.summary.refused = True

    def finish(self) -> Summary:
        """The request's summary, peaks as plain floats (``-inf`` where nothing was monitored)."""
        self.summary.peaks = {scope: [float(v) for v in peak.tolist()] for scope, peak in self._peaks.items()}
        return self.summary
