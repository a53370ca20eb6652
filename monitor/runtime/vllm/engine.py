"""Monitored generation on vLLM's async engine: the front end of the vLLM adapter.

:class:`VLLMMonitor` starts vLLM's ``AsyncLLM`` (continuous batching, paged KV cache) with the
monitor's worker extension, installs the SAE and policies in every worker, and runs requests:

* each request is sent with ``extra_args[EXTRA_ARGS_KEY]`` and ``max_tokens + 1``: a response
  token's activations exist only once it is fed back, so one extra decode step evaluates the
  last token the caller receives (the transformers path runs one extra forward for the same
  reason); the extra token is never returned;
* streamed text holds back the newest token: every older token has been evaluated, and a
  block would have ended the request in the step that evaluated it (the worker forces the stop
  token), so no token after the firing one is ever sent;
* when the request ends, the worker's report is collected: the same
  :class:`~monitor.report.Report` the transformers path gives, built by the same core
  :class:`~monitor.runtime.session.Session`; a blocked response is cut before the firing token
  and ends with the rule's message. Requests that end together share one ``collective_rpc``
  (each call is a round trip through the engine loop, between two forward steps: one per
  request would cost a wave of 32 requests 32 round trips).

Faults fail closed: an engine that dies mid-request raises :class:`EngineFailed` (counted in
``failures``), and every later call raises it at once instead of waiting.
"""

from __future__ import annotations

import asyncio
import pickle
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from monitor.errors import MonitorError
from monitor.runtime.vllm.extension import EXTENSION, encode_spec
from monitor.runtime.vllm.setup import EngineFailed, MonitorConfig, load_parts, require_vllm
from monitor.runtime.vllm.spec import EXTRA_ARGS_KEY
from monitor.errors import Blocked, MonitorUnavailable
from monitor.report import Report
from monitor.runtime.outputs import block_text

Prompt = str | Sequence[dict[str, str]] | Sequence[int]


@dataclass(frozen=True)
class Completion:
    """One monitored response: the tokens and text delivered, why it ended, and its report."""

    token_ids: tuple[int, ...]
    text: str
    finish_reason: Literal["stop", "length", "blocked"]
    report: Report
    kept: int  # how many of token_ids the model generated (the rest is a block message)
    prompt_token_ids: tuple[int, ...] = field(default=(), repr=False)


