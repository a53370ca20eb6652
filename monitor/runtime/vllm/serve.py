"""Serving the vLLM engine through sae-monitor's OpenAI-compatible app.

The app (``monitor.serve.create_app``) drives a monitor object from worker threads: it calls
``generate``/``stream`` per request, reads ``last_report``, ``policy``, ``policy_store``,
``tokenizer``, ``sae``/``catalog`` (build info), ``model.config`` (context length) and
``model.generation_config`` (EOS), appends report ``callbacks`` (metrics, logs, audit) and
calls ``reload_policies``. :class:`ServingEngine` offers exactly that surface on top of
:class:`~monitor.runtime.vllm.engine.VLLMMonitor`, so the same routes, metrics, logs, audit,
reload and admin endpoints serve vLLM's async engine. Requests from many threads run
concurrently in vLLM's continuous batching (the app's ``max_concurrent`` bounds them).

A policy reload goes to the front end's store first (bad files are rejected there, nothing
changes) and then to every worker; if any worker does not end on the front end's version the
reload result says so (``ok=False``) and the build-info metric keeps the old version, so a
replica that disagrees is visible in ``sae_monitor_build_info{policy_version}``.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import torch

from monitor.policy import CompiledPolicy, PolicyStore, ReloadResult
from monitor.runtime.vllm.engine import Completion, VLLMMonitor, from_default
from monitor.runtime.vllm.setup import MonitorConfig
from monitor.errors import MonitorUnavailable
from monitor.report import Report


class ServingEngine:
    """The app-facing surface of a :class:`VLLMMonitor`; see the module docstring."""

    def __init__(self, monitor: VLLMMonitor) -> None:
        from monitor.catalog import load_catalog
        from monitor.sae import load_sae

        self.engine = monitor
        self.tokenizer = monitor.tokenizer
        self.callbacks: list[Any] = []
        self.sae = load_sae(monitor.spec.sae)  # for the build-info label (sae identity)
        self.catalog = load_catalog(monitor.spec.catalog, d_sae=self.sae.cfg.d_sae) if monitor.spec.catalog else None
        eos = monitor.spec.stop_token_id
        self.model = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=monitor.config.max_model_len),
                                     generation_config=SimpleNamespace(eos_token_id=eos))
        self._local = threading.local()

    # ------------------------------------------------------------------ policy surface
    @property
    def policy(self) -> CompiledPolicy:
        return self.engine.store.current

    @property
    def policy_store(self) -> PolicyStore:
        return self.engine.store

    def reload_policies(self) -> ReloadResult:
        """Reload on the front end and in every worker (see the module docstring)."""
        store = self.engine.store
        before = store.version_id
        try:
            version = self.engine.reload()
        except Exception as exc:  # noqa: BLE001 - reported to the caller as a failed reload
            return ReloadResult(False, str(exc), before, False)
        return ReloadResult(True, None, version, version != before)

    # ------------------------------------------------------------------ generation
    @property
    def last_report(self) -> Report | None:
        return getattr(self._local, "report", None)

    def _finish(self, report: Report) -> None:
        self._local.report = report
        for callback in self.callbacks:
            callback(report)

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 256, **gen: Any) -> torch.Tensor:
        """One prompt (``input_ids[1, T]``) -> ``[1, T + new]`` like ``model.generate``; a
        blocked response ends with the rule's message tokens."""
        prompt = [int(t) for t in input_ids[0].tolist()]
        controls = _controls(gen)
        try:
            completion: Completion = self.engine.submit_sync(
                self.engine.agenerate(prompt, max_tokens=max_new_tokens, **_sampling(gen)))
        except MonitorUnavailable as exc:  # counted by the callbacks (metrics, audit), then refused
            self._finish(exc.report)
            raise
        for control in controls:
            control.count = completion.kept
        self._finish(completion.report)
        return torch.tensor([prompt + list(completion.token_ids)], dtype=torch.long)

    def stream(self, input_ids: torch.Tensor, max_new_tokens: int = 256, **gen: Any) -> Iterator[str]:
        """Text chunks as the monitor clears them; a block ends with the rule's message."""
        prompt = [int(t) for t in input_ids[0].tolist()]
        controls = _controls(gen)
        completion: Completion | None = None
        try:
            for item in self.engine.iterate(self.engine.astream(prompt, max_tokens=max_new_tokens, **_sampling(gen))):
                if isinstance(item, Completion):
                    completion = item
                    continue
                for control in controls:
                    control.count += 1
                if any(control.cancelled.is_set() for control in controls):
                    from monitor.serve.chat import GenerationCancelled

                    raise GenerationCancelled("the client went away")  # closing iterate() aborts the request
                yield item
        except MonitorUnavailable as exc:
            self._finish(exc.report)
            raise
        assert completion is not None
        for control in controls:
            control.count = completion.kept
        if completion.finish_reason == "blocked":
            kept = self.tokenizer.decode(list(completion.token_ids[:completion.kept]), skip_special_tokens=True)
            yield completion.text[len(kept):]  # the rule's message (the kept part was streamed)
        self._finish(completion.report)

    def close(self) -> None:
        self.engine.close()


def _controls(gen: dict[str, Any]) -> list[Any]:
    """The app's per-request controls (token count, cancellation) among ``logits_processor``:
    vLLM runs no transformers logits processor, so the engine updates them itself."""
    return [p for p in (gen.get("logits_processor") or []) if hasattr(p, "cancelled") and hasattr(p, "count")]


def _sampling(gen: dict[str, Any]) -> dict[str, Any]:
    """transformers generate kwargs -> vLLM SamplingParams fields."""
    out: dict[str, Any] = {}
    if gen.get("do_sample"):
        out["temperature"] = float(gen.get("temperature", 1.0))
        if "top_p" in gen:
            out["top_p"] = float(gen["top_p"])
    return out


def serving_engine(model: str = "default", *, sae: str = "default", policies: str | list[str] | None = None,
                   catalog: str | None = None, on_error: str = "auto", max_model_len: int = 2048,
                   engine_args: dict[str, Any] | None = None) -> ServingEngine:
    """Start vLLM's async engine under the monitor and wrap it for the server's app
    (``serve_model(engine="vllm")`` runs the app on it; close it when the server stops)."""
    options: dict[str, Any] = dict(sae=sae, catalog=catalog, on_error=on_error, max_model_len=max_model_len,
                                   engine_args=dict(engine_args or {}),
                                   policies=None if policies is None else tuple(
                                       [policies] if isinstance(policies, str) else policies))
    monitor = from_default(**options) if model == "default" else VLLMMonitor(MonitorConfig(model=model, **options))
    return ServingEngine(monitor)
