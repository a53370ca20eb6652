"""The engine-agnostic monitoring core: one :class:`Session` per request.

An engine adapter (transformers hooks, a vLLM plugin, an offline scanner) feeds a session the
residual activations of a span of positions of each row, with a mask of the positions that may
be monitored, and gets back the decisions as plain values (:class:`StepDecisions`): the hits,
the rows newly blocked (with the token index to cut at) and the steering directives to apply at
the span's last position. A session never touches a model and never reaches into the object
that created it: it receives its policy snapshot and its encoder when it is made.

Many requests at once: a serving engine that encodes the rows of all its requests in one call
steps their one-row sessions together with :func:`observe_many` (one engine evaluation and one
host sync for all of them, the decisions each session would get alone).

Data flow per call: ``observe(resid)`` -> :class:`~monitor.runtime.encoder.FeatureEncoder`
(watched latents and probes, one fused matmul) -> ``CompiledPolicy.step`` (pure, vectorised over
all rules) -> decisions recorded in :attr:`Session.report`.

Timing: the adapter adds its own monitoring time (hook to decisions) to
``report.monitor_seconds``; the session does not time itself, so nothing is counted twice.

Faults: any exception while monitoring is handled by ``on_error``. ``"open"``: the session
stops monitoring, the report says ``failed_open`` and the request continues unmonitored.
``"closed"``: every row is stopped and :attr:`refused` is set; the adapter refuses the request.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch

from monitor.report import BlockInfo, Report

if TYPE_CHECKING:
    from monitor.policy import CompiledPolicy, EngineState, Hit, SteerDirective, StepResult
    from monitor.runtime.encoder import FeatureEncoder

Scope = Literal["prompt", "response"]
FailureMode = Literal["open", "closed"]


@dataclass(frozen=True)
class StepDecisions:
    """What one observed span decided. ``blocks`` holds only rows blocked by this span;
    ``steers`` are the directives in force for the span's last position (apply them there,
    to rows not stopped)."""

    hits: tuple[Hit, ...] = ()
    blocks: dict[int, BlockInfo] = field(default_factory=dict)
    steers: tuple[SteerDirective, ...] = ()


NOTHING = StepDecisions()


def resolve_on_error(on_error: Literal["open", "closed", "auto"], policy: CompiledPolicy) -> FailureMode:
    """``auto`` fails closed when any enforce rule is loaded (a block must not be skipped
    silently), open otherwise."""
    if on_error != "auto":
        return on_error
    return "closed" if any(r.mode == "enforce" for r in policy.rules) else "open"


class Session:
    """Monitoring state of one request of ``rows`` rows; see the module docstring."""

    def __init__(self, policy: CompiledPolicy, encoder: FeatureEncoder, rows: int, *,
                 on_error: FailureMode = "closed", request_id: str | None = None,
                 scope_means: bool = False) -> None:
        self.policy = policy
        self.scope_means = scope_means  # keep Report.sums for Report.means (offline evaluation)
        self.encoder = encoder
        self.rows = rows
        self.on_error = on_error
        self.state: EngineState | None = None
        self.report = Report(request_id=request_id or uuid.uuid4().hex,
                             policy_version=policy.version_id, row_outcomes=["allowed"] * rows,
                             features=tuple(f.label for f in policy.features))
        self.stopped = torch.zeros(rows, dtype=torch.bool)
        self.block_position: dict[int, int] = {}  # row -> response tokens kept (-1: prompt block)
        self.disabled = False  # failed open: monitoring stopped, generation goes on
        self.refused = False  # failed closed: the request must be refused
        self._steer_keys: set[tuple[int, str, int | None, str | None]] = set()

    # ------------------------------------------------------------------ feeding
    def observe(self, resid: torch.Tensor, scope: Scope, mask: torch.Tensor | None = None) -> StepDecisions:
        """Encode ``resid[B, T, d]`` and evaluate it as the next ``T`` tokens of ``scope``.

        ``mask[B, T]`` is False where a position must not be monitored (padding, special
        tokens); positions the SAE cannot read and rows already stopped are masked here.
        """
        if self.disabled or self.refused:
            return NOTHING
        try:
            feats = self.encoder.encode(resid)
            content = self.encoder.content_mask(resid)
            return self._step(feats, scope, content if mask is None else mask.to(content.device) & content)
        except Exception as exc:  # noqa: BLE001 - every monitoring fault is handled by on_error
            self.fail(exc)
            return NOTHING

    def observe_features(self, feats: torch.Tensor, scope: Scope, mask: torch.Tensor | None = None) -> StepDecisions:
        """As :meth:`observe`, for an engine that encoded many requests at once:
        ``feats[B, T, F]`` are already the policy's columns (``FeatureEncoder.encode``)."""
        if self.disabled or self.refused:
            return NOTHING
        try:
            if mask is None:
                mask = torch.ones(feats.shape[:2], dtype=torch.bool, device=feats.device)
            return self._step(feats, scope, mask.to(feats.device))
        except Exception as exc:  # noqa: BLE001
            self.fail(exc)
            return NOTHING

    def fail(self, exc: BaseException) -> None:
        """Record a monitoring fault and apply ``on_error`` (see the module docstring)."""
        self.report.error = f"{type(exc).__name__}: {exc}"
        if self.on_error == "open":
            self.disabled = True
            self.report.failed_open = True
        else:
            self.refused = True
            self.stopped[:] = True

    def tokens_seen(self, scope: Scope) -> int:
        """Tokens of ``scope`` evaluated so far per row (masked ones included)."""
        return 0 if self.state is None else self.state.tokens_seen(scope)

    def finish(self, total_seconds: float | None = None) -> Report:
        """Close the session: settle the token counters and return the report."""
        for scope, count in self.report.counts.items():
            self.report.tokens_monitored[scope] = int(count.sum())
        if total_seconds is not None:
            self.report.total_seconds = total_seconds
        return self.report

    # ------------------------------------------------------------------ one step
    def _step(self, feats: torch.Tensor, scope: Scope, mask: torch.Tensor) -> StepDecisions:
        stopped = self.stopped.to(mask.device)
        mask = mask & ~stopped[:, None]
        if self.state is None or self.state.device != feats.device:
            self.state = self.policy.new_state(self.rows, feats.device)
        _accumulate([self], scope, feats, mask)
        result = self.policy.step(self.state, feats, mask, scope, require_finite=True)
        return self._record(result, scope)

    def _record(self, result: StepResult, scope: Scope) -> StepDecisions:
        """Write one engine step's decisions into the report and the stopped rows."""
        if not result.hits and not result.steer:
            return NOTHING
        report = self.report
        report.hits.extend(result.hits)
        for hit in result.hits:
            if hit.mode == "enforce" and "steer" in hit.actions and report.row_outcomes[hit.row] == "allowed":
                report.row_outcomes[hit.row] = "steered"
        blocks: dict[int, BlockInfo] = {}
        for row, (rule_id, message) in result.block_messages.items():
            if row in report.blocks:
                continue
            first = next(h for h in result.hits if h.row == row and h.rule_id == rule_id and "block" in h.actions)
            info = BlockInfo(row, rule_id, message, scope, first.token_index)
            report.blocks[row] = blocks[row] = info
            report.row_outcomes[row] = "blocked"
            self.stopped[row] = True
            self.block_position[row] = first.token_index if scope == "response" else -1
        for d in result.steer:
            key = (d.row, d.rule_id, d.latent, d.probe)
            if key not in self._steer_keys:
                self._steer_keys.add(key)
                report.steers.append(d)
        steers = tuple(d for d in result.steer if not bool(self.stopped[d.row]))
        return StepDecisions(tuple(result.hits), blocks, steers)


