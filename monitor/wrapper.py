"""Monitored generation: the product in deployment code (``monitor.wrap``).

One changed line puts a model under policy::

    model = monitor.wrap(model, tokenizer, sae=sae, policies="policies/")
    out = model.generate(**inputs)            # same arguments, same return type
    model.last_report                         # what fired, what was blocked or steered

How a call flows (one way, per forward pass of ``generate``):

1. a forward hook on the SAE's block hands the residual ``[B, T, d]`` of the new positions to
   the call's :class:`_Request` (found through a context variable, so concurrent calls from
   several threads never mix);
2. the watched features are encoded (only the latents the policies read, plus probes);
3. the pure policy engine evaluates them (prompt scope at prefill, response scope after);
4. decisions become actions: a block marks the row stopped (a stopping criterion ends it on
   the next step and the output is cut before the token that fired); a steer edits the
   residual in place, ``residual += (target - a) * W_dec[latent]``, at the triggering position
   and, for ``rest_of_response``, at every later one. Edits are recorded per position, so a
   run without the KV cache (which recomputes old positions) applies exactly the same edits.

A response token's activations are known only when that token is fed back into the model, so
after ``generate`` returns, one extra forward pass evaluates the last generated token. Streaming
holds back each token until its own forward pass has been evaluated.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from monitor.data import token_ids
from monitor.capture import HookPoint, residual_hook
from monitor.catalog import Catalog
from monitor.errors import MonitorError
from monitor.policy import CompiledPolicy, Hit, PolicyStore, SteerDirective
from monitor.sae import SAE

OnError = Literal["open", "closed", "auto"]
Outcome = Literal["allowed", "blocked", "steered", "error", "failed_open"]


class Blocked(MonitorError):
    """Raised (with ``block_behavior="raise"``) when a policy blocks a request."""

    def __init__(self, message: str, report: Report) -> None:
        super().__init__(message)
        self.report = report


class MonitorUnavailable(MonitorError):
    """Monitoring failed and the monitor fails closed: the request is refused."""

    def __init__(self, message: str, report: Report) -> None:
        super().__init__(message)
        self.report = report


@dataclass(frozen=True)
class BlockInfo:
    row: int
    rule_id: str
    message: str
    scope: str
    token_index: int


@dataclass
class Report:
    """What happened during one monitored call (all rows of a batch)."""

    request_id: str
    policy_version: str
    hits: list[Hit] = field(default_factory=list)
    blocks: dict[int, BlockInfo] = field(default_factory=dict)
    steers: list[SteerDirective] = field(default_factory=list)
    row_outcomes: list[Outcome] = field(default_factory=list)
    error: str | None = None
    failed_open: bool = False
    tokens_monitored: dict[str, int] = field(default_factory=lambda: {"prompt": 0, "response": 0})
    monitor_seconds: float = 0.0
    total_seconds: float = 0.0
    features: tuple[str, ...] = ()
    peaks: dict[str, torch.Tensor] = field(default_factory=dict)

    def peak(self, feature: str, scope: str = "response", row: int = 0) -> float:
        """Highest activation of a watched feature over the monitored tokens of ``scope``
        (catalog name or ``latent:N``); 0.0 if no token of that scope was monitored."""
        if scope not in self.peaks:
            return 0.0
        return max(0.0, float(self.peaks[scope][row, self.features.index(feature)]))

    def peak_table(self, scope: str = "response", row: int = 0) -> dict[str, float]:
        """Every watched feature's peak in ``scope`` (see :meth:`peak`)."""
        return {name: self.peak(name, scope, row) for name in self.features}

    @property
    def outcome(self) -> Outcome:
        """The call's outcome: error > failed_open > blocked > steered > allowed."""
        if self.error and not self.failed_open:
            return "error"
        if self.failed_open:
            return "failed_open"
        if self.blocks:
            return "blocked"
        if self.steers or "steered" in self.row_outcomes:
            return "steered"
        return "allowed"


_current: contextvars.ContextVar[_Request | None] = contextvars.ContextVar("sae_monitor_request", default=None)


