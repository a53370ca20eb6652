"""The monitor inside a vLLM worker: hook -> encode -> per-request engine -> steer / stop.

:class:`WorkerMonitor` attaches to a worker's model runner (vLLM v1, ``GPUModelRunner`` and
its CPU subclass) at three points, all inside the worker process:

1. ``execute_model`` is wrapped to remember the step's ``SchedulerOutput`` (which requests run,
   how many tokens each);
2. a forward hook on the SAE's decoder layer reads the residual stream of every row of the
   flat batch. vLLM's Llama-family layers fuse the residual add into the next layer's norm and
   return ``(hidden_states, residual)``: the residual stream as transformers sees it is their
   **sum**. The rows are split into per-request spans (:func:`~monitor.runtime.vllm.batch.plan_step`),
   every new row of every monitored request is encoded in one call, each request's
   :class:`~monitor.runtime.vllm.tracker.RequestTracker` steps the policy engine, and steering
   edits are added to ``hidden_states`` (which the next layer adds to ``residual``);
3. ``compute_logits`` is wrapped so that a request blocked in this step samples the stop token
   (EOS) and the scheduler ends it: no token after the firing one is ever generated.

Requests opt in through ``SamplingParams.extra_args[EXTRA_ARGS_KEY]``; others cost nothing but
the span split. Finished requests keep their report until the front end collects it
(``collect``), bounded by :data:`MAX_UNCOLLECTED`.

Tensor parallelism: every rank holds the full residual after the all-reduce, so every rank runs
the same trackers on the same numbers and applies the same edits; the front end reads rank 0's
report. Pipeline parallelism: only the stage holding the SAE's layer has the hook; the stop
token is applied by the last stage (see docs/vllm.md for what that needs).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import replace
from typing import Any

import torch

from monitor.capture import find_blocks
from monitor.catalog import Catalog, load_catalog
from monitor.errors import SAEMismatchError
from monitor.policy import CompiledPolicy, PolicyStore
from monitor.runtime.vllm.batch import Span, plan_step
from monitor.runtime.vllm.setup import sae_layer_only
from monitor.runtime.encoder import FeatureEncoder
from monitor.runtime.threads import one_host_thread
from monitor.runtime.vllm.spec import EXTRA_ARGS_KEY, MonitorSpec
from monitor.report import Report
from monitor.runtime.vllm.tracker import RequestTracker, monitored_rows, step_group
from monitor.sae import SAE, load_sae

#: Summaries of finished requests kept for the front end; the oldest are dropped past this.
MAX_UNCOLLECTED = 4096


def residual_rows(hidden: torch.Tensor, residual: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor:
    """The residual stream (as transformers sees it) at ``rows`` of the flat batch: vLLM's
    Llama-family layers return ``(hidden_states, residual)`` and the stream is their sum. Only
    the monitored rows are summed, not the whole batch."""
    picked = hidden.index_select(0, rows)
    return picked if residual is None else picked + residual.index_select(0, rows)


class WorkerMonitor:
    """Monitoring state of one worker; see the module docstring."""

    def __init__(self, runner: Any, spec: MonitorSpec) -> None:
        self.runner = runner
        self.spec = spec
        self.sae: SAE = load_sae(spec.sae)
        self.catalog: Catalog | None = (load_catalog(spec.catalog, d_sae=self.sae.cfg.d_sae)
                                        if spec.catalog else None)
        self.store = PolicyStore(list(spec.policies), self.catalog, self.sae.cfg.d_sae,
                                 accept=sae_layer_only(self.sae, self.catalog))
        self._encoders: dict[str, FeatureEncoder] = {}
        self.trackers: dict[str, RequestTracker] = {}
        self.finished: OrderedDict[str, Report] = OrderedDict()  # by the front end's tag
        self.special_ids = torch.tensor(sorted(spec.special_ids), dtype=torch.long)
        self.to_stop: list[bool] = []  # per input-batch row: force the stop token this step
        self.steps = 0
        self.monitor_seconds = 0.0
        self._scheduler_output: Any = None
        self._ids: torch.Tensor | None = None
        self._handles: list[Any] = []
        self._install()

    # ------------------------------------------------------------------ install / remove
    def _install(self) -> None:
        runner = self.runner
        model = runner.get_model()
        point = self.sae.hook_point
        blocks = find_blocks(model)
        if not 0 <= point.layer < len(blocks):
            raise SAEMismatchError(f"the SAE reads layer {point.layer} ({point.name}) but the model served "
                                   f"by vLLM has {len(blocks)} layers (0..{len(blocks) - 1}); use an SAE "
                                   "trained on this model")
        hidden = int(getattr(runner.model_config.hf_text_config, "hidden_size", self.sae.cfg.d_in))
        if hidden != self.sae.cfg.d_in:
            raise SAEMismatchError(f"the SAE reads vectors of width {self.sae.cfg.d_in} but the model's "
                                   f"hidden size is {hidden}; use an SAE trained on this model")
        block = blocks[point.layer]
        if point.site == "resid_post":
            self._handles.append(block.register_forward_hook(self._post_hook, with_kwargs=True))
        else:
            self._handles.append(block.register_forward_pre_hook(self._pre_hook, with_kwargs=True))
        self._handles.append(model.register_forward_pre_hook(self._model_pre_hook, with_kwargs=True))
        self._orig_execute = runner.execute_model
        self._orig_logits = model.compute_logits
        runner.execute_model = self._execute_model
        model.compute_logits = self._compute_logits

    def remove(self) -> None:
        """Take every hook and wrapper off: the worker is as before."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.runner.execute_model = self._orig_execute
        self.runner.get_model().compute_logits = self._orig_logits

    # ------------------------------------------------------------------ policies
    def reload(self) -> str:
        """Reload the policy files; raises if they are invalid (the caller reports it)."""
        result = self.store.reload()
        if not result.ok:
            raise RuntimeError(f"policy reload rejected: {result.error}")
        return result.version_id

    def encoder(self, policy: CompiledPolicy) -> FeatureEncoder:
        """The encoder of ``policy`` (kept while a request in flight uses that version)."""
        cached = self._encoders.get(policy.version_id)
        if cached is None:
            cached = FeatureEncoder(self.sae, policy, self.catalog)
            self._encoders = {k: v for k, v in self._encoders.items()
                              if any(t.policy.version_id == k for t in self.trackers.values())}
            self._encoders[policy.version_id] = cached
        return cached

    # ------------------------------------------------------------------ wrapped runner calls
    def _execute_model(self, scheduler_output: Any, *args: Any, **kwargs: Any) -> Any:
        self._scheduler_output = scheduler_output
        self.to_stop = []
        for req_id in scheduler_output.finished_req_ids:
            self._retire(req_id)
        try:
            return self._orig_execute(scheduler_output, *args, **kwargs)
        finally:
            self._scheduler_output = None
            self._ids = None

    def _compute_logits(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        logits = self._orig_logits(hidden_states, *args, **kwargs)
        if logits is not None and any(self.to_stop):
            rows = [i for i, stop in enumerate(self.to_stop) if stop and i < logits.shape[0]]
            logits[rows] = float("-inf")
            logits[rows, self.spec.stop_token_id] = 0.0
        return logits

    def _model_pre_hook(self, _module: Any, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        self._ids = ids

    def _post_hook(self, _module: Any, args: tuple, kwargs: dict, output: Any) -> Any:
        positions = kwargs.get("positions", args[0] if args else None)
        hidden, residual = output if isinstance(output, tuple) else (output, None)
        self._on_stream(positions, hidden, residual)
        return None  # edits are made in place on hidden_states

    def _pre_hook(self, _module: Any, args: tuple, kwargs: dict) -> None:
        names = ("positions", "hidden_states", "residual")
        values = dict(zip(names, args)) | {k: kwargs[k] for k in names if k in kwargs}
        self._on_stream(values.get("positions"), values["hidden_states"], values.get("residual"))

    # ------------------------------------------------------------------ the step
    def _on_stream(self, positions: Any, hidden: torch.Tensor, residual: torch.Tensor | None) -> None:
        sched = self._scheduler_output
        if sched is None:  # a profiling or warm-up run: no requests
            return
        started = time.perf_counter()
        with one_host_thread(hidden.device):
            self._monitor_step(hidden, residual, sched)
        self.steps += 1
        self.monitor_seconds += time.perf_counter() - started

    def _monitor_step(self, hidden: torch.Tensor, residual: torch.Tensor | None, sched: Any) -> None:
        batch = self.runner.input_batch
        req_ids = [r for r in batch.req_ids if r is not None]
        self._admit(req_ids)
        self.to_stop = [False] * len(req_ids)
        watched = {r for r in req_ids if r in self.trackers}
        if not watched:
            return
        prompt_lens = {r: t.prompt_len for r, t in self.trackers.items()}
        upto = {r: t.monitored_upto for r, t in self.trackers.items()}
        first = [int(batch.num_computed_tokens_cpu[i]) for i in range(len(req_ids))]
        counts = {r: n for r, n in sched.num_scheduled_tokens.items()}
        spans = plan_step(req_ids, counts, first, {r: prompt_lens[r] for r in watched}, upto)
        edits: dict[int, list] = {}  # row -> directives to add there
        self._step_spans([s for s in spans if not s.replay], hidden, residual, edits)
        for span in spans:
            if span.replay:
                for k in range(span.length):
                    replayed = self.trackers[span.req_id].replay(span.position + k)
                    if replayed:
                        edits[span.row_start + k] = replayed
        if edits:
            self._apply(hidden, residual, edits)
        index = {r: i for i, r in enumerate(req_ids)}
        for r in watched:
            if self.trackers[r].stopped:
                self.to_stop[index[r]] = True

    def _admit(self, req_ids: list[str]) -> None:
        """Start a tracker for each monitored request seen for the first time."""
        for r in req_ids:
            if r in self.trackers:
                continue
            state = self.runner.requests.get(r)
            params = getattr(state, "sampling_params", None)
            extra = getattr(params, "extra_args", None) or {}
            if EXTRA_ARGS_KEY in extra:  # tagged with the front end's id (vLLM suffixes its own)
                policy = self.store.current
                self.trackers[r] = RequestTracker(str(extra[EXTRA_ARGS_KEY]), policy, self.encoder(policy),
                                                  int(state.num_prompt_tokens), self.spec.on_error)

    def _step_spans(self, spans: list[Span], hidden: torch.Tensor, residual: torch.Tensor | None,
                    edits: dict[int, list]) -> None:
        """Encode the rows of ``spans`` (one call per policy version) and step each request."""
        by_version: dict[str, list[Span]] = {}
        for span in spans:
            by_version.setdefault(self.trackers[span.req_id].policy.version_id, []).append(span)
        for group in by_version.values():
            policy = self.trackers[group[0].req_id].policy
            try:
                rows = torch.tensor([r for s in group for r in range(s.row_start, s.row_end)], device=hidden.device)
                resid = residual_rows(hidden, residual, rows)
                encoder = self.encoder(policy)
                feats = encoder.encode(resid)
                ids = None if self._ids is None else self._ids.index_select(0, rows)
                mask = monitored_rows(group, resid, ids, self.special_ids, encoder)
            except Exception as exc:  # noqa: BLE001 - a fault fails each request per on_error
                for span in group:
                    self.trackers[span.req_id].fail(exc)
                continue
            edits.update(step_group([self.trackers[s.req_id] for s in group], group, feats, mask))

    def _apply(self, hidden: torch.Tensor, residual: torch.Tensor | None, edits: dict[int, list]) -> None:
        """Add each row's steering delta to ``hidden`` in place (the next layer adds ``residual``)."""
        rows = sorted(edits)
        index = torch.tensor(rows, device=hidden.device)
        resid = residual_rows(hidden, residual, index)
        directives = [replace(d, row=i) for i, r in enumerate(rows) for d in edits[r]]
        # steering reads only the SAE and the catalog, the same for every policy version
        delta = self.encoder(self.store.current).steer_delta(resid, directives)
        hidden.index_add_(0, index, delta.to(hidden.dtype))

    # ------------------------------------------------------------------ results
    def _retire(self, req_id: str) -> None:
        tracker = self.trackers.pop(req_id, None)
        if tracker is not None:
            self.finished[tracker.tag] = tracker.finish()
            while len(self.finished) > MAX_UNCOLLECTED:
                self.finished.popitem(last=False)

    def collect(self, tag: str) -> Report | None:
        """The report of the request the front end tagged ``tag`` (finished or still running),
        removed from the worker."""
        for req_id in [r for r, t in self.trackers.items() if t.tag == tag]:
            self._retire(req_id)
        return self.finished.pop(tag, None)

    def status(self) -> dict[str, Any]:
        return {"policy_version": self.store.version_id, "tracked": len(self.trackers),
                "uncollected": len(self.finished), "steps": self.steps,
                "monitor_seconds": self.monitor_seconds}
