"""The Hugging Face ``transformers`` adapter: a model under policy (``monitor.wrap``).

One changed line puts a model under policy::

    model = monitor.wrap(model, tokenizer, sae=sae, policies="policies/")
    out = model.generate(**inputs)            # same arguments, same return type
    model.last_report                         # what fired, what was blocked or steered

The adapter only moves activations in and decisions out. A forward hook on the SAE's block
hands the residual of the new positions to the call's :class:`~monitor.runtime.hf_request.HFRequest`
(found through a context variable, so concurrent calls never mix), which feeds the call's
engine-agnostic :class:`~monitor.runtime.session.Session`. Decisions come back as values: a
block marks the row stopped (a stopping criterion ends it on the next step and the output is
cut before the token that fired); a steer edits the residual in place at the triggering
position and, for ``rest_of_response``, at every later one.

A response token's activations are known only when that token is fed back into the model, so
after ``generate`` returns one extra cached decode step evaluates the last generated token.
Streams (``stream()`` and a caller's ``streamer=``) hold each token back until its own forward
pass has been evaluated.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

import torch
from torch import nn

from monitor.capture import HookPoint, residual_hook
from monitor.catalog import Catalog
from monitor.data import token_ids
from monitor.errors import Blocked, MonitorError, MonitorUnavailable
from monitor.policy import CompiledPolicy, PolicyStore, ReloadResult
from monitor.report import Report
from monitor.runtime import generation
from monitor.runtime.encoder import FeatureEncoder
from monitor.runtime.hf_request import CURRENT, HFRequest
from monitor.runtime.scan import Scannable, scan_transcripts
from monitor.runtime.session import Session, resolve_on_error
from monitor.runtime.stream import stream_text
from monitor.sae import SAE

OnError = Literal["open", "closed", "auto"]
BlockBehavior = Literal["replace", "raise"]


class Monitor:
    """A model under policy. Create with :func:`monitor.wrap` or :meth:`Monitor.from_default`.

    ``on_error``: ``open`` (continue unmonitored, report ``failed_open``), ``closed`` (refuse
    the request with :class:`MonitorUnavailable`) or ``auto`` (closed when any enforce rule is
    loaded, else open). ``block_behavior``: ``replace`` (the drop-in default: the row's
    response becomes the rule's message) or ``raise`` (:class:`Blocked` with the report).
    """

    def __init__(self, model: nn.Module, tokenizer: Any, *, sae: SAE, policies: PolicyStore | CompiledPolicy,
                 catalog: Catalog | None = None, on_error: OnError = "auto",
                 block_behavior: BlockBehavior = "replace", include_special_tokens: bool = False,
                 callbacks: Sequence[Callable[[Report], Any]] = (), self_test: bool = True,
                 max_fvu: float = 0.6) -> None:
        from monitor.runtime.fit import check_fit

        self.model = model
        self.tokenizer = tokenizer
        self.sae = sae
        self.catalog = catalog
        self.on_error = on_error
        self.block_behavior = block_behavior
        self.include_special_tokens = include_special_tokens
        self.callbacks: list[Callable[[Report], Any]] = list(callbacks)
        self._store = policies if isinstance(policies, PolicyStore) else None
        self._fixed = policies if isinstance(policies, CompiledPolicy) else None
        self.point: HookPoint = sae.hook_point
        sae.requires_grad_(False)
        self.fit_fvu: float | None = None
        if self_test:
            self.fit_fvu = check_fit(sae, model, tokenizer, point=self.point, max_fvu=max_fvu)
        special = sorted(set(getattr(tokenizer, "all_special_ids", []) or []))
        self.special_ids = torch.tensor(special, dtype=torch.long)
        self._encoder: FeatureEncoder | None = None
        self._local = threading.local()
        self._lock = threading.Lock()
        # The class's generate, not the instance attribute: wrapping a pipeline replaces the
        # instance's generate with ours.
        generate: Callable[..., Any] = getattr(type(model), "generate")  # nn.Module declares no generate
        self._model_generate = functools.partial(generate, model)
        self._hook = residual_hook(model, self.point, self._on_residual)
        self._hook.__enter__()
        self._ids_hook = model.register_forward_pre_hook(self._on_forward, with_kwargs=True)

    from_default: Callable[..., Monitor]  # set by monitor.runtime.wrap

    # ------------------------------------------------------------------ policy and wiring
    @property
    def policy(self) -> CompiledPolicy:
        """The active compiled policy (swapped atomically by reloads)."""
        policy = self._store.current if self._store is not None else self._fixed
        assert policy is not None
        return policy

    @property
    def policy_store(self) -> PolicyStore | None:
        """The store behind :attr:`policy` when the monitor was built from files, else None."""
        return self._store

    def reload_policies(self) -> ReloadResult:
        """Reload policy files; an invalid version is rejected and the last good one stays."""
        if self._store is None:
            raise MonitorError("this monitor was given a compiled policy, not files; nothing to reload")
        return self._store.reload()

    def resolved_on_error(self, policy: CompiledPolicy) -> Literal["open", "closed"]:
        return resolve_on_error(self.on_error, policy)

    def encoder_for(self, policy: CompiledPolicy) -> FeatureEncoder:
        """The fused encoder of ``policy``'s columns, built once per policy version."""
        with self._lock:
            if self._encoder is None or self._encoder.version_id != policy.version_id:
                self._encoder = FeatureEncoder(self.sae, policy, self.catalog)
            return self._encoder

    def new_session(self, rows: int, policy: CompiledPolicy | None = None, *, scope_means: bool = False) -> Session:
        """A fresh :class:`Session` on the active policy (what every call starts with);
        ``scope_means``: also keep the per-feature sums behind ``Report.means`` (scans)."""
        policy = policy or self.policy
        return Session(policy, self.encoder_for(policy), rows, on_error=self.resolved_on_error(policy),
                       scope_means=scope_means)

    def close(self) -> None:
        """Remove the hooks: the model is exactly as before."""
        self._hook.__exit__(None, None, None)
        self._ids_hook.remove()

    @property
    def last_report(self) -> Report:
        """The report of the last call made from this thread.

        Raises :class:`MonitorError` before this thread's first call has finished: every
        call (``generate``, ``stream``, ``scan``, a pipeline call) sets it, so a typed caller
        reads ``last_report.outcome`` without a None check.
        """
        report: Report | None = getattr(self._local, "report", None)
        if report is None:
            raise MonitorError("last_report is read before any call of this monitor finished on this "
                               "thread; call generate(), stream() or scan() first")
        return report

    # ------------------------------------------------------------------ hooks
    def _request(self, rows: int, attention_mask: torch.Tensor | None) -> HFRequest:
        session = self.new_session(rows)
        return HFRequest(session, session.encoder, owner=self, special_ids=self.special_ids,
                         include_special_tokens=self.include_special_tokens, attention_mask=attention_mask)

    def _on_forward(self, _module: nn.Module, args: tuple, kwargs: dict) -> None:
        request = CURRENT.get()
        if request is not None and request.owner is self:
            request.current_ids = kwargs.get("input_ids", args[0] if args else None)

    def _on_residual(self, resid: torch.Tensor) -> None:
        request = CURRENT.get()
        if request is not None and request.owner is self:
            request.on_residual(resid)

    def deliver(self, session: Session, started: float, *, raise_blocks: bool = True) -> Report:
        """Close a call: settle its report, run the callbacks (audit, metrics, logs), then
        refuse it if monitoring failed closed, or raise :class:`Blocked` when asked to."""
        report = session.finish(time.perf_counter() - started)
        self._local.report = report
        for callback in self.callbacks:
            callback(report)
        if session.refused:
            raise MonitorUnavailable(f"monitoring failed and the monitor fails closed: {report.error}", report)
        if raise_blocks and report.blocks and self.block_behavior == "raise":
            raise Blocked(report.blocks[min(report.blocks)].message, report)
        return report

    # ------------------------------------------------------------------ public calls
    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """``model.generate`` under policy; same arguments, same return type."""
        return generation.monitored_generate(self, args, kwargs)

    def stream(self, prompt: str | Sequence[dict[str, str]] | torch.Tensor, **kwargs: Any) -> Iterator[str]:
        """Yield the response text as it is generated, never a token a block would remove.

        Each token is held back until its own forward pass has been evaluated (one token of
        delay); when a rule blocks, the stream ends with the rule's message (or raises
        :class:`Blocked` with ``block_behavior="raise"``). Single prompt only.
        """
        input_ids = self._prompt_ids(prompt)
        if input_ids.shape[0] != 1:
            raise MonitorError("stream() takes one prompt; use generate() for batches")
        request = self._request(1, None)
        started = time.perf_counter()

        def run(streamer: Any) -> None:
            generation.run_generate(self, request, dict(
                input_ids=input_ids, attention_mask=torch.ones_like(input_ids), streamer=streamer,
                pad_token_id=self.tokenizer.pad_token_id, **kwargs))

        return stream_text(request, run, lambda: self.deliver(request.session, started),
                           lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True))

    def scan(self, text: str | Sequence[dict[str, str]], *, prompt: str | None = None) -> Report:
        """Evaluate a finished transcript, teacher-forced, and return the same report.

        ``messages``: the last assistant turn is the response, everything before the prompt.
        A plain ``text`` is all response, unless ``prompt`` is given (prompt + text). A block
        is reported, never raised; a monitor that fails closed raises
        :class:`MonitorUnavailable`.
        """
        from monitor.runtime.scan import ScanItem

        return self.scan_many([ScanItem(text, prompt)], batch_size=1, refuse=True)[0]

    def scan_many(self, items: Sequence[Scannable], *, batch_size: int = 16, max_batch_tokens: int = 1024,
                  progress: Callable[[int], Any] | None = None, refuse: bool = False,
                  dtype: str = "float32") -> list[Report]:
        """Scan many transcripts (strings, chat messages or :class:`ScanItem`), batched by
        length, the forward stopped after the SAE's layer; one report per item, in order,
        equal to scanning each alone. A failing item's report has ``error`` set (with
        ``refuse=True`` a fail-closed monitor raises instead). ``progress(n)`` is called
        after every batch with the number of items done in it. ``dtype="bfloat16"`` runs the
        forward under autocast (2-3x faster on CPUs with native bfloat16 and on GPUs; the SAE
        and probes still encode in float32, activations differ by bfloat16 rounding); any other
        value than ``float32`` / ``bfloat16`` raises :class:`~monitor.runtime.scan.DtypeError`."""
        return scan_transcripts(self, items, batch_size=batch_size, max_batch_tokens=max_batch_tokens,
                                progress=progress, refuse=refuse, dtype=dtype)

    def _prompt_ids(self, prompt: str | Sequence[dict[str, str]] | torch.Tensor) -> torch.Tensor:
        if isinstance(prompt, torch.Tensor):
            return prompt if prompt.dim() == 2 else prompt[None]
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        ids = self.tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=True)
        return torch.tensor([token_ids(ids)], dtype=torch.long)
