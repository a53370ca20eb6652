"""Structured logs of monitoring decisions, as JSON lines (structlog).

The library only *emits*: it calls ``structlog.get_logger("sae_monitor")`` and never
configures logging at import, so an application's own structlog or stdlib setup decides where
events go. Operators who want the standard JSON output call :func:`configure_json_logging`
once at startup (``sae-monitor serve`` does).

Events (snake_case, key-value fields):

* ``rule_hit`` — one per hit: ``request_id, rule, action`` (the rule's action kinds),
  ``mode, severity, scope, row, token_index, feature, activation, policy_version``. Level:
  ``error`` when the rule has an ``alert`` action, ``info`` when it has ``log``, else ``debug``
  (a rule that asks only for ``metric`` does not flood the log).
* ``request_blocked`` — one per blocked row (``warning``, ``error`` for alerting rules).
* ``request_steered`` — one per steering directive (``info``, ``error`` for alerting rules).
* ``request_completed`` — one per served request (emitted by :mod:`monitor.serve`): outcome,
  token counts, timings and the prompt/response as ``sha256:`` digests.
* ``policy_reload_succeeded`` (``info``) / ``policy_reload_failed`` (``error``).

Privacy: prompt and response text is never logged by default, only its SHA-256 (so equal
texts can be correlated without storing them). ``log_text=True`` opts in; add redaction
processors through ``configure_json_logging(processors=...)``. Even then,
:func:`configure_json_logging` with ``log_text=False`` replaces any text field that reaches it
(:data:`TEXT_KEYS`) by its digest, so one misconfigured emitter cannot leak text.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Callable, Iterable, MutableMapping, Sequence
from typing import TYPE_CHECKING, Any, TextIO

import structlog

from monitor.report import Report, ReportObserver, decisions

if TYPE_CHECKING:
    from monitor.policy import Hit, ReloadResult

LOGGER_NAME = "sae_monitor"
TEXT_KEYS = ("prompt", "response", "text", "messages", "content")
Processor = Callable[[Any, str, MutableMapping[str, Any]], Any]


def text_digest(value: Any) -> str:
    """``sha256:<hex>`` of a text (UTF-8) or of a message list (canonical JSON)."""
    if not isinstance(value, str):
        value = json.dumps(value, sort_keys=True, ensure_ascii=False, default=str)
    return "sha256:" + hashlib.sha256(value.encode("utf-8")).hexdigest()


class HashText:
    """Processor: replace each text field (``keys``) by ``<key>_sha256`` holding its digest."""

    def __init__(self, keys: Iterable[str] = TEXT_KEYS) -> None:
        self.keys = tuple(keys)

    def __call__(self, logger: Any, method: str, event_dict: MutableMapping[str, Any]
                 ) -> MutableMapping[str, Any]:
        for key in self.keys:
            if key in event_dict:
                value = event_dict.pop(key)
                if value is not None:
                    event_dict[f"{key}_sha256"] = text_digest(value)
        return event_dict


def configure_json_logging(stream: TextIO | None = None, *, processors: Sequence[Processor] = (),
                           log_text: bool = False, level: str | int = "info") -> None:
    """Configure structlog globally to write one JSON object per line to ``stream`` (stdout).

    Chain: context variables, ``level``, ISO UTC ``timestamp``, your ``processors`` (e.g.
    redaction), then — unless ``log_text`` — :class:`HashText`, then exceptions and the JSON
    renderer. Events below ``level`` are dropped. Call once at startup, never from a library.
    """
    chain: list[Any] = [structlog.contextvars.merge_contextvars,
                        structlog.processors.add_log_level,
                        structlog.processors.TimeStamper(fmt="iso", utc=True),
                        *processors]
    if not log_text:
        chain.append(HashText())
    chain += [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
    numeric = level if isinstance(level, int) else _LEVELS[level.lower()]
    structlog.configure(processors=chain,
                        wrapper_class=structlog.make_filtering_bound_logger(numeric),
                        logger_factory=structlog.WriteLoggerFactory(file=stream or sys.stdout),
                        context_class=dict, cache_logger_on_first_use=False)


_LEVELS = {"debug": 10, "info": 20, "warning": 30, "warn": 30, "error": 40, "critical": 50}


class ReportLogger(ReportObserver):
    """Monitor callback that logs every decision of a call (see the module doc for events).

    ``log_text``: include prompt/response text in ``request_completed``; otherwise, with
    ``text_hash``, their ``sha256:`` digests, else nothing about the text.
    """

    def __init__(self, log_text: bool = False, text_hash: bool = True) -> None:
        self.log_text = log_text
        self.text_hash = text_hash
        self._log = structlog.get_logger(LOGGER_NAME)

    def __call__(self, report: Report) -> None:
        """Log the hits, blocks and steers of one finished call."""
        log = self._log
        for hit in report.hits:
            alert = "alert" in hit.actions
            level = "error" if alert else "info" if "log" in hit.actions else "debug"
            getattr(log, level)("rule_hit", **self._hit_fields(report, hit), alert=alert)
        for d in decisions(report):
            fields: dict[str, Any] = dict(
                request_id=report.request_id, rule=d.rule, action=d.action, mode="enforce",
                scope=d.scope, row=d.row, token_index=d.token_index, feature=d.feature,
                activation=d.activation, policy_version=report.policy_version, alert=d.alert)
            if d.steer is None:
                (log.error if d.alert else log.warning)("request_blocked", **fields)
            else:
                s = d.steer
                (log.error if d.alert else log.info)(
                    "request_steered", **fields, op=s.op, value=s.value, duration=s.duration,
                    target=f"latent:{s.latent}" if s.latent is not None else s.probe)

    @staticmethod
    def _hit_fields(report: Report, hit: Hit) -> dict[str, Any]:
        return dict(request_id=report.request_id, rule=hit.rule_id, action=list(hit.actions),
                    mode=hit.mode, severity=hit.severity, scope=hit.scope, row=hit.row,
                    token_index=hit.token_index, feature=hit.feature, activation=hit.activation,
                    policy_version=report.policy_version)

    def request_completed(self, report: Report, *, prompt: Any = None, response: Any = None,
                          **fields: Any) -> None:
        """One summary event per served request; text per ``log_text`` / ``text_hash``."""
        text: dict[str, Any] = {}
        if self.log_text:
            text = {"prompt": prompt, "response": response}
        elif self.text_hash:
            text = {"prompt_sha256": text_digest(prompt) if prompt is not None else None,
                    "response_sha256": text_digest(response) if response is not None else None}
        self._log.info("request_completed", request_id=report.request_id, outcome=report.outcome,
                       policy_version=report.policy_version,
                       prompt_tokens=report.tokens_monitored.get("prompt", 0),
                       response_tokens=report.tokens_monitored.get("response", 0),
                       monitor_seconds=round(report.monitor_seconds, 6),
                       total_seconds=round(report.total_seconds, 6), error=report.error,
                       **text, **fields)

    def observe_reload(self, result: ReloadResult, store: Any = None) -> None:
        """Log one policy reload attempt."""
        if result.ok:
            self._log.info("policy_reload_succeeded", version_id=result.version_id,
                           changed=result.changed)
        else:
            self._log.error("policy_reload_failed", version_id=result.version_id,
                            error=result.error)