class _Request:
    """Per-call state. Lives in the calling thread; the hooks reach it via ``_current``."""

    def __init__(self, monitor: Monitor, policy: CompiledPolicy, batch: int, attention_mask: torch.Tensor | None,
                 prompt_ids: torch.Tensor | None, scan_prompt_len: int | None = None) -> None:
        self.monitor = monitor
        self.policy = policy
        self.state = policy.new_state(batch)
        self.encoder = monitor._encoder_for(policy)
        self.report = Report(request_id=uuid.uuid4().hex, policy_version=policy.version_id,
                             row_outcomes=["allowed"] * batch,
                             features=tuple(f.label for f in policy.features))
        self.batch = batch
        self.positions_done = 0
        self.prefill_done = False
        self.attention_mask = attention_mask
        self.prompt_ids = prompt_ids
        self.scan_prompt_len = scan_prompt_len
        self.stopped = torch.zeros(batch, dtype=torch.bool)
        self.block_position: dict[int, int] = {}  # row -> first response token index to drop
        self.disabled = False  # fail-open after an error
        self.refused = False  # fail-closed after an error
        self.current_ids: torch.Tensor | None = None
        self.position_edits: dict[int, list[SteerDirective]] = {}  # position -> edits applied
        self.first_real = None

    # ------------------------------------------------------------------ masks
    def _mask(self, ids: torch.Tensor | None, start: int, length: int) -> torch.Tensor:
        mask = torch.ones(self.batch, length, dtype=torch.bool)
        cols = torch.arange(start, start + length)
        if ids is not None and ids.shape[1] == length and not self.monitor.include_special_tokens:
            mask &= ~torch.isin(ids.cpu(), self.monitor._special_ids)
        if self.attention_mask is not None:
            am = self.attention_mask
            in_range = cols < am.shape[1]
            part = torch.ones(self.batch, length, dtype=torch.bool)
            part[:, in_range] = am[:, cols[in_range]].bool()
            mask &= part
        if not self.monitor.include_special_tokens:
            first = self._first_real_positions()
            mask &= cols[None, :] != first[:, None]
        return mask & ~self.stopped[:, None]

    def _first_real_positions(self) -> torch.Tensor:
        if self.first_real is None:
            if self.attention_mask is not None:
                self.first_real = self.attention_mask.long().argmax(dim=1)
            else:
                self.first_real = torch.zeros(self.batch, dtype=torch.long)
        return self.first_real

    # ------------------------------------------------------------------ the hook
    def on_residual(self, resid: torch.Tensor) -> None:
        if self.disabled:
            return
        T = resid.shape[1]
        if not self.prefill_done:
            start, new = 0, T
        else:
            start, new = self.positions_done + 1 - T, 1
        old = T - new
        started = time.perf_counter()
        try:
            if old > 0:  # no KV cache: positions recomputed, replay their recorded edits
                self._replay(resid, start, old)
            new_resid = resid[:, old:]
            ids = self.current_ids[:, -new:] if self.current_ids is not None else None
            if not self.prefill_done and self.scan_prompt_len is not None:
                self._evaluate(new_resid, ids, start, "prompt", upto=self.scan_prompt_len)
                self._evaluate(new_resid, ids, start, "response", frm=self.scan_prompt_len)
            else:
                scope = "prompt" if not self.prefill_done else "response"
                self._evaluate(new_resid, ids, start + old, scope)
        except Exception as exc:  # noqa: BLE001 - every monitoring fault is handled by on_error
            self._fail(exc)
        finally:
            self.prefill_done = True
            self.positions_done = start + T
            self.report.monitor_seconds += time.perf_counter() - started

    def _evaluate(self, resid: torch.Tensor, ids: torch.Tensor | None, start: int, scope: str,
                  upto: int | None = None, frm: int = 0) -> None:
        T = resid.shape[1]
        lo, hi = frm, (upto if upto is not None else T)
        if hi <= lo:
            return
        part = resid[:, lo:hi]
        feats = self.encoder(part)
        if not torch.isfinite(feats).all():
            raise FloatingPointError("non-finite SAE activation")
        mask = self._mask(ids[:, lo:hi] if ids is not None else None, start + lo, hi - lo).to(part.device)
        mask &= self.monitor.sae.input_mask(part)  # massive-activation positions carry no content
        if self.state.device != feats.device:  # first step: keep the engine state beside the model
            self.state = self.policy.new_state(self.batch, feats.device)
        self.report.tokens_monitored[scope] += int(mask.sum())
        peak = feats.float().masked_fill(~mask[..., None], float("-inf")).amax(dim=1)
        previous = self.report.peaks.get(scope)
        self.report.peaks[scope] = peak if previous is None else torch.maximum(previous, peak)
        result = self.policy.step(self.state, feats, mask, scope)  # type: ignore[arg-type]
        if result.hits:
            self.report.hits.extend(result.hits)
            for hit in result.hits:
                if hit.mode == "enforce" and self.report.row_outcomes[hit.row] == "allowed" and "steer" in hit.actions:
                    self.report.row_outcomes[hit.row] = "steered"
        for row, (rule_id, message) in result.block_messages.items():
            if row in self.report.blocks:
                continue
            first = next(h for h in result.hits if h.row == row and h.rule_id == rule_id and "block" in h.actions)
            self.report.blocks[row] = BlockInfo(row, rule_id, message, scope, first.token_index)
            self.report.row_outcomes[row] = "blocked"
            self.stopped[row] = True
            self.block_position[row] = first.token_index if scope == "response" else -1
        if result.steer:
            seen = {(d.row, d.rule_id, d.latent, d.probe) for d in self.report.steers}
            self.report.steers.extend(d for d in result.steer if (d.row, d.rule_id, d.latent, d.probe) not in seen)
            last = start + hi - 1
            edits = [d for d in result.steer if not bool(self.stopped[d.row])]
            if edits:
                self.position_edits[last] = edits
                self.monitor._apply_edits(resid[:, hi - 1:hi], edits)

    def _replay(self, resid: torch.Tensor, start: int, old: int) -> None:
        for pos in range(start, start + old):
            edits = self.position_edits.get(pos)
            if edits:
                self.monitor._apply_edits(resid[:, pos - start:pos - start + 1], edits)

    def _fail(self, exc: Exception) -> None:
        self.report.error = f"{type(exc).__name__}: {exc}"
        if self.monitor.resolved_on_error(self.policy) == "open":
            self.disabled = True
            self.report.failed_open = True
        else:
            self.refused = True
            self.stopped[:] = True

    # ------------------------------------------------------------------ stopping
    def should_stop(self) -> torch.Tensor:
        return self.stopped.clone()