def observe_many(sessions: Sequence[Session], feats: torch.Tensor, scope: Scope,
                 mask: torch.Tensor) -> list[StepDecisions]:
    """Step several one-row sessions of one policy at once: row ``i`` of ``feats[N, T, F]``
    (already encoded, as for :meth:`Session.observe_features`) and ``mask[N, T]`` is the next
    ``T`` tokens of ``sessions[i]``. Returns each session's decisions, exactly what
    ``sessions[i].observe_features(feats[i:i+1], scope, mask[i:i+1])`` would return, at the
    cost of one engine evaluation (:meth:`~monitor.policy.CompiledPolicy.step_many`). A fault
    is each session's fault (``on_error``)."""
    out = [NOTHING] * len(sessions)
    live = [i for i, s in enumerate(sessions) if not (s.disabled or s.refused)]
    if not live:
        return out
    group = [sessions[i] for i in live]
    policy = group[0].policy
    if any(s.policy is not policy or s.rows != 1 for s in group):
        raise ValueError("observe_many takes one-row sessions of one CompiledPolicy; group sessions by "
                         "policy version and step batched requests with Session.observe_features")
    try:
        if len(live) < len(sessions):
            index = torch.tensor(live, device=feats.device)
            feats, mask = feats.index_select(0, index), mask.index_select(0, index)
        mask = mask.to(feats.device) & ~torch.cat([s.stopped for s in group]).to(feats.device)[:, None]
        for s in group:
            if s.state is None or s.state.device != feats.device:
                s.state = policy.new_state(1, feats.device)
        _accumulate(group, scope, feats, mask)
        results = policy.step_many([s.state for s in group if s.state is not None], feats, mask, scope,
                                   require_finite=True)
    except Exception as exc:  # noqa: BLE001 - every monitoring fault is handled by on_error
        for s in group:
            s.fail(exc)
        return out
    for i, s, result in zip(live, group, results):
        out[i] = s._record(result, scope)
    return out


def _accumulate(sessions: Sequence[Session], scope: Scope, feats: torch.Tensor, mask: torch.Tensor) -> None:
    """Add this step's monitored-token counts, feature peaks and (for sessions that keep scope
    means) feature sums to each session's report; ``feats[N, T, F]`` / ``mask[N, T]`` hold the sessions' rows in order."""
    new = {"counts": mask.sum(1), "peaks": feats.masked_fill(~mask[..., None], float("-inf")).amax(dim=1)}
    if any(s.scope_means for s in sessions):  # evaluation only: not paid per token when serving
        new["sums"] = feats.double().masked_fill(~mask[..., None], 0.0).sum(1)
    combine: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
        "counts": torch.add, "peaks": torch.maximum, "sums": torch.add}
    for name, value in new.items():
        olds = [getattr(s.report, name).get(scope) for s in sessions]
        if all(o is not None for o in olds):  # one op for all sessions, then split back
            value = combine[name](torch.cat([o for o in olds if o is not None]), value)
            olds = [None] * len(sessions)
        start = 0
        for s, old in zip(sessions, olds):
            part = value[start:start + s.rows]
            getattr(s.report, name)[scope] = part if old is None else combine[name](old, part)
            start += s.rows