class VLLMMonitor:
    """A model served by vLLM under policy. ``generate`` (blocking) and ``agenerate`` /
    ``astream`` (async, for servers) share one engine; see the module docstring."""

    def __init__(self, config: MonitorConfig) -> None:
        require_vllm()
        self.config = config
        parts = load_parts(config)  # fails before the engine starts: bad SAE, policies, fit
        self.tokenizer = parts.tokenizer
        self.store = parts.store
        self.spec = parts.spec
        self.failures = 0
        self.requests = 0
        self.dead: str | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="sae-monitor-vllm", daemon=True)
        self._thread.start()
        try:
            self.engine = self._call(self._start(parts.engine_args))
            self._collector = ReportCollector(self.engine)
            versions = self._call(self._install())
        except BaseException:
            self.close()
            raise
        self.policy_version = versions[0]

    # ------------------------------------------------------------------ lifecycle
    async def _start(self, engine_args: dict[str, Any]) -> Any:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        args = AsyncEngineArgs(**engine_args, worker_extension_cls=EXTENSION)
        try:
            return AsyncLLM.from_engine_args(args)
        except Exception as exc:
            from monitor.errors import ModelLoadError

            raise ModelLoadError(f"vLLM could not load the model {engine_args.get('model')!r}: "
                                 f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}. "
                                 "Check that the directory holds a model architecture vLLM supports "
                                 "(config.json + weights), or serve it with --engine transformers") from None

    async def _install(self) -> list[str]:
        try:
            results = await self.engine.collective_rpc("sae_monitor_install", args=(encode_spec(self.spec),))
        except Exception as exc:
            raise MonitorError(f"installing the monitor in the vLLM workers failed: {_reason(exc)}") from None
        versions = sorted({r["policy_version"] for r in results})
        if len(versions) != 1:
            raise MonitorError(f"vLLM workers loaded different policy versions {versions}; check that every "
                               "node reads the same policy files")
        return versions

    def close(self) -> None:
        """Shut the engine down and stop the event-loop thread."""
        engine = getattr(self, "engine", None)
        if engine is not None:
            try:
                engine.shutdown()
            except Exception:  # noqa: BLE001 - best effort on the way out
                pass
            self.engine = None
        if self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)

    def __enter__(self) -> VLLMMonitor:
        return self

    def __exit__(self, *_exc: Any) -> None:
        self.close()

    def _call(self, coro: Any, timeout: float | None = None) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def submit_sync(self, coro: Any) -> Any:
        """Run a coroutine of this monitor on its loop from any thread and wait for it."""
        return self._call(coro)

    def iterate(self, agen: AsyncIterator[Any]) -> Iterator[Any]:
        """Iterate an async generator of this monitor (``astream``) from any thread."""
        events: queue.Queue[tuple[str, Any]] = queue.Queue()

        async def pump() -> None:
            try:
                async for item in agen:
                    events.put(("item", item))
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
                events.put(("error", exc))
            else:
                events.put(("done", None))

        future = asyncio.run_coroutine_threadsafe(pump(), self._loop)
        try:
            while True:
                kind, value = events.get()
                if kind == "error":
                    raise value
                if kind == "done":
                    return
                yield value
        finally:  # the caller stopped early (a client went away): abort the request
            if not future.done():
                future.cancel()

    # ------------------------------------------------------------------ policies
    def reload(self) -> str:
        """Reload the policy files on the front end and in every worker; return the version.

        Bad files are rejected on the front end first (nothing changes). Raises
        :class:`MonitorError` when the workers do not all end on the front end's version."""
        result = self.store.reload()
        if not result.ok:
            raise MonitorError(f"policy reload rejected: {result.error}")
        versions = self._call(self._reload_workers())
        if set(versions) != {self.store.version_id}:
            raise MonitorError(f"policy reload reached the workers unevenly: front end {self.store.version_id}, "
                               f"workers {sorted(set(versions))}")
        self.policy_version = self.store.version_id
        return self.policy_version

    async def _reload_workers(self) -> list[str]:
        return list(await self.engine.collective_rpc("sae_monitor_reload"))

    # ------------------------------------------------------------------ requests
    def prompt_ids(self, prompt: Prompt) -> list[int]:
        """Token ids of a prompt: a string (one user turn), chat messages, or ids as given."""
        from monitor.data import token_ids

        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        if prompt and isinstance(prompt[0], int):
            return [int(t) for t in prompt]  # type: ignore[arg-type]
        ids = self.tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=True)
        return list(token_ids(ids))

    def generate(self, prompts: Sequence[Prompt], *, max_tokens: int = 64, **sampling: Any) -> list[Completion]:
        """Run ``prompts`` concurrently (continuous batching); greedy unless ``temperature`` is given."""

        async def run_all() -> list[Completion]:
            return list(await asyncio.gather(*(self.agenerate(p, max_tokens=max_tokens, **sampling)
                                               for p in prompts)))

        return self._call(run_all())

    async def agenerate(self, prompt: Prompt, *, max_tokens: int = 64, **sampling: Any) -> Completion:
        """One monitored request, awaited to the end (call from the monitor's loop, or use
        :meth:`submit` from another loop)."""
        completion: Completion | None = None
        async for item in self.astream(prompt, max_tokens=max_tokens, **sampling):
            if isinstance(item, Completion):
                completion = item
        assert completion is not None
        return completion

    def submit(self, coro: Any) -> asyncio.Future:
        """Run a coroutine of this monitor (``agenerate``, ``astream`` consumers) on its loop and
        return an awaitable for the caller's loop (how a web server calls the engine)."""
        return asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self._loop))

    async def astream(self, prompt: Prompt, *, max_tokens: int = 64, **sampling: Any) -> AsyncIterator[str | Completion]:
        """Yield text chunks as they are cleared by the monitor, then the :class:`Completion`."""
        from vllm import SamplingParams

        if self.dead:
            self.failures += 1
            raise EngineFailed(self.dead, _failed_report(self.dead, self.store.version_id))
        if sampling.get("ignore_eos") or sampling.get("min_tokens"):
            raise MonitorError("ignore_eos and min_tokens cannot be used under the monitor: a block ends the "
                               "request by making it sample its end-of-sequence token; drop those options")
        started = time.perf_counter()
        ids = self.prompt_ids(prompt)
        request_id = uuid.uuid4().hex
        # The monitor decodes the text it releases itself (it holds back the newest token), so
        # vLLM's own detokenizer would only repeat that work, unless stop strings need it.
        defaults = {"temperature": 0.0, "detokenize": bool(sampling.get("stop"))}
        params = SamplingParams(**{**defaults, **sampling}, max_tokens=max_tokens + 1,
                                extra_args={EXTRA_ARGS_KEY: request_id})
        self.requests += 1
        tokens: list[int] = []
        released = ""
        finished = False
        try:
            async for out in self.engine.generate({"prompt_token_ids": ids}, params, request_id):
                tokens = list(out.outputs[0].token_ids)
                finished = out.finished
                if not finished:
                    chunk, released = _release(self.tokenizer, tokens[:min(len(tokens) - 1, max_tokens)], released)
                    if chunk:
                        yield chunk
            report = await self._collect(request_id)
        except asyncio.CancelledError:
            await self._abort(request_id)
            raise
        except (MonitorError, EngineFailed):
            raise
        except Exception as exc:  # the engine died or failed: fail closed, count it
            self.failures += 1
            if _is_dead(exc) or getattr(self.engine, "errored", False):
                self.dead = f"the vLLM engine process died ({_reason(exc)}); restart the service"
            message = self.dead or f"the vLLM engine failed: {_reason(exc)}"
            raise EngineFailed(message, _failed_report(message, self.store.version_id)) from None
        completion = _complete(self.tokenizer, self.config.block_behavior, self.store.version_id, ids, tokens,
                               max_tokens, report, started)
        tail, _ = _release(self.tokenizer, list(completion.token_ids[:completion.kept]), released, final=True)
        if tail:
            yield tail
        yield completion

    async def _collect(self, request_id: str) -> Report | None:
        return await self._collector.collect(request_id)

    async def _abort(self, request_id: str) -> None:
        try:
            await self.engine.abort(request_id)
            await self._collect(request_id)
        except Exception:  # noqa: BLE001 - best effort cleanup on cancellation
            pass