class _StopRows:
    """A transformers StoppingCriteria that ends blocked rows (per-row bool tensor)."""

    def __init__(self, request: _Request) -> None:
        self.request = request

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        return self.request.should_stop().to(input_ids.device)


class Monitor:
    """A model under policy. Create with :func:`wrap` or :meth:`Monitor.from_default`.

    ``on_error``: ``open`` (continue unmonitored, report ``failed_open``), ``closed`` (refuse
    the request with :class:`MonitorUnavailable`) or ``auto`` (closed when any enforce rule is
    loaded, else open). ``block_behavior``: ``replace`` (the drop-in default: the row's
    response becomes the rule's message) or ``raise`` (:class:`Blocked` with the report).
    """

    def __init__(self, model: nn.Module, tokenizer: Any, *, sae: SAE, policies: PolicyStore | CompiledPolicy,
                 catalog: Catalog | None = None, on_error: OnError = "auto",
                 block_behavior: Literal["replace", "raise"] = "replace",
                 include_special_tokens: bool = False,
                 callbacks: Sequence[Callable[[Report], None]] = (), self_test: bool = True,
                 max_fvu: float = 0.6) -> None:
        from monitor.sae import check_fit

        self.model = model
        self.tokenizer = tokenizer
        self.sae = sae
        self.catalog = catalog
        self.on_error = on_error
        self.block_behavior = block_behavior
        self.include_special_tokens = include_special_tokens
        self.callbacks = list(callbacks)
        self._store = policies if isinstance(policies, PolicyStore) else None
        self._fixed = policies if isinstance(policies, CompiledPolicy) else None
        self.point: HookPoint = sae.hook_point
        sae.requires_grad_(False)
        if self_test:
            self.fit_fvu = check_fit(sae, model, tokenizer, point=self.point, max_fvu=max_fvu)
        special = list(getattr(tokenizer, "all_special_ids", []) or [])
        self._special_ids = torch.tensor(sorted(set(special)), dtype=torch.long)
        self._encoders: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
        self._local = threading.local()
        self._lock = threading.Lock()
        # The class's generate, not the instance attribute: wrapping a pipeline replaces the
        # instance's generate with ours.
        self._model_generate = functools.partial(type(model).generate, model)
        self._hook = residual_hook(model, self.point, self._on_residual)
        self._hook.__enter__()
        self._ids_hook = model.register_forward_pre_hook(self._on_forward, with_kwargs=True)

    # ------------------------------------------------------------------ plumbing
    @property
    def policy(self) -> CompiledPolicy:
        """The active compiled policy (swapped atomically by reloads)."""
        return self._store.current if self._store is not None else self._fixed  # type: ignore[return-value]

    @property
    def policy_store(self) -> PolicyStore | None:
        """The store behind :attr:`policy` when the monitor was built from files, else None."""
        return self._store

    def reload_policies(self):
        """Reload policy files; an invalid version is rejected and the last good one stays."""
        if self._store is None:
            raise MonitorError("this monitor was given a compiled policy, not files; nothing to reload")
        return self._store.reload()

    def resolved_on_error(self, policy: CompiledPolicy) -> Literal["open", "closed"]:
        if self.on_error != "auto":
            return self.on_error
        return "closed" if any(r.mode == "enforce" for r in policy.rules) else "open"

    def close(self) -> None:
        """Remove the hooks: the model is exactly as before."""
        self._hook.__exit__(None, None, None)
        self._ids_hook.remove()

    def _encoder_for(self, policy: CompiledPolicy) -> Callable[[torch.Tensor], torch.Tensor]:
        with self._lock:
            cached = self._encoders.get(policy.version_id)
            if cached is None:
                cached = self._build_encoder(policy)
                self._encoders = {policy.version_id: cached}
            return cached

    def _build_encoder(self, policy: CompiledPolicy) -> Callable[[torch.Tensor], torch.Tensor]:
        subset = self.sae.subset_encoder(policy.latent_indices)
        probes = policy.probe_names
        if probes:
            if self.catalog is None:
                raise MonitorError("policies use probes but no catalog was given")
            pairs = [self.catalog.probe(name) for name in probes]
            P = torch.stack([d.float() for d, _ in pairs], dim=1)
            b = torch.tensor([bias for _, bias in pairs])
        dtype = self.sae.W_enc.dtype

        def encode(resid: torch.Tensor) -> torch.Tensor:
            x = resid.to(dtype)
            latents = subset(x).float()
            if not probes:
                return latents
            return torch.cat([latents, x.float() @ P + b], dim=-1)

        return encode

    def _apply_edits(self, resid: torch.Tensor, edits: Sequence[SteerDirective]) -> None:
        """resid[:, pos] += (target - a) * direction for each edit, in place."""
        for d in edits:
            if d.latent is not None:
                x = resid[d.row].to(self.sae.W_enc.dtype)
                a = self.sae.encode_subset(x, [d.latent])[..., 0]
                direction = self.sae.W_dec[d.latent]
            else:
                assert self.catalog is not None and d.probe is not None
                vec, bias = self.catalog.probe(d.probe)
                direction = vec.float() / vec.float().norm().clamp_min(1e-8) ** 2
                a = resid[d.row].float() @ vec.float() + bias
            target = d.value if d.op == "clamp" else a * d.value
            delta = (target - a)[..., None] * direction.to(a.dtype)
            resid[d.row] += delta.to(resid.dtype)

    def _on_forward(self, _module: nn.Module, args: tuple, kwargs: dict) -> None:
        request = _current.get()
        if request is not None and request.monitor is self:
            ids = kwargs.get("input_ids", args[0] if args else None)
            request.current_ids = ids

    def _on_residual(self, resid: torch.Tensor) -> None:
        request = _current.get()
        if request is not None and request.monitor is self:
            request.on_residual(resid)

    # ------------------------------------------------------------------ public calls
    @property
    def last_report(self) -> Report | None:
        """The report of the last call made from this thread."""
        return getattr(self._local, "report", None)

    def _finish(self, request: _Request, started: float) -> Report:
        report = request.report
        report.total_seconds = time.perf_counter() - started
        self._local.report = report
        for callback in self.callbacks:
            callback(report)
        if request.refused:
            raise MonitorUnavailable(f"monitoring failed and the monitor fails closed: {report.error}", report)
        if report.blocks and self.block_behavior == "raise":
            first = report.blocks[min(report.blocks)]
            raise Blocked(first.message, report)
        return report

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """``model.generate`` under policy; same arguments, same return type."""
        started = time.perf_counter()
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None:
            raise MonitorError("monitored generate needs input_ids (positionally or as input_ids=)")
        request = _Request(self, self.policy, input_ids.shape[0], kwargs.get("attention_mask"), input_ids)
        from transformers import StoppingCriteriaList

        criteria = StoppingCriteriaList(list(kwargs.pop("stopping_criteria", None) or []))
        criteria.append(_StopRows(request))
        wants_dict = bool(kwargs.get("return_dict_in_generate",
                                     getattr(getattr(self.model, "generation_config", None), "return_dict_in_generate", False)))
        kwargs["return_dict_in_generate"] = True  # we need the KV cache to check the last token
        token = _current.set(request)
        try:
            with torch.no_grad():
                out = self._model_generate(*args, stopping_criteria=criteria, **kwargs)
                self._evaluate_last_token(request, out, kwargs.get("attention_mask"))
        finally:
            _current.reset(token)
        report = self._finish(request, started)
        out.sequences = self._cut(out.sequences, input_ids.shape[1], report, request)
        return out if wants_dict else out.sequences

    def _evaluate_last_token(self, request: _Request, out: Any, attention_mask: torch.Tensor | None) -> None:
        """Feed the final generated token once more (one cached decode step) so that its
        activations are checked too; generate itself never feeds it back."""
        sequences = out.sequences
        length = sequences.shape[1]
        if request.disabled or request.refused or length <= request.positions_done or bool(request.stopped.all()):
            return
        full_mask = None
        if attention_mask is not None:
            extra = torch.ones(attention_mask.shape[0], length - attention_mask.shape[1], dtype=attention_mask.dtype)
            full_mask = torch.cat([attention_mask, extra], dim=1)
            request.attention_mask = full_mask
        # transformers >= 5.3x names the output's KV cache `cache` (`past_key_values` warns)
        cache = getattr(out, "cache", None)
        if cache is None:
            cache = getattr(out, "past_key_values", None)
        if cache is not None and request.positions_done == length - 1:
            # transformers >= 5.3x calls the cache argument `cache`; older versions `past_key_values`
            name = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
            self.model(input_ids=sequences[:, -1:], attention_mask=full_mask, **{name: cache},
                       cache_position=torch.tensor([length - 1]), use_cache=True)
        else:  # no cache: a teacher-forced pass; recomputed positions replay their edits
            request.positions_done = length - 1
            self.model(input_ids=sequences, attention_mask=full_mask, use_cache=False)

    def stream(self, prompt: str | Sequence[dict[str, str]] | torch.Tensor, **kwargs: Any) -> Iterator[str]:
        """Yield the response text as it is generated, never a token a block would remove.

        Each token is held back until its own forward pass has been evaluated (one token of
        delay); when a rule blocks, the stream ends with the rule's message (or raises
        :class:`Blocked` with ``block_behavior="raise"``). Single prompt only.
        """
        import queue

        input_ids = self._prompt_ids(prompt)
        if input_ids.shape[0] != 1:
            raise MonitorError("stream() takes one prompt; use generate() for batches")
        events: queue.Queue = queue.Queue()
        request = _Request(self, self.policy, 1, None, input_ids)

        class _Streamer:
            def __init__(self) -> None:
                self.first = True

            def put(self, value: torch.Tensor) -> None:
                if self.first:  # generate() first puts the prompt
                    self.first = False
                    return
                events.put(("token", int(value.reshape(-1)[0])))

            def end(self) -> None:
                pass

        result: dict[str, Any] = {}

        def run() -> None:
            token = _current.set(request)
            try:
                with torch.no_grad():
                    from transformers import StoppingCriteriaList

                    out = self._model_generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                              streamer=_Streamer(), return_dict_in_generate=True,
                                              stopping_criteria=StoppingCriteriaList([_StopRows(request)]),
                                              pad_token_id=self.tokenizer.pad_token_id, **kwargs)
                    self._evaluate_last_token(request, out, None)
                result["out"] = out
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
                result["error"] = exc
            finally:
                _current.reset(token)
                events.put(("done", None))

        started = time.perf_counter()
        worker = threading.Thread(target=contextvars.copy_context().run, args=(run,), daemon=True)
        worker.start()
        generated: list[int] = []
        released_text = ""

        def safe_count() -> int:
            # tokens whose forward pass has run and that precede any block
            evaluated = request.state.tokens_seen("response")
            if 0 in request.block_position:
                return max(0, request.block_position[0])
            if 0 in request.report.blocks:  # blocked at the prompt
                return 0
            return min(evaluated, len(generated))

        def release(count: int, final: bool = False) -> str:
            nonlocal released_text
            text = self.tokenizer.decode(generated[:count], skip_special_tokens=True)
            if not final and "\ufffd" in text[len(released_text):]:  # maybe an unfinished character
                return ""
            chunk, released_text = text[len(released_text):], text
            return chunk

        while True:
            kind, value = events.get()
            if kind == "token":
                generated.append(value)
            chunk = release(safe_count()) if kind == "token" else ""
            if chunk:
                yield chunk
            if kind == "done":
                break
        worker.join()
        if "error" in result:
            raise result["error"]
        if request.report.blocks:
            request.stopped[0] = True
        report = self._finish(request, started)
        final = release(safe_count(), final=not report.blocks)
        if final:
            yield final
        if report.blocks:
            yield _block_text(report.blocks[0].message, after_text=bool(released_text))

    def scan(self, text: str | Sequence[dict[str, str]], *, prompt: str | None = None) -> Report:
        """Evaluate a finished transcript, teacher-forced, and return the same report.

        ``messages``: the last assistant turn is the response, everything before the prompt.
        A plain ``text`` is all response, unless ``prompt`` is given (prompt + text).
        """
        started = time.perf_counter()
        if isinstance(text, str):
            prompt_ids = self.tokenizer(prompt, add_special_tokens=True)["input_ids"] if prompt else []
            response_ids = self.tokenizer(text, add_special_tokens=not prompt)["input_ids"]
        else:
            messages = list(text)
            if messages and messages[-1].get("role") == "assistant":
                prompt_ids = self.tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=True)
                full = self.tokenizer.apply_chat_template(messages, tokenize=True)
                prompt_ids = list(token_ids(prompt_ids))
                response_ids = list(token_ids(full))[len(prompt_ids):]
            else:
                prompt_ids, response_ids = list(token_ids(self.tokenizer.apply_chat_template(messages, tokenize=True))), []
        ids = torch.tensor([list(prompt_ids) + list(response_ids)], dtype=torch.long)
        request = _Request(self, self.policy, 1, None, ids, scan_prompt_len=len(prompt_ids))
        token = _current.set(request)
        try:
            with torch.no_grad():
                self.model(input_ids=ids, use_cache=False)
        finally:
            _current.reset(token)
        return self._finish_scan(request, started)

    def _finish_scan(self, request: _Request, started: float) -> Report:
        saved = self.block_behavior
        self.block_behavior = "replace"  # a scan reports blocks, it never raises for them
        try:
            return self._finish(request, started)
        finally:
            self.block_behavior = saved

    def _prompt_ids(self, prompt: str | Sequence[dict[str, str]] | torch.Tensor) -> torch.Tensor:
        if isinstance(prompt, torch.Tensor):
            return prompt if prompt.dim() == 2 else prompt[None]
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        ids = self.tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=True)
        return torch.tensor([list(token_ids(ids))], dtype=torch.long)

    def _cut(self, sequences: torch.Tensor, prompt_len: int, report: Report, request: _Request) -> torch.Tensor:
        if not report.blocks and not request.refused:
            return sequences
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        rows = []
        for row in range(sequences.shape[0]):
            seq = sequences[row]
            if row in report.blocks:
                keep = max(0, request.block_position.get(row, -1))
                text = _block_text(report.blocks[row].message, after_text=keep > 0)
                message = torch.tensor(self.tokenizer(text, add_special_tokens=False)["input_ids"], dtype=seq.dtype)
                seq = torch.cat([seq[:prompt_len + keep] if keep else seq[:prompt_len], message])
            rows.append(seq)
        width = max(len(r) for r in rows)
        return torch.stack([torch.cat([r, torch.full((width - len(r),), pad, dtype=r.dtype)]) for r in rows])


