"""The work behind ``/v1/chat/completions``: prompt preparation, monitored generation, streaming.

Everything here that costs CPU (the chat template, tokenization, generation) runs in worker
threads; the event loop only moves bytes. Token usage is counted the same way for plain and
streamed completions: the number of tokens the model generated for the request
(:class:`GenerationControl` counts sampling steps), including those a block then withheld.
A stream whose client goes away is cancelled: the generation loop checks a flag each step and
ends the generation with the model's end-of-sequence token, so the request finishes normally
(its report still reaches metrics, logs and the audit trail) and frees its slot at once.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import anyio
import structlog
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from monitor.data import token_ids
from monitor.logs import ReportLogger
from monitor.metrics import MonitorMetrics
from monitor.serve.limits import ServeLimits
from monitor.serve.schema import APIError, ChatCompletionRequest
from monitor.errors import Blocked, MonitorUnavailable
from monitor.report import Report
from monitor.runtime.hf import Monitor

_log = structlog.get_logger("sae_monitor")


class AuditUnavailable(MonitorUnavailable):
    """A decision could not be written to the audit trail; the request is refused (fail closed)."""


def audited(trail: Callable[[Report], None]) -> Callable[[Report], None]:
    """A monitor callback running ``trail`` that turns a failed write into :class:`AuditUnavailable`.

    It must run first among the callbacks: when it raises, the rest (metrics, logs) do not run,
    and the service counts and logs the refusal itself.
    """

    def write(report: Report) -> None:
        try:
            trail(report)
        except OSError as exc:
            raise AuditUnavailable(f"the audit trail could not be written: {exc}", report) from exc

    return write


class GenerationControl(LogitsProcessor):
    """Counts generated tokens and cancels a generation, checked once per generation step.

    Passed as ``logits_processor``: called once for each sampled token. After :meth:`cancel`,
    the next step can only choose an end-of-sequence token (``stop_ids``), so ``generate``
    stops the normal way; without one it raises :class:`GenerationCancelled`.
    """

    def __init__(self, stop_ids: list[int]) -> None:
        self.count = 0
        self.stop_ids = stop_ids
        self.cancelled = threading.Event()

    def cancel(self) -> None:
        self.cancelled.set()

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.count += 1
        if not self.cancelled.is_set():
            return scores
        if not self.stop_ids:
            raise GenerationCancelled("the client went away")
        forced = torch.full_like(scores, float("-inf"))
        forced[:, self.stop_ids[0]] = 0.0
        return forced  # type: ignore[return-value]


class GenerationCancelled(Exception):
    """Generation stopped because its client went away (models without an EOS token)."""


@dataclass
class Completion:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    report: Report | None


@dataclass
class Prepared:
    ids: torch.Tensor
    gen: dict[str, Any]
    messages: list[dict[str, str]]


class ChatService:
    """Translates OpenAI requests into monitored generation (the work behind the routes)."""

    def __init__(self, monitor: Monitor, *, logger: ReportLogger, metrics: MonitorMetrics,
                 limits: ServeLimits) -> None:
        self.monitor = monitor
        self.tokenizer = monitor.tokenizer
        self.logger = logger
        self.metrics = metrics
        self.limits = limits
        self.limiter = anyio.CapacityLimiter(limits.max_concurrent)
        config = getattr(monitor.model, "config", None)
        self.context_length = (getattr(config, "max_position_embeddings", None)
                               or getattr(config, "n_positions", None))
        generation_eos = _ids(getattr(getattr(monitor.model, "generation_config", None), "eos_token_id", None))
        self.stop_ids = generation_eos  # what generate() itself stops on
        self.eos_ids = set(generation_eos) | set(_ids(self.tokenizer.eos_token_id))
        self.pad_id = (self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None
                       else next(iter(sorted(self.eos_ids)), 0))

    # ------------------------------------------------------------------ preparation
    def prepare(self, req: ChatCompletionRequest) -> Prepared:
        """Blocking (run in a worker thread): validate what pydantic cannot, apply the chat
        template, check the prompt against the limits."""
        if req.n != 1:
            raise APIError(400, "only n=1 is supported", param="n")
        for name in ("stop", "tools", "logprobs"):
            if getattr(req, name):
                raise APIError(400, f"'{name}' is not supported by this server", param=name)
        max_new = req.max_completion_tokens or req.max_tokens or self.limits.default_max_tokens
        if max_new > self.limits.max_tokens_limit:
            raise APIError(400, f"max_tokens must be at most {self.limits.max_tokens_limit}, got "
                           f"{max_new}", param="max_tokens")
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in req.messages]
        try:
            ids = token_ids(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                             tokenize=True))
        except Exception as exc:  # noqa: BLE001 - a template may reject a conversation shape
            # the exception text may quote the conversation: log its type only
            _log.warning("chat_template_rejected", error_type=type(exc).__name__)
            raise APIError(400, "the chat template rejected these messages; check the roles and "
                           "their order", param="messages") from None
        limit = self.limits.max_prompt_tokens
        if limit is not None and len(ids) > limit:
            raise APIError(400, f"the prompt has {len(ids)} tokens; this server accepts at most "
                           f"{limit}", param="messages", code="prompt_too_long")
        if self.context_length and len(ids) + max_new > self.context_length:
            raise APIError(400, f"the prompt ({len(ids)} tokens) plus max_tokens ({max_new}) exceeds "
                           f"the model's context length of {self.context_length} tokens",
                           param="messages", code="context_length_exceeded")
        gen: dict[str, Any] = {"max_new_tokens": max_new}
        if req.temperature == 0:
            gen["do_sample"] = False
        elif req.temperature is not None or req.top_p is not None:
            gen["do_sample"] = True
            if req.temperature is not None:
                gen["temperature"] = req.temperature
            if req.top_p is not None:
                gen["top_p"] = req.top_p
        return Prepared(torch.tensor([ids], dtype=torch.long), gen, messages)

    def control(self) -> GenerationControl:
        return GenerationControl(self.stop_ids)

    # ------------------------------------------------------------------ plain
    def complete(self, prepared: Prepared, control: GenerationControl) -> Completion:
        """Blocking: one monitored generate (run in a worker thread)."""
        ids, gen = prepared.ids, prepared.gen
        prompt_len = ids.shape[1]
        try:
            out = self.monitor.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                        pad_token_id=self.pad_id,
                                        logits_processor=LogitsProcessorList([control]), **gen)
            report = self.monitor.last_report
        except Blocked as exc:
            out, report = None, exc.report
        if report is not None and 0 in report.blocks:
            return Completion(report.blocks[0].message, "content_filter", prompt_len, control.count, report)
        assert out is not None
        new = out[0, prompt_len:].tolist()  # one row: never padded
        text = self.tokenizer.decode(new, skip_special_tokens=True)
        stopped = bool(new) and new[-1] in self.eos_ids
        finish = "length" if len(new) >= gen["max_new_tokens"] and not stopped else "stop"
        return Completion(text, finish, prompt_len, control.count, report)

    # ------------------------------------------------------------------ streaming
    def stream_worker(self, prepared: Prepared, control: GenerationControl,
                      emit: Callable[[str, Any], None]) -> None:
        """Blocking: iterate ``Monitor.stream``, emitting ("chunk", text) then ("done", report)
        or ("error", exception). Runs in one worker thread (the report is thread-local)."""
        try:
            report: Report | None = None
            try:
                for chunk in self.monitor.stream(prepared.ids, logits_processor=LogitsProcessorList([control]),
                                                 **prepared.gen):
                    emit("chunk", chunk)
                report = self.monitor.last_report
            except Blocked as exc:  # block_behavior="raise": the message was not yielded
                report = exc.report
                emit("chunk", report.blocks[0].message)
            emit("done", report)
        except GenerationCancelled:
            pass  # the client is gone; logged by the caller
        except BaseException as exc:  # noqa: BLE001 - forwarded to the event loop
            emit("error", exc)

    # ------------------------------------------------------------------ failures
    def refused_for_audit(self, exc: AuditUnavailable, completion_id: str) -> APIError:
        """Count and log a decision that could not be audited; the 503 to answer with."""
        self.metrics.requests.labels(outcome="error").inc()
        _log.error("audit_write_failed", completion_id=completion_id, error=str(exc.__cause__ or exc),
                   rules=sorted({b.rule_id for b in exc.report.blocks.values()}
                                | {d.rule_id for d in exc.report.steers}))
        return APIError(503, "the decision for this request could not be written to the audit log, "
                        "so the request is refused; try again later", type="server_error",
                        code="audit_unavailable")


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(i) for i in value]
