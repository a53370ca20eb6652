"""One request's monitoring inside a vLLM worker: a core :class:`~monitor.runtime.session.Session`
plus what vLLM's scheduling adds.

The worker encodes every monitored row of a forward pass at once and hands each request its
slice; :class:`RequestTracker` feeds it to the request's one-row session
(``Session.observe_features``) and adds the three things that depend on how vLLM schedules:

* **positions already monitored** (recomputation after preemption) are never stepped twice:
  ``monitored_upto`` says how far the request got, and the steering edits applied at each
  position are recorded so a recomputed position gets the same edit again (``replay``);
* **chunked prefill**: steering in force is applied at the last row of a span, but inside the
  prompt only at the prompt's last token, so a prompt prefilled in chunks is steered exactly
  where a whole-prompt prefill (the transformers path) steers it;
* **stop**: once the session blocks or refuses the request, the worker forces the request's
  stop token in the same step.

It never touches the model: it returns the directives to apply and the worker applies them.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from monitor.policy import CompiledPolicy, SteerDirective
from monitor.report import Report
from monitor.runtime.encoder import FeatureEncoder
from monitor.runtime.session import FailureMode, Session, StepDecisions, observe_many
from monitor.runtime.vllm.batch import Span


class RequestTracker:
    """Per-request state in a worker; see the module docstring. ``tag`` is the front end's id."""

    def __init__(self, tag: str, policy: CompiledPolicy, encoder: FeatureEncoder, prompt_len: int,
                 on_error: FailureMode) -> None:
        self.tag = tag
        self.policy = policy
        self.prompt_len = prompt_len
        self.session = Session(policy, encoder, 1, on_error=on_error, request_id=tag)
        self.monitored_upto = 0  # positions < this have been stepped
        self.edits: dict[int, list[SteerDirective]] = {}  # position -> directives applied there
        self.seconds = 0.0

    @property
    def stopped(self) -> bool:
        """True once the request must end: blocked, or refused after a monitoring fault."""
        return bool(self.session.stopped[0]) or self.session.refused

    def step(self, span: Span, feats: torch.Tensor, mask: torch.Tensor) -> list[SteerDirective]:
        """Step the session over ``feats[T, F]`` / ``mask[T]`` of ``span``; return the steering
        directives to apply at the span's last row."""
        self.monitored_upto = max(self.monitored_upto, span.position + span.length)
        started = time.perf_counter()
        try:
            decisions = self.session.observe_features(feats[None], span.scope, mask[None])
        finally:
            self.seconds += time.perf_counter() - started
        return self.directives(span, decisions)

    def directives(self, span: Span, decisions: StepDecisions) -> list[SteerDirective]:
        """The steering to apply at the last row of ``span`` after it decided ``decisions``."""
        if not decisions.steers or self.stopped:
            return []
        if span.scope == "prompt" and not span.ends_prompt:
            return []  # a whole-prompt prefill steers only at the prompt's last token
        directives = list(decisions.steers)
        self.edits[span.position + span.length - 1] = directives
        return directives

    def replay(self, position: int) -> list[SteerDirective]:
        """The directives applied at ``position`` when it was first computed (or none)."""
        return self.edits.get(position, [])

    def fail(self, exc: BaseException) -> None:
        """A fault outside the session (encoding the batch): ``on_error`` decides."""
        self.session.fail(exc)

    def finish(self) -> Report:
        """The request's report (one row), as the transformers path writes it."""
        report = self.session.finish()
        report.monitor_seconds += self.seconds
        return report


def step_trackers(trackers: Sequence[RequestTracker], spans: Sequence[Span], feats: torch.Tensor,
                  mask: torch.Tensor) -> list[list[SteerDirective]]:
    """Step many requests' spans of equal length and scope at once (a decode step of every
    running request): ``feats[N, T, F]`` / ``mask[N, T]``, row ``i`` for ``spans[i]``. The same
    decisions as stepping each tracker alone, for one engine evaluation
    (:func:`~monitor.runtime.session.observe_many`); the time is shared out evenly."""
    started = time.perf_counter()
    for tracker, span in zip(trackers, spans):
        tracker.monitored_upto = max(tracker.monitored_upto, span.position + span.length)
    decisions = observe_many([t.session for t in trackers], feats, spans[0].scope, mask)
    out = [t.directives(span, d) for t, span, d in zip(trackers, spans, decisions)]
    share = (time.perf_counter() - started) / len(trackers)
    for tracker in trackers:
        tracker.seconds += share
    return out


def step_group(trackers: Sequence[RequestTracker], spans: Sequence[Span], feats: torch.Tensor,
               mask: torch.Tensor) -> dict[int, list[SteerDirective]]:
    """Step the requests of one policy version over their encoded rows (``feats[rows, F]``,
    ``mask[rows]``, spans in row order, ``trackers[i]`` for ``spans[i]``): spans of equal scope
    and length (every decode row of a step) in one engine evaluation (:func:`step_trackers`),
    the others (prefill chunks) one by one. Returns the steering to apply, by batch row."""
    offsets = [0]
    for span in spans:
        offsets.append(offsets[-1] + span.length)
    shapes: dict[tuple[str, int], list[int]] = {}
    for k, span in enumerate(spans):
        shapes.setdefault((span.scope, span.length), []).append(k)
    edits: dict[int, list[SteerDirective]] = {}
    for (_scope, length), members in shapes.items():
        if len(members) == 1:
            k = members[0]
            results = [trackers[k].step(spans[k], feats[offsets[k]:offsets[k + 1]], mask[offsets[k]:offsets[k + 1]])]
        else:
            rows = torch.tensor([offsets[k] for k in members], device=feats.device)
            if length > 1:
                rows = (rows[:, None] + torch.arange(length, device=feats.device)).reshape(-1)
            results = step_trackers([trackers[k] for k in members], [spans[k] for k in members],
                                    feats.index_select(0, rows).view(len(members), length, -1),
                                    mask.index_select(0, rows).view(len(members), length))
        for k, directives in zip(members, results):
            if directives:
                edits[spans[k].row_end - 1] = directives
    return edits


def monitored_rows(spans: Sequence[Span], resid: torch.Tensor, ids: torch.Tensor | None,
                   special_ids: torch.Tensor, encoder: FeatureEncoder) -> torch.Tensor:
    """True where a row of ``resid`` (the spans' rows, in order) is monitored: not position 0,
    not a special token (``ids``: the rows' token ids, when known), readable by the SAE."""
    positions = torch.tensor([p for s in spans for p in range(s.position, s.position + s.length)],
                             device=resid.device)
    mask = (positions != 0) & encoder.content_mask(resid)
    if ids is not None and special_ids.numel():
        mask &= ~torch.isin(ids, special_ids.to(ids.device))
    return mask