def _block_text(message: str, *, after_text: bool) -> str:
    """The rule's message, on its own paragraph when part of the response was already given."""
    return "\n\n" + message if after_text else message



REPO_POLICIES = Path(__file__).resolve().parent.parent / "policies"
INSTALLED_POLICIES = Path(__file__).resolve().parent / "default_policies"
SHIPPED_CATALOG = Path(__file__).resolve().parent / "saes" / "default" / "catalog.yaml"


def shipped_policies_dir() -> Path:
    """The shipped policies: the wheel's copy (``monitor/default_policies``) when installed,
    else ``policies/`` of the source checkout (an editable install reads them there, so edits
    take effect). Raises :class:`MonitorError` naming both places when neither exists."""
    for candidate in (INSTALLED_POLICIES, REPO_POLICIES):
        if candidate.is_dir():
            return candidate
    raise MonitorError(
        f"the shipped policies were found neither at {INSTALLED_POLICIES} nor at {REPO_POLICIES}; "
        "reinstall sae-monitor, or pass policies=PATH to wrap()/from_default() (--policies on the CLI)"
    )


def _from_parts(model: nn.Module, tokenizer: Any, *, sae: SAE | str | Path = "default",
                policies: PolicyStore | CompiledPolicy | str | Path | Sequence[str | Path] | None = None,
                catalog: Catalog | str | Path | None = None, **options: Any) -> Monitor:
    from monitor.catalog import load_catalog
    from monitor.sae import load_sae

    sae_obj = sae if isinstance(sae, SAE) else load_sae(sae)
    if catalog is None and isinstance(sae, str) and sae == "default" and SHIPPED_CATALOG.is_file():
        catalog = SHIPPED_CATALOG
    cat = catalog if isinstance(catalog, Catalog) or catalog is None else load_catalog(catalog, d_sae=sae_obj.cfg.d_sae)
    if policies is None:
        policies = shipped_policies_dir()
    store = policies if isinstance(policies, (PolicyStore, CompiledPolicy)) else PolicyStore(policies, cat, sae_obj.cfg.d_sae)
    return Monitor(model, tokenizer, sae=sae_obj, policies=store, catalog=cat, **options)