def _release(tokenizer: Any, tokens: list[int], released: str, final: bool = False) -> tuple[str, str]:
    """(new text to send, all text sent) for ``tokens``: nothing while the newest character may
    be unfinished (a multi-byte character split across tokens)."""
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    if not final and "\ufffd" in text[len(released):]:  # maybe an unfinished character
        return "", released
    if not text.startswith(released):
        return "", released
    return text[len(released):], text


def _complete(tokenizer: Any, block_behavior: str, version: str, prompt: list[int], tokens: list[int],
              max_tokens: int, report: Report | None, started: float) -> Completion:
    """The caller's :class:`Completion` from the generated tokens and the worker's report: a
    blocked response cut before the firing token and ending with the rule's message."""
    if report is None:
        report = _failed_report("the workers returned no monitoring report for this request",
                                version)
    report.total_seconds = time.perf_counter() - started
    if report.error and not report.failed_open:
        raise MonitorUnavailable(f"monitoring failed and the monitor fails closed: {report.error}", report)
    if 0 in report.blocks:
        block = report.blocks[0]
        keep = block.token_index if block.scope == "response" else 0
        text = block_text(block.message, after_text=keep > 0)
        message = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        kept = tokens[:keep]
        out = Completion(tuple(kept + message), tokenizer.decode(kept, skip_special_tokens=True) + text,
                         "blocked", report, len(kept), tuple(prompt))
        if block_behavior == "raise":
            raise Blocked(block.message, report)
        return out
    reason: Literal["stop", "length"] = "length" if len(tokens) > max_tokens else "stop"
    kept = tokens[:max_tokens]
    return Completion(tuple(kept), tokenizer.decode(kept, skip_special_tokens=True), reason, report,
                      len(kept), tuple(prompt))


class ReportCollector:
    """Fetches the workers' reports of finished requests: requests that end together share one
    ``collective_rpc`` (each call is a round trip through the engine loop between two forward
    steps, so one per request would cost a wave of 32 requests 32 round trips)."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self._waiting: dict[str, asyncio.Future[Report | None]] = {}
        self._running: asyncio.Future[None] | None = None

    async def collect(self, request_id: str) -> Report | None:
        """The report of ``request_id`` (None when no worker has one)."""
        future: asyncio.Future[Report | None] = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = future
        if self._running is None or self._running.done():
            self._running = asyncio.ensure_future(self._drain())
        return await future

    async def _drain(self) -> None:
        while self._waiting:
            await asyncio.sleep(0)  # let requests ending in the same engine output join this round
            batch, self._waiting = self._waiting, {}
            try:
                per_rank = await self.engine.collective_rpc("sae_monitor_collect_many", args=(list(batch),))
            except Exception as exc:  # noqa: BLE001 - every waiting request sees the failure
                for future in batch.values():
                    if not future.done():
                        future.set_exception(exc)
                continue
            for k, future in enumerate(batch.values()):
                raw = next((rank[k] for rank in per_rank if rank[k] is not None), None)
                if not future.done():
                    future.set_result(None if raw is None else pickle.loads(raw))


def _failed_report(error: str, version: str) -> Report:
    return Report(request_id=uuid.uuid4().hex, policy_version=version, row_outcomes=["error"], error=error)


def _is_dead(exc: BaseException) -> bool:
    try:
        from vllm.v1.engine.exceptions import EngineDeadError
    except ImportError:  # pragma: no cover - vLLM moved it
        return "dead" in type(exc).__name__.lower()
    return isinstance(exc, EngineDeadError) or isinstance(exc.__cause__, EngineDeadError)


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def from_default(**options: Any) -> VLLMMonitor:
    """The default model (converted once into the cache) under the shipped SAE and policies."""
    from monitor.models import default_model_cache_dir, load_default_model

    model_dir = default_model_cache_dir()
    if not (Path(model_dir) / "config.json").is_file():
        load_default_model()  # converts the GGUF into the cache directory vLLM reads
    return VLLMMonitor(MonitorConfig(model=str(model_dir), **options))