def from_default(**options: Any) -> Monitor:
    """The embedded default model, the shipped SAE, its catalog and the shipped policies."""
    from monitor.models import load_default_model

    model, tokenizer = load_default_model()
    return _from_parts(model, tokenizer, **options)


Monitor.from_default = staticmethod(from_default)  # type: ignore[attr-defined]


class MonitoredPipeline:
    """A ``transformers`` text-generation pipeline whose model generates under policy.

    Calls go to the wrapped pipeline unchanged; its ``model.generate`` is the monitor's, so
    the pipeline's outputs keep their usual shape (blocked rows carry the rule's message).
    """

    def __init__(self, pipe: Any, monitor: Monitor) -> None:
        self.pipeline = pipe
        self.monitor = monitor
        pipe.model.generate = monitor.generate

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.pipeline(*args, **kwargs)

    @property
    def last_report(self) -> Report | None:
        return self.monitor.last_report

    def __getattr__(self, name: str) -> Any:
        return getattr(self.pipeline, name)


def wrap(model_or_pipeline: Any, tokenizer: Any = None, **options: Any) -> Monitor | MonitoredPipeline:
    """Put a model (with its tokenizer) or a text-generation pipeline under policy.

    Options: ``sae`` (an SAE, a path, or "default"), ``policies`` (files, a directory, a
    PolicyStore or a CompiledPolicy; default: the shipped policies), ``catalog``, and any
    :class:`Monitor` keyword (``on_error``, ``block_behavior``, ``callbacks``, ...).
    """
    if hasattr(model_or_pipeline, "model") and hasattr(model_or_pipeline, "tokenizer") and callable(model_or_pipeline):
        pipe = model_or_pipeline
        monitor = _from_parts(pipe.model, tokenizer or pipe.tokenizer, **options)
        return MonitoredPipeline(pipe, monitor)
    if tokenizer is None:
        raise MonitorError("wrap(model, tokenizer, ...) needs the tokenizer (or pass a pipeline)")
    return _from_parts(model_or_pipeline, tokenizer, **options)
